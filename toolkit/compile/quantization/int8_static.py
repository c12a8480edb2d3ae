"""Static int8 (QDQ): activation ranges calibrated ahead of time.

What onnxruntime's quantize_static does by default that toolkit does not:
- It wraps every op its quantizer knows in a quantize/dequantize pair, including ops the CPU
  provider has no int8 kernel for (LayerNormalization, BatchNormalization, Pad, ...). Those run in
  float between a dequantize and a quantize, which rounds their inputs and outputs to 8 bits for
  nothing. Only the ops in INT8_KERNEL_OPS are quantized.
- It quantizes every tensor with its calibrated range, including a sum whose range is set by a
  mask value (an attention mask's finfo.min added to the scores: a step of 1.3e36, so every real
  score rounds to 0). Such sums stay float: see `_drowned`.
- It quantizes an op whose output a float op reads (a residual sum that a layer norm reads), and
  every MatMul's output: that rounds a tensor dequantized again at once. Those stay float (see
  `_read_in_float`), and a MatMul or Gemm with float readers writes float (MatMulIntegerToFloat).
Activation outliers are first moved into the weights where that measures better (smoothing.py).

Calibration runs once per pre-processed model, method and sample count, and is kept beside the
pre-processed model (a build's scratch directory), so that a repair's attempts, which change only
the nodes kept in float, do not calibrate again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolkit._onnx import is_large, save_model
from toolkit.bundle import Bundle
from toolkit.compile.passes._graph import readers_of
from toolkit.compile.quantization._common import (
    QuantizeContext,
    calibration_feeds,
    op_report,
    preprocess,
    reduced_range,
    resolve_nodes,
    smooth_outliers,
)
from toolkit.compile.quantization.configs import Int8Static
from toolkit.compile.quantization.rounding import round_weights
from toolkit.spec import ModelSpec

_WEIGHTED = ("Conv", "MatMul", "Gemm")

__all__ = ["INT8_KERNEL_OPS", "quantize_int8_static", "static_applies"]

# The ops onnxruntime's CPU provider computes on int8 once its QDQ fusions have run
# (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc):
# QLinearConv/MatMul/Gemm/Add/Mul/Concat/Where/Softmax/Sigmoid/LeakyRelu/pools, the data movement
# whose QDQ pairs are dropped, and Relu/Clip, which fold into the quantize before them.
INT8_KERNEL_OPS = frozenset({
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Where", "Split", "Softmax", "Sigmoid", "LeakyRelu",
    "AveragePool", "GlobalAveragePool", "MaxPool", "ArgMax", "Resize", "Relu", "Clip",
    "Gather", "GatherElements", "Reshape", "Flatten", "Slice", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile",
})


def quantize_int8_static(context: QuantizeContext, config: Int8Static, model_file: Path, target: Path) -> dict[str, Any]:
    import onnx

    pre, options = preprocess(context, model_file)
    reduce_range = reduced_range(config.reduce_range, context.say)
    smoothing = smooth_outliers(context, pre, config, dynamic=False, reduce_range=reduce_range) if config.smooth else None
    pre = smoothing[0] if smoothing else pre
    chosen, unknown = resolve_nodes(pre, config.exclude)
    if chosen:
        context.say(f"keeping {len(chosen)} nodes in fp32: {', '.join(chosen)}")
    # the smoothing's divisions stay float: quantizing their input would round it with the outliers they remove
    divisions = [node for record in (smoothing[1] if smoothing else []) for node in record["nodes"]]
    feeds, origin = calibration_feeds(context, config.calibration_samples)
    cache = pre.parent / f"calibration-{pre.stem}-{config.method}-{len(feeds)}.json"
    graph = onnx.load(str(pre), load_external_data=False).graph
    op_types = _op_types(graph)
    calibrated = cache.is_file()
    context.say(f"calibration ({config.method}, {len(feeds)} samples) as made before for this model" if calibrated else
                f"calibrating on {len(feeds)} samples from {origin} ({config.method}{', per channel' if config.per_channel else ''})")

    def run(excluded: list[str]) -> list[str]:
        """Quantizes without `excluded` and the nodes that would then only round what float ops read."""
        unread = _read_in_float(graph, op_types, {*excluded, *divisions})
        _quantize_static(pre, target, feeds, config, reduce_range, op_types, [*excluded, *divisions, *unread], cache)
        return unread

    if not calibrated:  # the ranges the sums are judged by come from this run's calibration
        unread = run(chosen)
    drowned = _drowned(graph, _ranges(cache))
    extra = [n for nodes in drowned.values() for n in nodes if n not in chosen]
    for why, nodes in drowned.items() if extra else ():
        context.say(f"keeping {len(nodes)} nodes in float: {why}")
    if extra or calibrated:
        unread = run([*chosen, *extra])
    quantized = onnx.load(str(target))  # once, for both changes to what quantize_static wrote
    rounded = round_weights(quantized, pre, feeds, context.say) if config.rounding == "gptq" else None
    unclamped = _outputs_in_float(quantized)
    if unclamped or (rounded and rounded["layers"]):
        save_model(quantized, target, external=is_large(pre))
    del quantized
    if rounded and rounded["layers"]:
        before, after = rounded["error"]
        context.say(f"re-rounded {rounded['layers']} of {rounded['of']} layers: {after / before:.2g}× the output error "
                    "that rounding to the nearest levels makes")
    kept_float = [{"nodes": nodes, "why": why} for why, nodes in drowned.items()]
    if unread:
        context.say(f"keeping {len(unread)} nodes without int8 kernels' readers in float (their outputs are read in float)")
        kept_float.append({"nodes": unread, "why": _UNREAD})
    if unclamped:
        context.say(f"writing {len(unclamped)} graph outputs in float: {', '.join(unclamped)}")
        kept_float.append({"outputs": unclamped, "why": _CLAMPED})
    return {
        **options, "format": "QDQ", "smooth": config.smooth, **({"smoothed": smoothing[1]} if smoothing else {}), "per_channel": config.per_channel, "reduce_range": reduce_range, **({"excluded": chosen} if chosen else {}),
        **({"excluded_not_found": unknown} if unknown else {}), **({"kept_float": kept_float} if kept_float else {}),
        "calibration": {"method": config.method, "samples": len(feeds), "data": origin},
        "rounding": {"method": config.rounding, **(rounded or {})},
        **({"bits": {"activations": config.activation_bits, "weights": config.weight_bits}} if wide_bits(config) else {}),
        "ops": op_report(pre, target),
    }


def wide_bits(config: Int8Static) -> bool:
    """Whether a side of `config` is 16-bit (a diagnosis, not an int8 variant)."""
    return 16 in (config.activation_bits, config.weight_bits)


def _quantize_static(pre: Path, target: Path, feeds: list[dict[str, np.ndarray]], config: Int8Static, reduce_range: bool,
                     op_types: list[str], excluded: list[str], cache: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    wide = wide_bits(config)
    quantize_static(
        str(pre), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=reduce_range,
        calibrate_method=method[config.method], activation_type=QuantType.QUInt16 if config.activation_bits == 16 else QuantType.QUInt8,
        weight_type=QuantType.QInt16 if config.weight_bits == 16 else QuantType.QInt8,
        # a MatMul or Gemm whose readers are float computes in int8 and writes float (MatMulIntegerToFloat);
        # 16-bit QDQ needs onnxruntime's own QuantizeLinear/DequantizeLinear below opset 21
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"], **({"UseQDQContribOps": True} if wide else {})},
        use_external_data_format=is_large(pre), nodes_to_exclude=excluded, op_types_to_quantize=op_types, calibration_cache_path=str(cache),
    )


_UNREAD = ("read in float: their outputs go to float ops or out of the graph, so quantizing them would only round "
           "what is dequantized again")


_CLAMPED = ("graph outputs written in float by the node that makes them (its weights and inputs int8): quantized, "
            "an output would be clamped to its calibrated range and rounded to 256 levels for nobody but the user to read")


def _outputs_in_float(proto: Any) -> list[str]:
    """Drops, in place, the QuantizeLinear/DequantizeLinear pair quantize_static puts between a node
    and a graph output (a Conv's: a MatMul's or Gemm's is float already), so the node writes the
    output in float: a held-out value past the calibrated range is otherwise clamped to it. Returns
    the outputs."""
    graph = proto.graph
    makers = {o: node for node in graph.node for o in node.output}
    readers = readers_of(graph)
    unclamped = []
    for output in graph.output:
        dequantize = makers.get(output.name)
        quantize = makers.get(dequantize.input[0]) if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] not in makers:
            continue
        value = quantize.input[0]
        for node in graph.node:  # the float value takes the output's name, wherever it is made or read
            node.output[:] = [output.name if name == value else name for name in node.output]
            node.input[:] = [output.name if name == value else name for name in node.input]
        graph.node.remove(dequantize)
        if len(readers.get(quantize.output[0], [])) == 1:
            graph.node.remove(quantize)
        unclamped.append(output.name)
    if unclamped:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        for tensor in [t for t in graph.initializer if t.name not in read]:  # the pair's scales and zero points
            graph.initializer.remove(tensor)
    return unclamped


def _read_in_float(graph: Any, op_types: list[str], excluded: set[str]) -> list[str]:
    """The nodes of `op_types` without weights (an Add, a Softmax, a Transpose) not in `excluded`
    whose outputs some float op or the graph's output reads: their int8 kernel would need a
    dequantize after it, so quantizing them only rounds (a residual sum that a layer norm reads)."""
    weights = {t.name for t in graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    outputs = {o.name for o in graph.output}
    quantized = {n.name for n in graph.node if n.op_type in op_types and n.name not in excluded}
    unread = []
    for node in reversed(graph.node):  # readers before makers: one pass settles a chain
        # (an embedding table's Gather too: quantized, its table is stored in 8 bits)
        weighted = (node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in weights) or (
            node.op_type == "Gather" and node.input[0] in weights)
        if node.name not in quantized or weighted:
            continue
        if any(o in outputs or any(r not in quantized for r in readers.get(o, [])) for o in node.output):
            quantized.discard(node.name)
            unread.append(node.name)
    return unread[::-1]


def _op_types(graph: Any) -> list[str]:
    """The graph's op types that quantize_static would quantize and the CPU provider runs on int8
    (an empty list would mean every op to quantize_static, so a graph with none gets MatMul)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    present = {node.op_type for node in graph.node}
    return sorted((present & INT8_KERNEL_OPS & (set(QDQRegistry) | set(QLinearOpsRegistry))) or {"MatMul"})


def _ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """{tensor: (lowest, highest)} as calibrated (the cache quantize_static wrote)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = {}
    for name, data in load_tensors_data(cache).data.items():
        low, high = data.range_value
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


def _drowned(graph: Any, ranges: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """{why: nodes to keep in float} for each Add or Sub one of whose inputs spans less than one
    8-bit step of the sum's calibrated range, such as scores plus an attention mask of finfo.min:
    quantizing the sum rounds that input away whole. The sum and the input that sets its range are
    then not quantized at all: their makers and readers (a Softmax, the mask's Where) stay float."""
    readers: dict[str, list[str]] = {}
    makers = {o: node.name for node in graph.node for o in node.output}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)

    def span(name: str) -> float:
        low, high = ranges[name]
        return max(high, 0.0) - min(low, 0.0)  # uint8 ranges always hold 0

    drowned: dict[str, list[Any]] = {}  # the input that sets a sum's range: [(sum, the input it drowns)]
    for node in graph.node:
        if node.op_type not in ("Add", "Sub") or len(node.input) != 2 or not all(n in ranges for n in (*node.input, node.output[0])):
            continue
        small, large = sorted(node.input, key=span)
        if span(small) < span(node.output[0]) / 255:
            drowned.setdefault(large, []).append((node.output[0], small))
    found = {}
    for large, sums in drowned.items():
        low, high = ranges[large]
        why = (f"{large} reaches {low if abs(low) > abs(high) else high:.3g}: added to {', '.join(small for _, small in sums)}, "
               "it makes the sum's 8-bit step wider than all of the other side, which would round to 0")
        tensors = [large, *(total for total, _ in sums)]
        found[why] = list(dict.fromkeys([*(makers[t] for t in tensors if t in makers), *(r for t in tensors for r in readers.get(t, []))]))
    return found


def static_applies(bundle: Bundle, reference: ModelSpec) -> str | None:
    """Why int8-static is worth building for this bundle (convolutions, which dynamic int8 leaves in
    fp32, or a real calibration set), or None."""
    import onnx

    proto = onnx.load(str(bundle.variant_path("fp32")), load_external_data=False)
    if any(node.op_type == "Conv" for node in proto.graph.node):
        return "the model has convolutions, which only static int8 quantizes"
    if reference.calibration_data is not None:
        return "the model has a calibration set"
    return None
