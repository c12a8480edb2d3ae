"""One frozen config per quantization scheme; each validates its own options. Adding a scheme is a
new config here and a handler registered for it (toolkit.compile.quantization)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from toolkit.errors import ToolkitError

__all__ = ["CALIBRATION_METHODS", "ROUNDINGS", "CONFIGS", "DYNAMIC_OPS", "FP16_IO", "FP16_KEEP_FP32", "FP16_KEEP_FP32_FUSED", "INT4_ALGOS", "INT4_HEADS", "MODES", "Fp16",
           "Int4", "Int8Dynamic", "Int8Static", "QuantConfig", "config_for"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ROUNDINGS = ("gptq", "nearest")  # how int8-static picks each weight's level (quantization/rounding.py)
INT4_ALGOS = ("rtn", "hqq", "gptq")
INT4_HEADS = ("int8", "int4", "float")  # how int4 stores the MatMuls that make a graph output
# Overflow-prone in fp16: normalisations and reductions accumulate past 65504, softmax's exp too.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Exp")
# For a graph whose layer norms, softmax and attention are fused kernels that accumulate in fp32
# (onnxruntime's CUDA kernels do), only what is left of unfused normalisations stays in fp32.
FP16_KEEP_FP32_FUSED = ("ReduceMean", "ReduceSum", "Pow", "Exp")
FP16_IO = ("fp32", "fp16")
# Convolutions are left out of dynamic quantization: ConvInteger is far slower than fp32 Conv on the
# CPUs we measured (benchmarks/RESULTS.md); int8-static (QDQ) is the path for them.
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM", "Attention")


def _calibration(samples: int) -> None:
    if samples < 1:
        raise ToolkitError(f"--calibration-samples must be at least 1, got {samples}.")


@dataclass(frozen=True)
class Int8Dynamic:
    """Weights int8 per output channel (or tensor), activations quantized per call. `keep_float`
    keeps that many weighted MatMul/Gemm in fp32: those whose input activations are the most
    outlier-heavy (max|x| / rms(x) over `calibration_samples` inputs). `reduce_range` quantizes the
    weights to 7 bits; by default it is on where this x86 CPU has no VNNI, whose uint8 × int8
    products saturate 16-bit sums with full-range weights. `exclude` names nodes kept in fp32 (what
    a repair found, toolkit.compile.repair). `smooth` moves activation outliers into the weights
    where that lowers the int8 error on the calibration samples (quantization/smoothing.py)."""

    mode: ClassVar[str] = "int8"
    precision: ClassVar[str] = "int8"
    per_channel: bool = True
    keep_float: int = 0
    calibration_samples: int = 128
    reduce_range: bool | None = None
    exclude: tuple[str, ...] = ()
    smooth: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.keep_float < 0:
            raise ToolkitError(f"--keep-float must be at least 0, got {self.keep_float}.")
        _calibration(self.calibration_samples)


@dataclass(frozen=True)
class Int8Static:
    """QDQ int8 with activation ranges calibrated on `calibration_samples` inputs (the model's own
    calibration set where it has one); `exclude` names nodes kept in fp32. `rounding` "gptq" picks
    each int8 weight's level for its layer's outputs on those inputs, "nearest" rounds each to its
    nearest level (quantization/rounding.py). Weights are quantized per
    output channel by default: a convolution's channels, with batch norms folded into them, differ
    in range by orders of magnitude, and one scale per tensor leaves the small ones a few levels.
    `reduce_range` and `smooth` as for dynamic int8 (the same kernels run the QDQ graph)."""

    mode: ClassVar[str] = "int8-static"
    precision: ClassVar[str] = "int8"
    calibration_samples: int = 128
    method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None
    exclude: tuple[str, ...] = ()
    smooth: bool = True
    rounding: str = "gptq"
    # 16 makes that side 16-bit (onnxruntime's 16-bit QDQ, which the CPU runs in float): not for speed,
    # for measuring what 8 bits cost on each side (repair's diagnosis of what binds a failing variant)
    activation_bits: int = 8
    weight_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _calibration(self.calibration_samples)
        if self.method not in CALIBRATION_METHODS:
            raise ToolkitError(f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}.")
        if self.rounding not in ROUNDINGS:
            raise ToolkitError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}.")
        for side in ("activation_bits", "weight_bits"):
            if getattr(self, side) not in (8, 16):
                raise ToolkitError(f"{side} must be 8 or 16, got {getattr(self, side)}.")


@dataclass(frozen=True)
class Fp16:
    """Half precision, with the `keep_fp32` op types and the `keep_nodes` nodes (by name: what a repair
    found) left in fp32. `io` "fp32" keeps the graph's float inputs and outputs in fp32 (casts at the
    edges); "fp16" makes them fp16 too, so that a decoder's cache stays fp16 from step to step (the
    variant's manifest entry records the dtypes)."""

    mode: ClassVar[str] = "fp16"
    precision: ClassVar[str] = "fp16"
    keep_fp32: tuple[str, ...] = FP16_KEEP_FP32
    io: str = "fp32"
    keep_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        object.__setattr__(self, "keep_nodes", tuple(self.keep_nodes))
        if self.io not in FP16_IO:
            raise ToolkitError(f"--io must be one of {', '.join(FP16_IO)}, got {self.io!r}.")


@dataclass(frozen=True)
class Int4:
    """Weight-only int4 of MatMul weights, onnxruntime's MatMulNBits: each block of `block_size`
    input rows of a weight column shares a scale and a zero point; activations stay float.

    `algo`: "rtn" rounds each block to its nearest levels; "hqq" fits the scales and zero points to
    the weights (half-quadratic quantization, no data); "gptq" corrects each column for the rounding
    of the ones before it, weighed by `calibration_samples` inputs. `accuracy_level` is MatMulNBits'
    compute type: 4 quantizes the activations to int8 inside the kernel (the fastest on CPUs), 0
    lets the provider choose. `head` is how the MatMuls that make a graph output (a language model's
    head), where an error lands on the logits directly, are stored: "int8" packs them in 8-bit blocks
    (MatMulNBits, the same kernel; a quarter of float's bytes, which a decode step reads whole), "int4"
    like the rest, "float" not at all; `exclude` names other nodes kept in float."""

    mode: ClassVar[str] = "int4"
    precision: ClassVar[str] = "int4"
    block_size: int = 32
    algo: str = "rtn"
    accuracy_level: int = 4
    head: str = "int8"
    calibration_samples: int = 32
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _calibration(self.calibration_samples)
        if self.algo not in INT4_ALGOS:
            raise ToolkitError(f"unknown int4 algorithm {self.algo!r}; choose one of {', '.join(INT4_ALGOS)}.")
        if self.head not in INT4_HEADS:
            raise ToolkitError(f"unknown int4 head {self.head!r}; choose one of {', '.join(INT4_HEADS)}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ToolkitError(f"--block-size must be a power of two >= 16 (MatMulNBits' blocks), got {self.block_size}.")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ToolkitError(f"--accuracy-level must be 0 (the provider's choice), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8), "
                               f"got {self.accuracy_level}.")


QuantConfig = Int8Dynamic | Int8Static | Fp16 | Int4
CONFIGS: dict[str, type] = {c.mode: c for c in (Int8Dynamic, Int8Static, Fp16, Int4)}
MODES = tuple(CONFIGS)


def config_for(mode: str, options: Mapping[str, Any]) -> QuantConfig:
    """The config of `mode` with `options` (None values take the scheme's default); an option the
    scheme does not take is an error naming the ones it does."""
    if mode not in CONFIGS:
        raise ToolkitError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}.")
    config = CONFIGS[mode]
    known = {f.name for f in fields(config)}
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - known)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        takes = ", ".join("--" + k.replace("_", "-") for k in sorted(known)) or "no options"
        raise ToolkitError(f"{flags} does not apply to --mode {mode}; it takes {takes}.")
    return config(**given)
