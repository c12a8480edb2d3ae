"""Rule: rotary position embeddings as transformers applies them, x·cos + rotate_half(x)·sin
with rotate_half(x) = concat(-x[..., h:], x[..., :h]), become onnxruntime's RotaryEmbedding
(com.microsoft): one kernel per queries or keys instead of two Slices, a Neg, a Concat, two Muls
and an Add, each writing the whole tensor.

RotaryEmbedding looks its angles up in a (positions, h) table by position id. The graph's cos and
sin are already computed per token (however the model scales its frequencies: linear, dynamic,
LLaMA 3, YaRN's attention factor), so the table here is the graph's own cos and sin, one row per
token of the step, and the position ids count those rows: the kernel reads exactly the values the
unfused graph multiplied by. This needs both halves of cos and sin equal, which holds when they are
Cos and Sin of one concat(freqs, freqs) on the last axis (transformers' `emb`), optionally cast,
unsqueezed, expanded or scaled by a constant; the rule checks that chain and applies nowhere
else. A partial rotary (Phi) slices its rotated part first, and the rule applies to that slice.

onnxscript's own rotary rule needs the frequencies in a MatMul form and then fuses grouped-query
attention, whose CPU kernel toolkit avoids (toolkit.compile.passes.before_fusion); this rule stays
before attention and leaves the rest of the graph as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit._onnx import default_opset
from toolkit.compile.passes._graph import constants, infer_shape_facts, sole_reader

__all__ = ["fuse_rotary_embeddings"]

_PASS_THROUGH = ("Unsqueeze", "Cast", "Identity", "Expand")  # leave the last axis as it is


def fuse_rotary_embeddings(proto: Any) -> int:
    """Replaces each rotary embedding's Slices, Neg, Concat, Muls and Add by a RotaryEmbedding, in
    place; returns how many. The embedding's output keeps its name; what only it read is left for
    the pass list's pruning."""
    from onnx import helper, numpy_helper

    if default_opset(proto) < 15:
        return 0  # Shape takes start and end from opset 15
    graph = proto.graph
    values = constants(graph)
    ranks, static = infer_shape_facts(proto)
    makers = {o: node for node in graph.node for o in node.output}
    only_reader = sole_reader(graph)

    def const_ints(name: str) -> list[int] | None:
        value = values.get(name)
        return None if value is None or value.dtype.kind not in "iu" or value.ndim > 1 else [int(v) for v in value.reshape(-1)]

    def last_axis_slice(node: Any, x: str) -> tuple[int, int] | None:
        """(start, end) of a Slice of `x` along its last axis, step 1."""
        if node is None or node.op_type != "Slice" or node.input[0] != x or len(node.input) < 4:
            return None
        starts, ends, axes = (const_ints(n) for n in node.input[1:4])
        steps = const_ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, ranks[x] - 1) or steps != [1]:
            return None
        return starts[0], ends[0]

    def split_product(node: Any, factor_of: str) -> str | None:
        """The other factor of a two-input Mul that reads `factor_of`."""
        if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or factor_of not in node.input:
            return None
        rest = [n for n in node.input if n != factor_of]
        return rest[0] if len(rest) == 1 else None

    def angle_of(name: str, trig: str) -> str | None:
        """The angle tensor `name` is the `trig` (Cos or Sin) of, through ops that keep its last axis,
        provided that angle is concat(f, f) on the last axis (so its two halves are equal)."""
        node = makers.get(name)
        while node is not None and node.op_type != trig:
            if node.op_type in _PASS_THROUGH:
                pass
            elif node.op_type == "Mul" and any(values.scalar(n) is not None for n in node.input):
                name = next(n for n in node.input if values.scalar(n) is None)
                node = makers.get(name)
                continue
            else:
                return None
            name = node.input[0]
            node = makers.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        angle = makers.get(node.input[0])
        if angle is None or angle.op_type != "Concat" or len(angle.input) != 2 or angle.input[0] != angle.input[1]:
            return None
        axis = next((a.i for a in angle.attribute if a.name == "axis"), None)
        rank = ranks.get(angle.output[0])
        return node.input[0] if axis == -1 or (rank is not None and axis == rank - 1) else None

    tables: dict[tuple[str, str], tuple[str, str, str]] = {}  # (cos, sin) → (positions, cos table, sin table)
    replaced: dict[int, list[Any]] = {}
    for neg in graph.node:
        if neg.op_type != "Neg":
            continue
        upper = makers.get(neg.input[0])
        x = upper.input[0] if upper is not None and upper.op_type == "Slice" else None
        if x is None or ranks.get(x) != 4 or (x, 3) not in static or static[x, 3] % 2:
            continue
        half = static[x, 3] // 2
        concat = only_reader(neg.output[0])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or concat.input[0] != neg.output[0]:
            continue
        if next((a.i for a in concat.attribute if a.name == "axis"), None) not in (-1, 3):
            continue
        upper_range, lower_range = last_axis_slice(upper, x), last_axis_slice(makers.get(concat.input[1]), x)
        if upper_range is None or lower_range is None or upper_range[0] != half or upper_range[1] < 2 * half or lower_range != (0, half):
            continue
        if only_reader(upper.output[0]) is not neg or only_reader(concat.input[1]) is not concat:
            continue
        rotated = only_reader(concat.output[0])
        sin = split_product(rotated, concat.output[0])
        add = only_reader(rotated.output[0]) if sin is not None else None
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        direct = makers.get(next(n for n in add.input if n != rotated.output[0]))
        cos = split_product(direct, x)
        if cos is None or only_reader(direct.output[0]) is not add:
            continue
        angle = angle_of(cos, "Cos")
        if angle is None or angle != angle_of(sin, "Sin"):
            continue
        if any(ranks.get(t) != 4 or static.get((t, 1)) != 1 or static.get((t, 3)) != 2 * half for t in (cos, sin)):
            continue
        stem = add.name or add.output[0]
        nodes = []
        if (cos, sin) not in tables:
            nodes, tables[cos, sin] = _tables(helper, numpy_helper, x, cos, sin, half, f"{stem}_rotary")
        positions, cos_table, sin_table = tables[cos, sin]
        nodes.append(helper.make_node("RotaryEmbedding", [x, positions, cos_table, sin_table], [add.output[0]], name=f"{stem}_rotary",
                                      domain="com.microsoft", interleaved=0))
        replaced[id(add)] = nodes
    if not replaced:
        return 0
    kept = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def _tables(helper: Any, numpy_helper: Any, x: str, cos: str, sin: str, half: int, stem: str) -> tuple[list[Any], tuple[str, str, str]]:
    """Nodes computing, from a step's cos and sin ((batch or 1), 1, seq, 2h) and x (batch, heads, seq,
    2h): the first half of each as a (batch·seq, h) table, and position ids (batch, seq) counting its
    rows."""
    def name(part: str) -> str:
        return f"{stem}_{part}"

    def ints(part: str, value: Any) -> Any:
        return helper.make_node("Constant", [], [name(part)], value=numpy_helper.from_array(np.array(value, dtype=np.int64), name(part)))

    nodes = [
        ints("starts", [0]), ints("ends", [half]), ints("axes", [3]), ints("one", [1]), ints("table_shape", [-1, half]),
        ints("zero", 0), ints("step", 1),
        helper.make_node("Shape", [x], [name("batch")], start=0, end=1),
        helper.make_node("Shape", [x], [name("seq")], start=2, end=3),
        # cos and sin may hold one row for the whole batch: the table has one per row of x
        helper.make_node("Concat", [name("batch"), name("one"), name("seq"), name("one")], [name("broadcast")], axis=0),
        helper.make_node("Concat", [name("batch"), name("seq")], [name("positions_shape")], axis=0),
    ]
    for trig, value in (("cos", cos), ("sin", sin)):
        nodes += [
            helper.make_node("Slice", [value, name("starts"), name("ends"), name("axes")], [name(f"{trig}_half")]),
            helper.make_node("Expand", [name(f"{trig}_half"), name("broadcast")], [name(f"{trig}_rows")]),
            helper.make_node("Reshape", [name(f"{trig}_rows"), name("table_shape")], [name(f"{trig}_table")]),
        ]
    nodes += [
        helper.make_node("Shape", [name("cos_table")], [name("count_1d")], start=0, end=1),
        helper.make_node("Squeeze", [name("count_1d")], [name("count")]),
        helper.make_node("Range", [name("zero"), name("count"), name("step")], [name("range")]),
        helper.make_node("Reshape", [name("range"), name("positions_shape")], [name("positions")]),
    ]
    return nodes, (name("positions"), name("cos_table"), name("sin_table"))
