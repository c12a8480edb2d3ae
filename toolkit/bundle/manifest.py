"""The manifest: what a bundle holds and where it came from, as dataclasses that read and write
`manifest.json`. The single source of truth for every stage and for the runtime."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.spec import Dim, TensorSpec

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "SOURCE_KINDS", "Manifest", "Source", "Variant", "safe_name"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SOURCE_KINDS = ("zoo", "factory", "hf")
# Factory names that say nothing about the model: a bundle from `pkg.resnet:build` is named `resnet`.
_GENERIC_FACTORIES = {"build", "make", "create", "factory", "model", "get_model", "build_model", "main"}
_GENERIC_DIRS = {"model", "models", "weights", "checkpoint", "snapshot"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """`text` as a bundle name that is safe in URLs and directory names (Triton's model repository):
    letters, digits, '_', '.' and '-', not starting with '.' or '-', at most 128 characters."""
    return _UNSAFE.sub("-", text).strip("-.")[:128].rstrip("-.") or "model"


@dataclass(frozen=True)
class Source:
    """Where a bundle's model comes from, so that its PyTorch reference can be rebuilt: a zoo model
    and preset, a user's factory (`package.module:factory`), or a Hugging Face directory; `part`
    names one further graph of that model (an encoder-decoder's encoder); `pruned` names the file in
    the bundle that holds the structure `toolkit prune` gave it (toolkit.reference.pruned), with its
    sha256; a hub model's directory is its snapshot in the Hugging Face cache (`hub`, `revision`)."""

    kind: str
    model: str | None = None  # zoo: the family name
    preset: str | None = None  # zoo
    ref: str | None = None  # factory: package.module:factory
    path: str | None = None  # hf: the model directory
    part: str | None = None
    pruned: str | None = None
    pruned_sha256: str | None = None
    hub: str | None = None  # hf: the hub repo the directory is a snapshot of (org/name)
    revision: str | None = None  # hf: the snapshot's commit
    remote_code: bool | None = None  # hf: the user let transformers run the model's own code (--trust-remote-code)

    def __post_init__(self) -> None:
        needs = {"zoo": ("model", "preset"), "factory": ("ref",), "hf": ("path",)}
        if self.kind not in needs:
            raise ToolkitError(f"unknown model source kind {self.kind!r}; known: {', '.join(SOURCE_KINDS)}.")
        missing = [f for f in needs[self.kind] if not getattr(self, f)]
        if missing:
            raise ToolkitError(f"a {self.kind} source needs {', '.join(missing)}.")
        if self.pruned is not None and (safe_name(self.pruned) != self.pruned or not self.pruned_sha256):
            raise ToolkitError(f"a pruned source names its structure by a plain file name in the bundle, with its sha256; got {self.pruned!r}.")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Source:
        return cls(**data)

    def with_part(self, part: str | None) -> Source:
        return replace(self, part=part)

    def describe(self) -> str:
        hf = f"hf:{self.hub}@{self.revision[:12]}" if self.hub and self.revision else f"hf:{self.path}"
        text = {"zoo": f"{self.model} preset {self.preset}", "factory": self.ref, "hf": hf}[self.kind]
        text = f"{text}, with its own code" if self.remote_code else text
        text = f"{text}, pruned" if self.pruned else text
        return f"{text}, part {self.part}" if self.part else text

    def default_name(self) -> str:
        """A short, URL-safe name: the zoo name, the factory's (or its module's), the hub repo's, or the directory's."""
        if self.kind == "zoo":
            name = self.model
        elif self.hub:
            name = self.hub.rpartition("/")[2]
        elif self.kind == "factory":
            module, _, factory = self.ref.partition(":")
            name = module.rpartition(".")[2] if factory.lower() in _GENERIC_FACTORIES else factory
        else:
            parts = self.path.rstrip("/").split("/")
            name = parts[-2] if len(parts) > 1 and parts[-1].lower() in _GENERIC_DIRS else parts[-1]
        return safe_name(f"{name}-{self.part}" if self.part else name)


@dataclass
class Variant:
    """One compiled model in the bundle and how it came to be."""

    file: str
    sha256: str
    bytes: int
    recipe: dict[str, Any]  # {"stage": ..., "options": {...}, "parent": variant name or None}
    precision: str = "fp32"  # selects the parity tolerance profile
    external_data: list[dict[str, Any]] = field(default_factory=list)  # [{"file", "sha256", "bytes"}]
    parity: dict[str, Any] | None = None
    # {tensor name: dtype} where this variant's graph takes or gives another dtype than the manifest's
    # inputs and outputs say (an fp16 variant made for CUDA keeps its cache in float16)
    io: dict[str, str] = field(default_factory=dict)

    def tensors(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """`specs` as this variant's graph has them."""
        return [replace(t, dtype=self.io[t.name]) if t.name in self.io else t for t in specs]


@dataclass
class Manifest:
    name: str
    source: Source
    task: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: list[Dim]
    variants: dict[str, Variant]
    reference: dict[str, Any] = field(default_factory=dict)  # e.g. {"weights_sha256": ...}
    versions: dict[str, str] = field(default_factory=dict)
    description: str = ""
    fusion: dict[str, Any] | None = None  # transformer fusion hints, see ModelSpec.fusion
    best: dict[str, Any] | None = None  # the fastest passing variant and how it was measured (toolkit build)
    generation: dict[str, Any] | None = None  # decoders: tokenizer, eos_token_id, context (ModelSpec.generation)
    parts: list[str] = field(default_factory=list)  # subdirectories that are bundles of this model's other graphs
    failed: dict[str, str] = field(default_factory=dict)  # variants a build could not make, and why
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)  # files beside the graphs (a tokenizer): {name: {sha256, bytes}}
    pruning: dict[str, Any] | None = None  # toolkit prune: what was removed, what was kept and why, and the task gate against the unpruned model
    encryption: dict[str, Any] | None = None  # toolkit encrypt: the wrapped data key and the sealed files (encryption.py)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "source": self.source.to_json(),
            "task": self.task,
            "opset": self.opset,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {d.name: d.to_json() for d in self.dims},
            "fusion": self.fusion,
            "generation": self.generation,
            "parts": self.parts,
            "failed": self.failed,
            "assets": self.assets,
            "pruning": self.pruning,
            "reference": self.reference,
            "variants": {name: asdict(v) for name, v in self.variants.items()},
            "best": self.best,
            "versions": self.versions,
            **({"encryption": self.encryption} if self.encryption else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            source=Source.from_json(data["source"]),
            task=data["task"],
            opset=data["opset"],
            inputs=[TensorSpec.from_json(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_json(t) for t in data["outputs"]],
            dims=[Dim.from_json(name, d) for name, d in data["dims"].items()],
            fusion=data.get("fusion"),
            generation=data.get("generation"),
            parts=data.get("parts", []),
            failed=data.get("failed", {}),
            assets=data.get("assets", {}),
            pruning=data.get("pruning"),
            reference=data.get("reference", {}),
            variants={name: Variant(**v) for name, v in data["variants"].items()},
            best=data.get("best"),
            versions=data.get("versions", {}),
            encryption=data.get("encryption"),
            format_version=data["format_version"],
        )
