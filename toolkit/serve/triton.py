"""`toolkit package DIR --triton REPO`: a Triton Inference Server model repository for one variant
of a bundle, for when one machine is not enough:

    REPO/<name>/config.pbtxt     max_batch_size, inputs/outputs, dynamic_batching, instance_group
    REPO/<name>/1/model.onnx     the variant, as Triton's onnxruntime backend expects it (with the
                                 external-data file a large model reads beside it, under its own name)
    REPO/<name>/integrity.json   what the bundle's manifest records of those files: sha256 and bytes,
                                 checked on the copies (Triton ignores files beside the versions)

A bundle's parts (an encoder-decoder's encoder) become models of their own beside it, REPO/<name>-<part>/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle, replace_directory, sha256_file, write_atomic
from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model
from toolkit.serve.protocol import datatype
from toolkit.spec import TensorSpec

__all__ = ["batch_first", "model_config", "to_pbtxt", "package_triton"]


def batch_first(model: Model) -> bool:
    """Whether every input and output has the batch on axis 0: requests can merge along it."""
    return all(t.shape[:1] == ("batch",) for t in (*model.inputs, *model.outputs))


def model_config(model: Model, *, max_batch: int, max_delay_ms: float, instances: int, kind: str = "KIND_AUTO") -> dict[str, Any]:
    """The model's configuration as Triton writes it in JSON (protobuf JSON: int64 dims are strings).
    With max_batch > 0 the batch axis is implicit, as Triton requires, and left out of the dims."""
    batched = max_batch > 0 and batch_first(model)

    def tensor(t: TensorSpec) -> dict[str, Any]:
        shape = t.shape[1:] if batched else t.shape
        return {"name": t.name, "data_type": f"TYPE_{datatype(t.dtype)}", "dims": [str(d if isinstance(d, int) else -1) for d in shape]}

    config: dict[str, Any] = {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": max_batch if batched else 0,
        "input": [tensor(t) for t in model.inputs],
        "output": [tensor(t) for t in model.outputs],
        "instance_group": [{"count": instances, "kind": kind}],
    }
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": str(round(max_delay_ms * 1000))}
    return config


def to_pbtxt(config: dict[str, Any]) -> str:
    """protobuf text format for a `model_config` dict."""

    bare = {"data_type", "kind", "dims", "max_queue_delay_microseconds"}  # enum names; int64 (strings in JSON)

    def scalar(key: str, value: Any) -> str:
        if isinstance(value, str) and key not in bare:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(value)

    def fields(message: dict[str, Any], indent: str) -> list[str]:
        lines = []
        for key, value in message.items():
            if isinstance(value, dict):
                lines += [f"{indent}{key} {{", *fields(value, indent + "  "), f"{indent}}}"]
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                lines.append(f"{indent}{key} [")
                for i, item in enumerate(value):
                    lines += [f"{indent}  {{", *fields(item, indent + "    "), f"{indent}  }}" + ("," if i < len(value) - 1 else "")]
                lines.append(f"{indent}]")
            elif isinstance(value, list):
                lines.append(f"{indent}{key}: [ {', '.join(scalar(key, v) for v in value)} ]")
            else:
                lines.append(f"{indent}{key}: {scalar(key, value)}")
        return lines

    return "\n".join(fields(config, "")) + "\n"


def package_triton(path: str | os.PathLike[str] | Bundle, repo: str | os.PathLike[str], *, variant: str | None = None, max_batch: int = 32,
                   max_delay_ms: float = 0.0, instances: int = 1, kind: str = "KIND_AUTO", force: bool = False,
                   key: str | os.PathLike[str] | None = None) -> Path:
    """Writes REPO/<name>/ for `variant` of the bundle at `path`, and one model per part of it
    (atomically; an existing one only with `force`); returns the bundle's own directory. An
    encrypted bundle is decrypted with `key` in memory, straight into REPO: Triton's onnxruntime
    backend reads only plain files, so the repository holds the model in the clear."""
    if max_batch < 0 or instances < 1:
        raise ToolkitError(f"max_batch must be >= 0 and instances >= 1, got {max_batch} and {instances}.")
    if kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ToolkitError(f"instance kind must be KIND_AUTO, KIND_GPU or KIND_CPU, got {kind!r}.")
    model = Model(path, variant=variant, provider="cpu", key=key)  # validated and verified; opening it proves the variant loads
    repo = Path(repo)
    target = repo / model.name  # a safe name (the manifest is validated): one directory inside REPO
    if target.is_symlink() or target.exists() and not (target / "config.pbtxt").is_file():
        raise ToolkitError(f"{target} exists and is not a Triton model directory; refusing to replace it. Choose another REPO.")
    if target.exists() and not force:
        raise ToolkitError(f"{target} already exists; pass --force to replace it.")
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.staging-", dir=repo))
    try:
        (staging / "1").mkdir()
        record = model.bundle.variant(model.variant)
        files = {"1/model.onnx": {"sha256": record.sha256, "file": record.file},
                 **{f"1/{e['file']}": e for e in record.external_data}}  # read beside the graph, by the name it records
        for copy, entry in files.items():
            if model.bundle.sealed:  # decrypted and checked against its sha256 in memory
                model.bundle.read(entry["file"]).tofile(staging / copy)
            else:
                shutil.copyfile(model.bundle.path / entry["file"], staging / copy)
            if sha256_file(staging / copy) != entry["sha256"]:
                raise ToolkitError(f"{model.bundle.path / entry['file']} changed while it was being copied; package again.")
        integrity = {"bundle": model.name, "variant": model.variant,
                     "files": {copy: {"sha256": e["sha256"], "bytes": (staging / copy).stat().st_size} for copy, e in files.items()}}
        write_atomic(staging / "integrity.json", (json.dumps(integrity, indent=2) + "\n").encode())
        config = model_config(model, max_batch=max_batch, max_delay_ms=max_delay_ms, instances=instances, kind=kind)
        write_atomic(staging / "config.pbtxt", to_pbtxt(config).encode())
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for part in model.bundle.parts():
        package_triton(part, repo, variant=model.variant, max_batch=max_batch, max_delay_ms=max_delay_ms,
                       instances=instances, kind=kind, force=force)
    return target
