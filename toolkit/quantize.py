"""Stage `quantize`: variant fp32 → `int8` (dynamic), `int8-static` (QDQ, calibrated) or `fp16`.

Every mode works on a pre-processed copy in a private temporary directory (onnxruntime's
quantization tools leave temporary files in the working directory otherwise), and records in the
variant's recipe what it did: for int8, how many ops of each type were quantized and how many kept
float weights; for fp16, which op types were kept in fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.samples import make_feeds

__all__ = ["CALIBRATION_METHODS", "DYNAMIC_OPS", "FP16_KEEP_FP32", "MODES", "quantize", "static_applies"]

MODES = ("int8", "int8-static", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Overflow-prone in fp16: normalisations and reductions accumulate past 65504, softmax's exp too.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Exp")
# Convolutions are left out of dynamic quantization: ConvInteger is 6-9x slower than fp32 Conv on the
# CPUs we measured; int8-static (QDQ) is the path for them.
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM", "Attention")
_WEIGHTED_OPS = ("MatMul", "Gemm", "LSTM", "Conv", "Attention")

Progress = Callable[[str], None]


def quantize(
    path: str | Path,
    *,
    mode: str,
    source: str = "fp32",
    calibration_samples: int = 128,
    method: str = "minmax",
    per_channel: bool | None = None,
    keep_float: int = 0,
    keep_fp32: Sequence[str] = FP16_KEEP_FP32,
    progress: Progress | None = None,
) -> Bundle:
    """Adds variant `mode` quantized from variant `source`; returns the bundle (parity not yet checked).

    `per_channel` (weight scales per output channel) defaults to on for int8, off for int8-static.
    `keep_float` (int8) keeps that many weighted MatMul/Gemm nodes in fp32: those whose input
    activations are the most outlier-heavy (max|x| / rms(x) on calibration data), where uint8
    activations lose the most resolution."""
    if mode not in MODES:
        raise ToolkitError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}.")
    if method not in CALIBRATION_METHODS:
        raise ToolkitError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}.")
    if calibration_samples < 1:
        raise ToolkitError(f"--calibration-samples must be at least 1, got {calibration_samples}.")
    if keep_float < 0 or (keep_float and mode != "int8"):
        raise ToolkitError(f"--keep-float applies to --mode int8 and must be at least 0, got {keep_float} with mode {mode}.")
    if per_channel is None:
        per_channel = mode == "int8"
    say = progress or (lambda _msg: None)
    bundle = Bundle.open(Path(path).resolve())  # absolute: the quantizer runs inside a temporary directory
    if bundle.variant(source).precision != "fp32":
        raise ToolkitError(f"variant {source!r} is {bundle.variant(source).precision}; quantize from an fp32 variant.")
    model_file = bundle.variant_path(source).resolve()
    with tempfile.TemporaryDirectory(prefix="toolkit-quantize-") as tmp, _inside(Path(tmp)), _quiet_onnxruntime():
        out = Path(tmp) / "quantized.onnx"
        if mode == "fp16":
            say(f"converting to fp16, keeping inputs, outputs and {', '.join(keep_fp32)} in fp32")
            options = _fp16(model_file, out, keep_fp32)
            precision = "fp16"
        else:
            say("pre-processing (shape inference, constant folding) so every weight is visible to the quantizer")
            pre, pre_options = _preprocess(model_file, Path(tmp) / "pre.onnx")
            if mode == "int8":
                kept = _outlier_ranking(bundle, pre, calibration_samples)[:keep_float] if keep_float else []
                if kept:
                    say(f"keeping {len(kept)} MatMul/Gemm in fp32 (most outlier-heavy inputs): {', '.join(n for n, _ in kept)}")
                say(f"quantizing weights of {', '.join(DYNAMIC_OPS)} to int8 (dynamic activations)")
                options = _dynamic(pre, out, per_channel, kept)
            else:
                say(f"calibrating on {calibration_samples} samples ({method}{', per channel' if per_channel else ''})")
                options = _static(bundle, pre, out, calibration_samples, method, per_channel)
            options.update(pre_options, ops=_op_report(pre, out))
            precision = "int8"
            say("weights quantized per op type: " + ", ".join(f"{op} {r['quantized']}/{r['with_weights']}" for op, r in options["ops"].items()))
        import onnx

        from toolkit._onnx import save_model

        save_model(onnx.load(str(out)), out)
        bundle.add_variant(mode, out, recipe={"stage": "quantize", "options": {"mode": mode, **options}, "parent": source}, precision=precision)
    say(f"added variant {mode} ({bundle.manifest.variants[mode].bytes / 1e6:.2f} MB, from {bundle.variant(source).bytes / 1e6:.2f} MB)")
    for part in bundle.parts():
        say(f"quantizing part {part.path.name}")
        quantize(part.path, mode=mode, source=source, calibration_samples=calibration_samples, method=method, per_channel=per_channel,
                 keep_float=keep_float, keep_fp32=keep_fp32, progress=progress)
    return bundle


def static_applies(bundle: Bundle) -> str | None:
    """Why int8-static is worth building for this bundle (convolutions, which dynamic int8 leaves
    in fp32, or a real calibration set), or None."""
    import onnx

    proto = onnx.load(str(bundle.variant_path("fp32")), load_external_data=False)
    if any(node.op_type == "Conv" for node in proto.graph.node):
        return "the model has convolutions, which only static int8 quantizes"
    from toolkit.source import resolve

    if resolve(bundle.manifest.source).calibration_data is not None:
        return "the model has a calibration set"
    return None


def _preprocess(model_file: Path, target: Path) -> tuple[Path, dict[str, Any]]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # quant_pre_process prints its shape-inference failures to stdout; they are reported in the recipe.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            quant_pre_process(str(model_file), str(target))
            return target, {"preprocess": "quant_pre_process"}
        except Exception as exc:  # symbolic shape inference fails on some decoders: skip that part only
            quant_pre_process(str(model_file), str(target), skip_symbolic_shape=True)
            return target, {"preprocess": f"quant_pre_process without symbolic shape inference ({type(exc).__name__})"}


def _dynamic(model_file: Path, target: Path, per_channel: bool, kept: list[tuple[str, float]]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(model_file), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OPS),
        per_channel=per_channel, nodes_to_exclude=[n for n, _ in kept], extra_options={"MatMulConstBOnly": True},
    )
    return {
        "weights": f"int8 symmetric per {'channel' if per_channel else 'tensor'}", "activations": "uint8, quantized per call",
        "op_types": list(DYNAMIC_OPS), "per_channel": per_channel,
        "kept_float": [{"node": n, "outlier_score": round(score, 2)} for n, score in kept],
    }


def _outlier_ranking(bundle: Bundle, model_file: Path, samples: int) -> list[tuple[str, float]]:
    """Weighted MatMul/Gemm nodes, most outlier-heavy input first: max|x| / rms(x) of the input
    activation over calibration data. A high ratio means a per-tensor uint8 scale spends its range on
    a few outliers and rounds everything else coarsely."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model_file))
    weights = {t.name for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]
    activations = list(dict.fromkeys(n.input[0] for n in nodes))
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in activations)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    peak = dict.fromkeys(activations, 0.0)
    squares = dict.fromkeys(activations, 0.0)
    count = dict.fromkeys(activations, 0)
    for feeds in _calibration_feeds(bundle, samples)[0]:
        for name, value in zip(activations, session.run(activations, feeds), strict=True):
            value = value.astype(np.float64)
            peak[name] = max(peak[name], float(np.abs(value).max(initial=0.0)))
            squares[name] += float((value**2).sum())
            count[name] += value.size
    score = {name: peak[name] / max(np.sqrt(squares[name] / max(count[name], 1)), 1e-12) for name in activations}
    return sorted(((n.name, score[n.input[0]]) for n in nodes), key=lambda item: -item[1])


def _static(bundle: Bundle, model_file: Path, target: Path, samples: int, method: str, per_channel: bool) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds, origin = _calibration_feeds(bundle, samples)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    quantize_static(
        str(model_file), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        calibrate_method=calibrate, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    return {"format": "QDQ", "calibration": {"method": method, "samples": len(feeds), "data": origin}, "per_channel": per_channel}


def _calibration_feeds(bundle: Bundle, samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """The model's own calibration data when it has some, else sample inputs at the export sizes."""
    from toolkit.source import resolve

    spec = resolve(bundle.manifest.source)
    if spec.calibration_data is not None:
        data = spec.calibration_data(samples)
        count = len(next(iter(data.values())))
        return [{k: v[i : i + 1] for k, v in data.items()} for i in range(count)], "the model's calibration set"
    sizes = {d.name: 1 if d.name == "batch" else d.export for d in bundle.manifest.dims}
    return [make_feeds(bundle.manifest.inputs, sizes, seed=10_000 + i) for i in range(samples)], "sample inputs (no calibration set)"


def _fp16(model_file: Path, target: Path, keep_fp32: Sequence[str]) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32))
    converted = convert_float_to_float16(onnx.load(str(model_file)), keep_io_types=True, op_block_list=block)
    _drop_repeated_nodes(converted.graph)
    onnx.save(converted, str(target))
    return {"keep_io_types": True, "kept_fp32": list(keep_fp32)}


def _drop_repeated_nodes(graph: Any) -> None:
    """Removes exact repeats of a node (same name, inputs and outputs).

    The fp16 converter inserts one Cast per fp32-kept consumer of a tensor, all with one name and one
    output (a LayerNorm weight of ones shared by every LayerNorm, a residual sum read by an Add and a
    LayerNorm); the repeats make the graph invalid, and any one of them computes the same tensor.
    """
    seen = set()
    kept = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _op_report(before: Path, after: Path) -> dict[str, dict[str, int]]:
    """Per op type that carries weights: how many nodes had constant weights, how many of those were
    quantized, and how many still compute with float weights (read straight from an initializer)."""
    import onnx

    def float_weighted(model: Any) -> Counter[str]:
        constants = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        return Counter(n.op_type for n in model.graph.node if n.op_type in _WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in constants)

    original, remaining = float_weighted(onnx.load(str(before))), float_weighted(onnx.load(str(after)))
    return {op: {"with_weights": n, "quantized": n - remaining[op], "float": remaining[op]} for op, n in sorted(original.items())}


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """onnxruntime's quantization writes temporary files into the working directory."""
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # the quantizer logs every skipped node at INFO/WARNING
    try:
        yield
    finally:
        logger.setLevel(level)
