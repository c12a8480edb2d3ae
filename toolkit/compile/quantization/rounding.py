"""Weights rounded for what the layer computes, not each to its nearest level (GPTQ, Frantar et
al. 2022, at 8 bits): each weight column's rounding error is carried into the columns not yet
rounded, weighed by how the layer's inputs correlate (H = XᵀX over the calibration samples), so
that the rounding errors of a row cancel in its outputs instead of adding up. Same scales, same
int8 values range, same graph: only which level each weight takes changes.

It runs on a QDQ model as quantize_static wrote it: every Conv (one group, 1-D or 2-D), Gemm and
MatMul whose weight is a DequantizeLinear of an int8 initializer with zero point 0. The inputs each
of those ops reads are taken from the QDQ model itself on the calibration samples, activations
quantized as they will be, so a layer's rounding answers the errors its inputs already carry.

Round-to-nearest is what onnxruntime's quantizer does; on small CNNs it leaves the weights' share
of the error several times larger than this rounding does (benchmarks/RESULTS.md, "Real pretrained
CNNs"). H is kept block-diagonal (blocks of about `_BLOCK` columns) so that a convolution with 65,536
inputs per output needs 268 MB, not 34 GB; within a block the correction is exact. Every layer's H
is made in one pass over the samples, so they are all held at once (450 MB on the 22M-parameter
CREPE, whose widest convolution is that one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["round_weights"]

_BLOCK = 512  # columns of H kept together: its memory is (inputs per output) × _BLOCK floats
_ROWS_PER_SAMPLE = 512  # a convolution's positions kept per sample (see _spread)
_SAMPLES_PER_PRODUCT = 8  # samples whose rows go into one product: fewer, larger matrix products
_LAZY = 64  # columns rounded one by one before their errors go onto the rest of the block at once
_DAMP = 0.01  # of H's mean diagonal, added to it: an input the samples never vary must not divide by 0


@dataclass
class _Layer:
    node: str
    weight: str  # the int8 initializer
    scale: np.ndarray  # per output row (broadcast when per tensor)
    rows_first: bool  # the initializer's axis 0 is the outputs (Conv, Gemm with transB); else (in, out)
    data: str  # the tensor the op multiplies by the weight
    conv: dict[str, Any] | None  # kernel, strides, pads, dilations for a Conv
    blocks: list[tuple[int, int]]  # ranges of the weight's input columns that H keeps together
    hessian: list[np.ndarray] | None = None  # one (block, block) matrix per block


def round_weights(proto: Any, float_file: Path, feeds: Sequence[dict[str, np.ndarray]],
                  say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Re-rounds the int8 weights of the QDQ model `proto` in place, from the float weights of
    `float_file` (the model it was quantized from; its nodes have the same names). Returns
    {"layers": re-rounded, "of": eligible, "error": [nearest, re-rounded]}: the re-rounded layers'
    output error from rounding their weights on the calibration samples (summed squares, as H weighs
    them), to nearest and as re-rounded."""
    from onnx import numpy_helper

    from toolkit._onnx import model_bytes

    layers = _layers(proto.graph)
    if not layers or model_bytes(proto) >= 2**31:  # onnxruntime takes a model from memory only below protobuf's 2 GiB
        return {"layers": 0, "of": len(layers), **({"note": "not re-rounded: the model is past protobuf's 2 GiB"} if layers else {})}
    say(f"rounding the int8 weights of {len(layers)} layers for their outputs on {len(feeds)} samples (GPTQ)")
    originals = _float_weights(float_file, {layer.node for layer in layers})
    _accumulate(proto, layers, feeds)
    weights = {t.name: t for t in proto.graph.initializer}
    before = after = 0.0
    changed = 0
    for layer in layers:
        if layer.node not in originals:
            continue
        tensor = weights[layer.weight]
        stored = numpy_helper.to_array(tensor)
        w = originals[layer.node].astype(np.float64)
        w = w.reshape(w.shape[0], -1) if layer.rows_first else w.T
        bound = int(np.abs(stored.astype(np.int32)).max())
        nearest = stored.reshape(stored.shape[0], -1) if layer.rows_first else stored.T
        new = _gptq(w, layer.scale, layer.blocks, layer.hessian, bound)
        err_nearest, err_new = (_error(w, q * layer.scale[:, None], layer.blocks, layer.hessian) for q in (nearest.astype(np.float64), new))
        if err_new >= err_nearest:  # never worse than what the quantizer wrote
            continue
        before, after, changed = before + err_nearest, after + err_new, changed + 1
        new = new.reshape(stored.shape) if layer.rows_first else new.T
        tensor.CopyFrom(numpy_helper.from_array(new.astype(stored.dtype), layer.weight))
    return {"layers": changed, "of": len(layers), "error": [before, after]}


def _layers(graph: Any) -> list[_Layer]:
    """The weighted ops whose weight is a DequantizeLinear of an int8 initializer, zero point 0."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    reads = Counter(name for n in graph.node for name in n.input)
    layers = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in dequantized:
            continue
        dq = dequantized[node.input[1]]
        weight = inits.get(dq.input[0])
        if weight is None or weight.data_type != TensorProto.INT8 or dq.input[1] not in inits:
            continue
        if reads[node.input[1]] > 1 or reads[dq.input[0]] > 1:  # a weight shared by layers is rounded for none of them alone
            continue
        if len(dq.input) > 2 and dq.input[2] and np.any(numpy_helper.to_array(inits[dq.input[2]])):
            continue
        attrs = _attributes(node)
        axis = _attributes(dq).get("axis", 1)
        dims = list(weight.dims)
        if node.op_type == "Conv":
            if attrs.get("group", 1) != 1 or len(dims) not in (3, 4) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            spatial = len(dims) - 2
            conv = {"kernel": dims[2:], "strides": attrs.get("strides", [1] * spatial), "dilations": attrs.get("dilations", [1] * spatial),
                    "pads": attrs.get("pads", [0] * 2 * spatial)}
            rows_first = True
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or len(dims) != 2:
                continue
            conv, rows_first = None, bool(attrs.get("transB", 0))
        else:
            if len(dims) != 2:
                continue
            conv, rows_first = None, False
        outputs = dims[0] if rows_first else dims[1]
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).ravel()
        if scale.size not in (1, outputs) or (scale.size > 1 and axis % len(dims) != (0 if rows_first else 1)):
            continue
        inputs = int(np.prod(dims[1:])) if rows_first else dims[0]
        # a convolution's blocks are whole input channels, so each block's patches come from a slice of x
        width = int(np.prod(dims[2:])) * max(1, _BLOCK // int(np.prod(dims[2:]))) if conv else _BLOCK
        blocks = [(i, min(i + width, inputs)) for i in range(0, inputs, width)]
        layers.append(_Layer(node.name, weight.name, np.broadcast_to(scale, (outputs,)).copy(), rows_first, node.input[0], conv, blocks))
    return layers


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _float_weights(float_file: Path, nodes: set[str]) -> dict[str, np.ndarray]:
    """{node: its float weight} of the model quantize_static read."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(float_file))
    inits = {t.name: t for t in proto.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in proto.graph.node if n.name in nodes and len(n.input) > 1 and n.input[1] in inits}


def _accumulate(proto: Any, layers: list[_Layer], feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Each layer's H = XᵀX (block-diagonal) over the columns its weight multiplies, X being what the
    QDQ model feeds it on `feeds`."""
    import onnx
    import onnxruntime as ort

    wanted = list(dict.fromkeys(layer.data for layer in layers))
    known = len(proto.graph.output)
    outputs = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted if name not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the values as the QDQ graph defines them
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del proto.graph.output[known:]
    pending: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(feeds):  # one at a time: a sample's batch axis need not be the first
        pending.append(dict(zip(wanted, session.run(wanted, feed), strict=True)))
        if len(pending) < _SAMPLES_PER_PRODUCT and i + 1 < len(feeds):
            continue
        for layer in layers:
            products = []
            for block in layer.blocks:
                columns = np.concatenate([_spread(_columns(values[layer.data], layer.conv, block)) for values in pending]).astype(np.float32)
                products.append((columns.T @ columns).astype(np.float64))
            layer.hessian = products if layer.hessian is None else [h + p for h, p in zip(layer.hessian, products, strict=True)]
        pending.clear()


def _spread(rows: np.ndarray) -> np.ndarray:
    """At most `_ROWS_PER_SAMPLE` of a sample's rows, evenly spread (a convolution's positions): H
    needs many more rows than it has columns, not every position of every sample."""
    return rows[:: max(1, -(-len(rows) // _ROWS_PER_SAMPLE))]


def _columns(x: np.ndarray, conv: dict[str, Any] | None, block: tuple[int, int]) -> np.ndarray:
    """The `block` of columns the weight multiplies, a row per output position: x's last axis for a
    MatMul/Gemm; a convolution's patches (channels, then kernel positions: the order of its weight's
    flattened input axes), from the block's channels of x."""
    if conv is None:
        return x.reshape(-1, x.shape[-1])[:, block[0]:block[1]]
    kernel, strides, dilations, pads = conv["kernel"], conv["strides"], conv["dilations"], conv["pads"]
    spatial = len(kernel)
    taps = int(np.prod(kernel))
    x = x[:, block[0] // taps:block[1] // taps]
    x = np.pad(x, [(0, 0), (0, 0), *((pads[a], pads[a + spatial]) for a in range(spatial))])  # ONNX pads: all begins, then all ends
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(2, 2 + spatial)))  # (N, C, *positions, *spans)
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))]
    # (N, *positions, C, *kernel) → a row per position
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    return windows.transpose(order).reshape(-1, x.shape[1] * taps)


def _gptq(w: np.ndarray, scale: np.ndarray, blocks: list[tuple[int, int]], hessian: list[np.ndarray], bound: int) -> np.ndarray:
    """w (outputs, inputs) as int levels of `scale` in [-bound, bound], each column's rounding error
    carried into the later columns of its block by H's inverse Cholesky factor (GPTQ's lazy batches:
    within `_LAZY` columns one by one, then onto the rest of the block in one product)."""
    rows = np.ascontiguousarray(w.T)  # a column of w per row: the loop reads and writes whole rows
    q = np.empty_like(rows)
    s = np.where(scale > 0, scale, 1.0)
    for (start, end), h in zip(blocks, hessian, strict=True):
        h = h.copy()
        dead = np.diag(h) == 0  # an input the samples never set: its weight multiplies 0
        h[dead, dead] = 1.0
        rows[start:end][dead] = 0.0
        h[np.diag_indices_from(h)] += _DAMP * np.mean(np.diag(h))
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # row j carries column j's error onto the later ones
        for lazy in range(0, end - start, _LAZY):
            stop = min(lazy + _LAZY, end - start)
            errors = np.empty((stop - lazy, rows.shape[1]))
            for j in range(lazy, stop):
                i = start + j
                q[i] = np.clip(np.round(rows[i] / s), -bound, bound)
                errors[j - lazy] = (rows[i] - q[i] * s) / upper[j, j]
                rows[i + 1:start + stop] -= np.outer(upper[j, j + 1:stop], errors[j - lazy])
            rows[start + stop:end] -= upper[lazy:stop, stop:].T @ errors
    return q.T


def _error(w: np.ndarray, rounded: np.ndarray, blocks: list[tuple[int, int]], hessian: list[np.ndarray]) -> float:
    """Σ over samples of |(w − rounded) x|², H's blocks only: the layer's output error from its rounding."""
    delta = w - rounded
    return float(sum(np.sum((delta[:, a:b] @ h) * delta[:, a:b]) for (a, b), h in zip(blocks, hessian, strict=True)))
