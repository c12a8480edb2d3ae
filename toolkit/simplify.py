"""Removes shape glue that exporters write and onnxruntime's optimizers keep, because with dynamic
dims they cannot prove it does nothing.

torch's exporter writes, for a stacked `nn.LSTM`, a zero initial state expanded to the batch size
and sliced per layer, and between layers a Transpose plus a Reshape whose target shape is computed
at run time from Shape, Gather, Slice, Mul and Concat nodes. The reference LSTM's graph, after
onnxruntime's own optimizations, still has 46 nodes around its three LSTM kernels; these two rewrites,
which prove what the glue computes, leave 10:

- an initial state of LSTM, GRU or RNN that is provably all zeros is dropped: the operator's own
  default is zeros;
- a Reshape whose target evaluates, symbolically, to its input's dims with unit dims left out
  becomes a Squeeze; with a Transpose before it that then keeps the order of the other dims, the
  pair becomes one Squeeze of the Transpose's input.

Shape tensors are evaluated with each unknown dim standing for itself (axis i of tensor t), so the
proof holds for every input size; only static dims from ONNX shape inference are taken as known.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["simplify"]

# Initial-state inputs, by (domain, operator): LSTM's initial_h and initial_c, GRU's and RNN's initial_h.
_STATE_INPUTS = {("", "LSTM"): (5, 6), ("com.microsoft", "DynamicQuantizeLSTM"): (5, 6), ("", "GRU"): (5,), ("", "RNN"): (5,)}
# Operators that pass their first input's values through, rearranged or repeated: zeros stay zeros.
_VALUE_PRESERVING = {"Expand", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast", "Tile"}

Dim = int | tuple[str, int]  # a static size, or axis i of tensor t as it is at run time


def simplify(proto: Any) -> dict[str, int]:
    """Applies both rewrites to `proto` in place and drops the nodes left unread; returns how many of
    each it made."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except ValueError:  # over protobuf's 2 GiB: the shapes the graph records are used as they are
        inferred = proto
    ranks, static = _shape_facts(inferred.graph)
    constants = _constants(proto.graph)
    counts = {"zero initial states": _drop_zero_states(proto.graph, constants),
              "Reshape to Squeeze": _reshapes_to_squeezes(proto, constants, ranks, static)}
    if any(counts.values()):
        _prune(proto.graph)
    return counts


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Initializers and Constant outputs, less the initializers a caller may override (graph inputs too)."""
    from onnx import numpy_helper

    inputs = {i.name for i in graph.input}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _shape_facts(graph: Any) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Rank of every tensor whose rank is known, and each dim that shape inference found static."""
    ranks: dict[str, int] = {}
    static: dict[tuple[str, int], int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        ranks[value.name] = len(tensor.shape.dim)
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                static[value.name, axis] = dim.dim_value
    return ranks, static


def _drop_zero_states(graph: Any, constants: dict[str, np.ndarray]) -> int:
    producer = {out: node for node in graph.node for out in node.output}

    def is_zero(name: str) -> bool:
        while name not in constants:
            node = producer.get(name)
            if node is None or node.op_type not in _VALUE_PRESERVING or node.domain not in ("", "ai.onnx"):
                return False
            name = node.input[0]
        return not np.any(constants[name])

    dropped = 0
    for node in graph.node:
        for index in _STATE_INPUTS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type), ()):
            if index < len(node.input) and node.input[index] and is_zero(node.input[index]):
                node.input[index] = ""
                dropped += 1
    return dropped


def _reshapes_to_squeezes(proto: Any, constants: dict[str, np.ndarray], ranks: dict[str, int],
                          static: dict[tuple[str, int], int]) -> int:
    from onnx import helper, numpy_helper

    from toolkit._onnx import default_opset

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for name in [*(n for node in graph.node for n in node.input), *(o.name for o in graph.output), *_subgraph_reads(graph)]:
        readers[name] = readers.get(name, 0) + 1

    def dim(name: str, axis: int) -> Dim:
        node = producer.get(name)
        perm = _perm(node, ranks.get(node.input[0])) if node is not None and node.op_type == "Transpose" else None
        if perm:
            return dim(node.input[0], perm[axis])
        return static.get((name, axis), (name, axis))

    values = _shape_values(graph, constants, ranks, dim)
    opset = default_opset(proto)
    rewritten = 0
    nodes = []
    for node in graph.node:
        squeeze = None
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and node.input[0] in ranks:
            data, target = node.input[0], values.get(node.input[1])
            axes = _dropped_unit_axes([dim(data, i) for i in range(ranks[data])], target)
            if axes is not None:
                squeeze = (data, axes)
                source = producer.get(data)
                if source is not None and source.op_type == "Transpose" and readers.get(data) == 1:
                    perm = _perm(source, ranks.get(source.input[0])) or []
                    kept = [perm[i] for i in range(len(perm)) if i not in axes]
                    if perm and kept == sorted(kept):
                        squeeze = (source.input[0], sorted(perm[a] for a in axes))
        if squeeze is None:
            nodes.append(node)
            continue
        data, axes = squeeze
        stem = node.name or node.output[0]
        if opset >= 13:
            graph.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), f"{stem}_squeeze_axes"))
            nodes.append(helper.make_node("Squeeze", [data, f"{stem}_squeeze_axes"], [node.output[0]], name=f"{stem}_squeeze"))
        else:  # axes were an attribute before opset 13
            nodes.append(helper.make_node("Squeeze", [data], [node.output[0]], name=f"{stem}_squeeze", axes=axes))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _shape_values(graph: Any, constants: dict[str, np.ndarray], ranks: dict[str, int], dim) -> dict[str, list[Dim]]:
    """The 1-D int64 tensors the graph computes from shapes, element by element, where every step is
    one this evaluator knows (Shape, Gather, Slice, Concat, Mul, and the reshapes of a vector)."""
    values: dict[str, list[Dim]] = {n: [int(v) for v in np.ravel(a)] for n, a in constants.items()
                                    if a.dtype == np.int64 and a.ndim <= 1}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        args = [values.get(name) for name in node.input]
        result: list[Dim] | None = None
        op = node.op_type
        if op == "Shape" and node.input[0] in ranks:
            rank = ranks[node.input[0]]
            start, end = (_attribute(node, "start", 0), _attribute(node, "end", rank))
            result = [dim(node.input[0], axis) for axis in range(rank)][slice(start, end)]
        elif op == "Gather" and args[0] is not None and args[1] is not None and _attribute(node, "axis", 0) == 0:
            size = len(args[0])
            if all(isinstance(i, int) and -size <= i < size for i in args[1]):
                result = [args[0][i] for i in args[1]]
        elif op == "Slice" and len(args) >= 3 and all(a is not None for a in args) and _unit_step(args):
            starts, ends = args[1], args[2]
            if len(starts) == len(ends) == 1 and isinstance(starts[0], int) and isinstance(ends[0], int):
                result = args[0][starts[0]:ends[0]]  # ONNX's clamping of a positive-step slice is Python's
        elif op == "Concat" and all(a is not None for a in args):
            result = [d for a in args for d in a]
        elif op == "Mul" and all(a is not None and len(a) == 1 for a in args):
            a, b = args[0][0], args[1][0]
            result = [a * b] if isinstance(a, int) and isinstance(b, int) else [b] if a == 1 else [a] if b == 1 else None
        elif op in ("Reshape", "Squeeze", "Unsqueeze", "Identity") and args[0] is not None and len(args[0]) == 1:
            result = args[0]
        if result is not None:
            values[node.output[0]] = result
    return values


def _unit_step(args: list[list[Dim] | None]) -> bool:
    return (len(args) < 4 or args[3] == [0]) and (len(args) < 5 or args[4] == [1])


def _dropped_unit_axes(dims: list[Dim], target: list[Dim] | None) -> list[int] | None:
    """The axes to squeeze when `target` is `dims` with some static 1s left out, in order; else None.
    A target of 0 or -1 entries is left alone: their meaning depends on the reshape's rules."""
    if target is None or len(target) >= len(dims) or any(t in (0, -1) for t in target):
        return None
    axes, t = [], 0
    for axis, d in enumerate(dims):
        if t < len(target) and target[t] == d:
            t += 1
        elif d == 1:
            axes.append(axis)
        else:
            return None
    return axes if t == len(target) else None


def _perm(node: Any, rank: int | None) -> list[int] | None:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm if perm is not None else None if rank is None else list(reversed(range(rank)))


def _attribute(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _prune(graph: Any) -> None:
    """Drops nodes nothing reads, and the initializers and shape records only they read."""
    needed = {o.name for o in graph.output} | _subgraph_reads(graph)
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = needed | {out for node in kept for out in node.output}
    records = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(records)


def _subgraph_reads(graph: Any) -> set[str]:
    """Every name read inside the graph's subgraphs (If, Loop, Scan bodies), outer-scope names among them."""
    from onnx import AttributeProto

    reads: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                reads |= {n for inner in body.node for n in inner.input} | {o.name for o in body.output} | _subgraph_reads(body)
    return reads

