"""Moving activation outliers into weights before int8 (SmoothQuant, Xiao et al. 2023).

A few channels of a transformer's activations run 50-200× larger than the rest (a GELU's output, a
layer norm's output with a large gain). int8 gives an activation one scale per tensor, spent on those
channels, and every other channel rounds to a few levels. A MatMul reading x computes the same thing
with x / s and its weight rows scaled by s, for any positive per-channel s: the division lowers the
outlier channels, and the weights, quantized per output channel, absorb them, where they cost less.

The division folds into the layer norm that makes x where there is one (its gain and bias divided by
s: free); elsewhere it is a Mul, 1/N of the MatMul's own work for N output channels. Each activation
is smoothed only where that measures better: the int8 error of the products on calibration data (the
activation and the weights quantized as the variant quantizes them), for s = max|x_k|^a /
max|w_k|^(1 - a) at each a in ALPHAS, against the error unsmoothed, keeping the least.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALPHAS", "smooth", "smoothed"]

ALPHAS = (0.25, 0.5, 0.75)  # SmoothQuant's migration strength: 0.5 in the paper, the others where the weights or the activations are harder
_SERIALIZABLE = 1_900_000_000  # bytes: under protobuf's 2 GiB message limit, the largest size smoothing is made for
_ROWS, _COLUMNS = 1024, 256  # activation rows per tensor and output columns per weight the errors are measured on
# (op_type: index of the gain input, index of the bias input or None): normalisations whose output 0 the division folds into
_NORMS = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1, None),
          "SkipLayerNormalization": (2, 3), "SkipSimplifiedLayerNormalization": (2, None)}


@dataclass
class _Reader:
    node: Any
    weight: Any  # the initializer
    transposed: bool  # a Gemm with transB: rows of the weight are its output channels


@dataclass
class _Stats:
    low: list[np.ndarray]  # per sample, per channel
    high: list[np.ndarray]
    rows: list[np.ndarray]  # per sample, a few rows


def smooth(model_file: Path, target: Path, feeds: list[dict[str, np.ndarray]], *, dynamic: bool, weight_max: int = 127) -> list[dict[str, Any]]:
    """Writes `model_file` to `target` with the activations that weighted MatMul/Gemm read smoothed
    where that lowers their int8 error on `feeds` (nothing, where none does); returns one record per
    smoothed activation.
    `dynamic`: activations quantized per call (each feed its own range), else over all feeds (a
    calibrated range). `weight_max`: the weights' largest level (127, or 63 with a reduced range)."""
    import onnx
    from onnx import numpy_helper

    from toolkit._onnx import save_model
    from toolkit.compile._memory import release_memory

    proto = onnx.load(str(model_file))
    graph = proto.graph
    readers_of: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers_of[name] = readers_of.get(name, 0) + 1
    groups = _candidates(graph, readers_of)
    if not groups:
        return []
    stats = _statistics(proto, list(groups), feeds)
    makers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    records, muls = [], {}
    rescaled: dict[str, np.ndarray] = {}  # weight → what to multiply it by, as it is written out
    for name, readers in groups.items():
        arrays = [numpy_helper.to_array(r.weight).astype(np.float32) for r in readers]
        rows = [a.T if r.transposed else a for a, r in zip(arrays, readers, strict=True)]  # [K, N] each
        chosen = _choose(stats.pop(name), rows, dynamic, weight_max)  # each activation's sample rows go once used
        if chosen is None:
            continue
        alpha, scale, before, after = chosen
        for reader in readers:
            rescaled[reader.weight.name] = (scale[None, :] if reader.transposed else scale[:, None]).astype(np.float32)
        del arrays, rows
        smoothed = f"{name}__smoothed"
        maker = makers.get(name)
        folded = maker is not None and _fold(graph, maker, name, scale, readers_of, len(readers), outputs)
        if not folded:
            inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{name}__smoothing")
            graph.initializer.append(inverse)
            muls[smoothed] = onnx.helper.make_node("Mul", [name, inverse.name], [smoothed], name=f"{name}__smooth")
        else:
            maker.output[list(maker.output).index(name)] = smoothed
        for reader in readers:
            reader.node.input[0] = smoothed
        records.append({"tensor": name, "readers": [r.node.name for r in readers], "alpha": alpha,
                        "into": maker.name if folded else "Mul", "nodes": [] if folded else [f"{name}__smooth"],
                        "error": [round(before, 5), round(after, 5)]})
    if muls:
        _insert_before_readers(graph, muls)
    if records:
        release_memory()  # the statistics' pages, before the model is written
        # each rescaled weight made as it is written: rescaled in the loaded model, each would be held
        # twice (protobuf frees a message's replaced bytes only with the message)
        save_model(proto, target, lambda tensor: numpy_helper.from_array(numpy_helper.to_array(tensor) * rescaled[tensor.name], tensor.name)
                   if tensor.name in rescaled else tensor)
    return records


def _candidates(graph: Any, uses: dict[str, int]) -> dict[str, list[_Reader]]:
    """{activation: the MatMul/Gemm nodes that read it with a 2-D constant weight of their own}
    (`uses`: how many nodes read each tensor)."""
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[str, list[_Reader]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type != 1 or uses[weight.name] != 1 or node.input[0] in initializers:
            continue
        attributes = {a.name: a.i for a in node.attribute}
        if attributes.get("transA", 0):
            continue
        groups.setdefault(node.input[0], []).append(_Reader(node, weight, bool(attributes.get("transB", 0))))
    return groups


def _statistics(proto: Any, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, _Stats]:
    """Per activation and feed: each channel's lowest and highest value, and a few rows. The weights
    go in with every feed, as inputs: the session then holds no copy of them, nor a packed one."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from toolkit._onnx import without_weights

    probe = without_weights(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    kept = {t.name for t in probe.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name not in kept}  # now inputs of the probe
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    stats = {name: _Stats([], [], []) for name in names}
    per_feed = max(1, _ROWS // max(len(feeds), 1))
    for feed in feeds:
        for name, value in zip(names, session.run(names, {**weights, **feed}), strict=True):
            matrix = value.reshape(-1, value.shape[-1]).astype(np.float32)
            stats[name].low.append(matrix.min(axis=0))
            stats[name].high.append(matrix.max(axis=0))
            step = max(1, len(matrix) // per_feed)
            stats[name].rows.append(matrix[::step][:per_feed])
    return stats


def _choose(stats: _Stats, weights: list[np.ndarray], dynamic: bool, weight_max: int) -> tuple[float, np.ndarray, float, float] | None:
    """(alpha, s, error before, error after) of the smoothing with the least int8 error, or None
    where none beats leaving the activation as it is."""
    peak_x = np.maximum(np.abs(np.stack(stats.low)).max(axis=0), np.abs(np.stack(stats.high)).max(axis=0))
    peak_w = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    usable = (peak_x > 0) & (peak_w > 0)
    if not usable.any():
        return None
    # each output column is quantized on its own: a spread of them measures the error as all would
    weights = [w[:, :: max(1, w.shape[1] // _COLUMNS)] for w in weights]
    before = _error(stats, weights, np.ones_like(peak_x), dynamic, weight_max)
    best = None
    for alpha in ALPHAS:
        scale = np.ones_like(peak_x)
        scale[usable] = peak_x[usable] ** alpha / peak_w[usable] ** (1 - alpha)
        scale = np.clip(scale, 1e-5, 1e5)
        error = _error(stats, weights, scale, dynamic, weight_max)
        if error < before and (best is None or error < best[3]):
            best = (alpha, scale, before, error)
    return best


def _error(stats: _Stats, weights: list[np.ndarray], scale: np.ndarray, dynamic: bool, weight_max: int) -> float:
    """Relative int8 error of x @ w over the kept rows, with x / scale quantized to uint8 (its
    range per feed if `dynamic`, else over all feeds) and w * scale per output channel to int8."""
    ranges = [(float((low / scale).min()), float((high / scale).max())) for low, high in zip(stats.low, stats.high, strict=True)]
    rows = stats.rows
    if not dynamic and len(rows) > 1:
        # a calibrated range meets inputs it was not calibrated on: ranges from half the feeds, the error
        # on the others, so that a smoothing whose range the other half overruns (and clips) shows it
        overall = (min(r[0] for r in ranges[::2]), max(r[1] for r in ranges[::2]))
        ranges, rows = [overall] * len(rows[1::2]), rows[1::2]
    quantized = np.concatenate([_uint8(part / scale, *span) for part, span in zip(rows, ranges, strict=True)])
    exact = np.concatenate(rows)
    wrong = total = 0.0
    for weight in weights:
        scaled = weight * scale[:, None]
        step = np.maximum(np.abs(scaled).max(axis=0), 1e-30) / weight_max
        reference = exact @ weight
        wrong += float(np.square(quantized @ (np.round(scaled / step) * step) - reference).sum())
        total += float(np.square(reference).sum())
    return float(np.sqrt(wrong / max(total, 1e-30)))


def _uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / 255 or 1.0
    zero = np.round(-low / step)
    return (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step


def _fold(graph: Any, maker: Any, name: str, scale: np.ndarray, readers_of: dict[str, int], readers: int, outputs: set[str]) -> bool:
    """Divides the gain and bias of the normalisation that makes `name` by `scale`, where it makes it
    as its output 0 for these readers only and holds them as initializers of its own."""
    from onnx import numpy_helper

    if maker.op_type not in _NORMS or list(maker.output).index(name) != 0 or readers_of.get(name) != readers or name in outputs:
        return False
    initializers = {t.name: t for t in graph.initializer}
    positions = [i for i in _NORMS[maker.op_type] if i is not None and i < len(maker.input) and maker.input[i]]
    tensors = [initializers.get(maker.input[i]) for i in positions]
    if any(t is None or readers_of.get(t.name) != 1 or tuple(t.dims) != (len(scale),) for t in tensors):
        return False
    for tensor in tensors:
        tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) / scale).astype(np.float32), tensor.name))
    return True


def _insert_before_readers(graph: Any, muls: dict[str, Any]) -> None:
    """Puts each Mul just before the first node that reads what it makes (after its input's maker)."""
    ordered = []
    for node in graph.node:
        ordered += [muls.pop(name) for name in node.input if name in muls]
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def smoothed(pre: Path, feeds: list[dict[str, np.ndarray]], *, dynamic: bool, reduce_range: bool) -> tuple[Path, list[dict[str, Any]]] | None:
    """(`pre` smoothed, or `pre` itself where nothing was; the records) (see `smooth`), made once
    beside it per kind of activation range, weight range and number of feeds: a build's
    quantizations and a repair's attempts share it. None for a model past protobuf's 2 GiB: smoothing
    has not been tried at that size (its statistics run holds no weights, but it rewrites them in
    the loaded model)."""
    import json

    from toolkit._onnx import external_files

    if sum(p.stat().st_size for p in [pre, *(pre.parent / f for f in external_files(pre))]) > _SERIALIZABLE:
        return None
    stem = f"smoothed-{'dynamic' if dynamic else 'static'}-{'7' if reduce_range else '8'}bit-{len(feeds)}"
    target, record = pre.parent / f"{stem}.onnx", pre.parent / f"{stem}.json"
    if record.is_file():
        records = json.loads(record.read_text())
    else:
        records = smooth(pre, target, feeds, dynamic=dynamic, weight_max=63 if reduce_range else 127)
        record.write_text(json.dumps(records))
    return (target if records else pre), records
