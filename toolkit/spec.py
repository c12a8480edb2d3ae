"""What the pipeline needs to know about a model, besides the module itself.

A zoo model or a user's factory hands a `ModelSpec` to the exporter. Nothing here imports torch,
so the same descriptions (`TensorSpec`, `Dim`) travel in the manifest to torch-free runtimes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DTYPES", "Dim", "TensorSpec", "ModelSpec", "EvalData", "TASKS", "INPUT_KINDS", "cache_axes", "shape_cases"]

TASKS = ("classify", "regress", "embed", "generate")
INPUT_KINDS = ("float", "ids", "mask", "positions")
# The tensor dtypes a bundle may declare: those onnxruntime, numpy and the serving protocol all carry.
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64")

# (feeds, labels): a labelled held-out set on which a classifier's accuracy is measured.
EvalData = tuple[dict[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension such as `batch` or `seq`.

    `export` is the size used in the example inputs given to the exporter (at least 2: exporters
    specialise sizes 0 and 1); `check` holds the two distinct sizes at which parity is checked, so a
    dimension that was meant to be dynamic but got baked in fails the check.
    """

    name: str
    min: int = 1
    max: int | None = None
    export: int = 2
    check: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"dim name {self.name!r} must be an identifier")
        sizes = (self.export, *self.check)
        if self.min < 0 or any(s < self.min or (self.max is not None and s > self.max) for s in sizes):
            raise ValueError(f"dim {self.name!r}: sizes {sizes} must lie in [{self.min}, {self.max}]")
        if self.export < 2:
            raise ValueError(f"dim {self.name!r}: export size must be >= 2 (exporters specialise 0 and 1)")
        if self.check[0] == self.check[1]:
            raise ValueError(f"dim {self.name!r}: the two check sizes must differ")

    def to_json(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "export": self.export, "check": list(self.check)}

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> Dim:
        return cls(name, data["min"], data["max"], data["export"], tuple(data["check"]))


def cache_axes(inputs: Sequence[TensorSpec]) -> set[tuple[str, str]]:
    """(cached, new) dim pairs, from the axes that are their sum ("past+seq" → ("past", "seq"))."""
    return {tuple(d.split("+")) for t in inputs for d in t.shape if isinstance(d, str) and "+" in d}


def shape_cases(dims: Sequence[Dim]) -> list[dict[str, int]]:
    """The two size assignments parity is checked at: every dim at its first check size, then its second."""
    return [{d.name: d.check[i] for d in dims} for i in (0, 1)]


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, numpy dtype name, shape with ints (fixed) or dim names (dynamic);
    an axis may be the sum of dims ("past+seq": a decoder's attention mask covers cache and new tokens).

    `kind` says how sample values are drawn: `float` (standard normal), `ids` (integers in
    [0, high)), `mask` (per row, ones then zeros, at least one one), `positions` (each token's
    index among the real tokens of the input of kind `mask`, the last axis's size of them; below high).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    kind: str = "float"
    high: int | None = None

    def __post_init__(self) -> None:
        if np.dtype(self.dtype).name not in DTYPES:  # np.dtype raises TypeError on a name numpy does not know
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is none of {', '.join(DTYPES)}")
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"tensor {self.name!r}: kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.kind in ("ids", "positions") and not self.high:
            raise ValueError(f"tensor {self.name!r}: kind {self.kind!r} needs high (the exclusive upper bound)")

    @property
    def dynamic_dims(self) -> list[str]:
        """Dim names this tensor's shape uses; an axis may be a sum such as "past+seq"."""
        return [name for d in self.shape if isinstance(d, str) for name in d.split("+")]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.kind != "float":
            data["kind"] = self.kind
        if self.high is not None:
            data["high"] = self.high
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]), data.get("kind", "float"), data.get("high"))


@dataclass
class ModelSpec:
    """Everything the exporter needs: the module, its inputs, output names, dynamic dims, task.

    `module` is a `torch.nn.Module` (typed loosely so this file stays torch-free). `eval_data`, when
    given, returns a labelled held-out set used to report accuracy next to parity.
    """

    module: Any
    inputs: Sequence[TensorSpec]
    outputs: Sequence[str]
    dims: Sequence[Dim] = ()
    task: str = "classify"
    description: str = ""
    eval_data: Callable[[], EvalData] | None = field(default=None, repr=False)
    # sample_data() → real inputs (no labels) on which task gates are judged when there is no eval set.
    sample_data: Callable[[], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    # calibration_data(n) → feeds with n rows from the model's training distribution, for int8-static.
    calibration_data: Callable[[int], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    # case_feeds(sizes, seed) → the inputs of one parity case at those dim sizes, for graphs whose
    # inputs hold state that random values would misrepresent (a preallocated KV cache filled by the
    # model itself); it may use dims that no input's shape names. Default: drawn from the input kinds.
    case_feeds: Callable[[Mapping[str, int], int], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    # Hints for onnxruntime's transformer fusions: {"model_type": "bert"|"gpt2"|..., "num_heads", "hidden_size"}.
    fusion: dict[str, Any] | None = None
    # Decoders: {"tokenizer": "bytes", "eos_token_id": int, "context": int}; the graph then takes
    # input_ids, attention_mask, position_ids and past_key_i/past_value_i (see toolkit.runtime.generate).
    # An encoder-decoder adds "source_context" and "encoder": the name of its encoder part; "static"
    # names a part that is the same decoder over a cache preallocated to the context (CUDA graphs).
    generation: dict[str, Any] | None = None
    # fine_tune() → metrics: continues training `module` in place with the model's own recipe, briefly
    # and seeded; `toolkit prune` runs it after removing channels and records what it returns (the zoo's:
    # {"metric": name, "unpruned", "pruned", "fine_tuned": its values}). None: the model has no training recipe.
    fine_tune: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    # Files the bundle carries beside its graphs, {name in the bundle: content}: a Hugging Face
    # model's tokenizer.json, which the runtime then serves (toolkit.runtime.tokenizer).
    assets: Mapping[str, bytes] = field(default_factory=dict)
    # Further graphs of the same model, each exported, optimized, quantized and checked as a bundle
    # of its own in a subdirectory of this one named after the part (an encoder-decoder's encoder).
    parts: Mapping[str, ModelSpec] = field(default_factory=dict)
    # The bundle's name (in serving URLs and Triton repositories) unless `--name` gives one; default:
    # derived from where the model comes from (the factory's name, the zoo name, the directory).
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.' and '-' (it ends up in URLs and directory names)")
        self.inputs = tuple(self.inputs)
        self.outputs = tuple(self.outputs)
        self.dims = tuple(self.dims)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.inputs or not self.outputs:
            raise ValueError("a ModelSpec needs at least one input and one output")
        names = [t.name for t in self.inputs] + list(self.outputs)
        if len(set(names)) != len(names):
            raise ValueError(f"input and output names must be unique, got {names}")
        declared = {d.name for d in self.dims}
        used = {d for t in self.inputs for d in t.dynamic_dims}
        if used - declared:
            raise ValueError(f"inputs use dims {sorted(used - declared)} that are not declared in dims")
        if declared - used and self.case_feeds is None:
            raise ValueError(f"dims {sorted(declared - used)} are declared but no input uses them")
        for part in self.parts:
            if not part.isidentifier():
                raise ValueError(f"part name {part!r} must be an identifier (it names a subdirectory of the bundle)")

    def dim(self, name: str) -> Dim:
        return next(d for d in self.dims if d.name == name)
