"""Rule: a Reshape that only drops unit dims becomes a Squeeze.

Between stacked recurrent layers torch's exporter writes a Transpose plus a Reshape whose target is
computed at run time from Shape, Gather, Slice, Mul and Concat nodes; with dynamic dims onnxruntime
cannot prove what it does. Shape tensors are evaluated here with each unknown dim standing for
itself (axis i of tensor t), so the proof holds for every input size; only static dims from ONNX
shape inference are taken as known. Where a Transpose before it then keeps the order of the other
dims, the pair becomes one Squeeze of the Transpose's input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.compile.passes._graph import Constants, Dim, attribute, constants, infer_shape_facts, perm, subgraph_reads

__all__ = ["reshapes_to_squeezes"]


def reshapes_to_squeezes(proto: Any) -> int:
    """Rewrites every provably unit-dropping Reshape as a Squeeze, in place; returns how many."""
    from onnx import helper, numpy_helper

    from toolkit._onnx import default_opset

    ranks, static = infer_shape_facts(proto)
    graph = proto.graph
    known = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for name in [*(n for node in graph.node for n in node.input), *(o.name for o in graph.output), *subgraph_reads(graph)]:
        readers[name] = readers.get(name, 0) + 1

    def dim(name: str, axis: int) -> Dim:
        node = producer.get(name)
        order = perm(node, ranks.get(node.input[0])) if node is not None and node.op_type == "Transpose" else None
        if order:
            return dim(node.input[0], order[axis])
        return static.get((name, axis), (name, axis))

    values = _shape_values(graph, known, ranks, dim)
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
                    order = perm(source, ranks.get(source.input[0])) or []
                    kept = [order[i] for i in range(len(order)) if i not in axes]
                    if order and kept == sorted(kept):
                        squeeze = (source.input[0], sorted(order[a] for a in axes))
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




def _shape_values(graph: Any, constants: Constants, ranks: dict[str, int], dim) -> dict[str, list[Dim]]:
    """The 1-D int64 tensors the graph computes from shapes, element by element, where every step is
    one this evaluator knows (Shape, Gather, Slice, Concat, Mul, and the reshapes of a vector)."""
    values: dict[str, list[Dim]] = {n: [int(v) for v in np.ravel(constants[n])] for n in constants if constants.is_shape(n)}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        args = [values.get(name) for name in node.input]
        result: list[Dim] | None = None
        op = node.op_type
        if op == "Shape" and node.input[0] in ranks:
            rank = ranks[node.input[0]]
            start, end = (attribute(node, "start", 0), attribute(node, "end", rank))
            result = [dim(node.input[0], axis) for axis in range(rank)][slice(start, end)]
        elif op == "Gather" and args[0] is not None and args[1] is not None and attribute(node, "axis", 0) == 0:
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
