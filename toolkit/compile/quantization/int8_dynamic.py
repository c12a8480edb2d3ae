"""Dynamic int8: weights int8 (per output channel by default), activations quantized per call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolkit._onnx import is_large
from toolkit.compile.quantization._common import (
    QuantizeContext,
    calibration_feeds,
    op_report,
    preprocess,
    reduced_range,
    resolve_nodes,
    smooth_outliers,
)
from toolkit.compile.quantization.configs import DYNAMIC_OPS, Int8Dynamic

__all__ = ["quantize_int8_dynamic"]


def quantize_int8_dynamic(context: QuantizeContext, config: Int8Dynamic, model_file: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre, options = preprocess(context, model_file)
    reduce_range = reduced_range(config.reduce_range, context.say)
    smoothing = smooth_outliers(context, pre, config, dynamic=True, reduce_range=reduce_range) if config.smooth else None
    pre = smoothing[0] if smoothing else pre
    kept = _outlier_ranking(context, pre, config.calibration_samples)[: config.keep_float] if config.keep_float else []
    if kept:
        context.say(f"keeping {len(kept)} MatMul/Gemm in fp32 (most outlier-heavy inputs): {', '.join(n for n, _ in kept)}")
    context.say(f"quantizing weights of {', '.join(DYNAMIC_OPS)} to int8 (dynamic activations)")
    # The quantizer rewrites a Gemm with constant weights as MatMul (+ Add) named `<gemm>_MatMul` before
    # it looks at the exclusions: a kept Gemm is excluded under both names.
    chosen, unknown = resolve_nodes(pre, config.exclude)
    excluded = [name for node in [*(n for n, _ in kept), *chosen] for name in (node, f"{node}_MatMul")] + _onnx_attention(pre)
    if chosen:
        context.say(f"keeping {len(chosen)} nodes in fp32: {', '.join(chosen)}")
    quantize_dynamic(
        str(pre), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OPS),
        per_channel=config.per_channel, reduce_range=reduce_range, nodes_to_exclude=excluded,
        extra_options={"MatMulConstBOnly": True}, use_external_data_format=is_large(pre),
    )
    return {
        **options,
        "weights": f"int8 symmetric per {'channel' if config.per_channel else 'tensor'}", "activations": "uint8, quantized per call",
        "op_types": list(DYNAMIC_OPS), "per_channel": config.per_channel, "reduce_range": reduce_range,
        "smooth": config.smooth, **({"smoothed": smoothing[1]} if smoothing else {}),
        "kept_float": [{"node": n, "outlier_score": round(score, 2)} for n, score in kept],
        **({"excluded": chosen} if chosen else {}), **({"excluded_not_found": unknown} if unknown else {}),
        "ops": op_report(pre, target),
    }


def _onnx_attention(model_file: Path) -> list[str]:
    """ONNX's own Attention nodes (toolkit.compile.passes.attention): the quantizer takes any
    `Attention` for onnxruntime's, whose second input is the QKV weight, and would quantize their
    keys into a QAttention. They hold no weights and stay as they are."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx") and n.name]


def _outlier_ranking(context: QuantizeContext, model_file: Path, samples: int) -> list[tuple[str, float]]:
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
    for feeds in calibration_feeds(context, samples)[0]:
        for name, value in zip(activations, session.run(activations, feeds), strict=True):
            value = value.astype(np.float64)
            peak[name] = max(peak[name], float(np.abs(value).max(initial=0.0)))
            squares[name] += float((value**2).sum())
            count[name] += value.size
    score = {name: peak[name] / max(np.sqrt(squares[name] / max(count[name], 1)), 1e-12) for name in activations}
    return sorted(((n.name, score[n.input[0]]) for n in nodes), key=lambda item: -item[1])
