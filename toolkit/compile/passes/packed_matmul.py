"""Rule: MatMuls that read the same input with constant weights become one MatMul and a Split.

A transformer layer projects the same normalised hidden state several times: queries, keys and
values, and in a gated MLP the gate and up projections. Decoding one token at a time each of those
is a matrix-vector product that costs little next to the session's per-node work, so one wide
product over the weights concatenated along N does the same arithmetic in fewer kernels, each with
more columns to share between threads. onnxruntime-genai's model builder packs them the same way.
On a 124M LLaMA a decode step got 1.5-5% faster for it, within 2% of onnxruntime-genai's graph
(benchmarks/RESULTS.md, "Decode step"). The arithmetic of each output column is unchanged: outputs
are bit-identical.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from toolkit._onnx import default_opset

__all__ = ["pack_sibling_matmuls"]


def pack_sibling_matmuls(proto: Any) -> int:
    """Replaces each group of two or more MatMuls sharing their first input, whose second inputs are
    2-D initializers of one dtype (not overridable graph inputs), by a MatMul over the weights
    concatenated on the last axis and a Split that yields the original outputs, in place; returns
    the number of groups packed. The replaced weights stay where something else reads them."""
    from onnx import helper, numpy_helper

    if default_opset(proto) < 13:
        return 0  # Split takes its sizes as an input from opset 13
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    weights = {t.name: t for t in graph.initializer if t.name not in inputs and len(t.dims) == 2}
    groups: dict[tuple[str, int, int], list[Any]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in weights:
            weight = weights[node.input[1]]
            groups.setdefault((node.input[0], weight.dims[0], weight.data_type), []).append(node)
    replacement: dict[int, list[Any]] = {}
    dropped: set[int] = set()
    taken = {t.name for t in graph.initializer} | {out for node in graph.node for out in node.output}
    reads = Counter(name for node in graph.node for name in node.input) + Counter(o.name for o in graph.output)
    for members in groups.values():
        if len(members) < 2:
            continue
        arrays = [numpy_helper.to_array(weights[m.input[1]]) for m in members]
        stem = _unique(taken, f"{members[0].name or members[0].output[0]}_packed")
        taken |= {f"{stem}_{suffix}" for suffix in _SUFFIXES}
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{stem}_weight"))
        graph.initializer.append(numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{stem}_sizes"))
        replacement[id(members[0])] = [
            helper.make_node("MatMul", [members[0].input[0], f"{stem}_weight"], [f"{stem}_output"], name=stem),
            helper.make_node("Split", [f"{stem}_output", f"{stem}_sizes"], [m.output[0] for m in members], name=f"{stem}_split", axis=-1),
        ]
        dropped.update(id(m) for m in members[1:])
        del arrays
        # a weight only its MatMul read goes now, not at the pruning after: the model is never held twice
        _remove_initializers(graph, {m.input[1] for m in members if reads[m.input[1]] == 1})
    if not replacement:
        return 0
    # The Split stands where the first member stood: every member's readers come after that one.
    nodes = [new for node in graph.node if id(node) not in dropped for new in replacement.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replacement)


def _remove_initializers(graph: Any, names: set[str]) -> None:
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in names:
            del graph.initializer[index]


_SUFFIXES = ("weight", "sizes", "output")  # the names a packed group adds: stem_weight, stem_sizes, stem_output


def _unique(taken: set[str], stem: str) -> str:
    name, n = stem, 1
    while any(f"{name}_{suffix}" in taken for suffix in _SUFFIXES):
        name, n = f"{stem}{n}", n + 1
    return name
