"""Rule: a decoder's unfused attention over its KV cache becomes ONNX's own `Attention` (opset 23),
whose CPU kernel onnxruntime runs as one node per layer: the cache concatenation, both products,
the scale, the mask and the softmax, and no copy of the scores between them.

It matches what the export leaves where onnxscript's fusion does not apply (grouped-query attention,
whose queries toolkit's export stacks per key-value head: toolkit.reference.hf_causal):

    present_k = Concat(past_k, k, axis=-2)      present_v = Concat(past_v, v, axis=-2)
    scores = MatMul(Reshape(q), present_kᵀ) [· c]         q: (batch, heads, seq, d)
    y = Reshape(MatMul(Reshape(Softmax(Reshape(scores) + mask)), present_v))

with the four Reshapes (heads grouped per key-value head and back) all present, or all absent where
the heads are not grouped. The grouping is checked on the dims shape inference finds: query head h
reads key-value head h // (heads / key-value heads), as `Attention` groups them. The mask stays the
graph's own additive mask (padding and causality as the model builds them), so the op runs with
`is_causal` off and sees exactly what the unfused softmax saw.

Where the export only reshapes the projections (batch, seq, heads·d) into heads and transposes them,
with a rotary embedding of whole heads between (toolkit.compile.passes.rotary), `Attention` takes
the rows as they are and gives rows: the rotary embeddings then read rows too, and three Reshapes
and four Transposes a layer go.

onnxruntime's GroupQueryAttention is not used: its CPU kernel reads the mask as right padding and
refuses a multi-token step over a cache at batch > 1 (toolkit.compile.passes.before_fusion).
`Attention` needs the graph at opset 23: the rule raises the graph's opset where every op it holds
kept its meaning between the two versions (toolkit.compile.passes._graph.raise_default_opset) and
applies nowhere otherwise, nor where the onnxruntime installed cannot run the op as used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit._onnx import IR_VERSION_CAP, default_opset
from toolkit.compile.passes._graph import (
    Constants,
    attribute,
    can_raise_default_opset,
    constants,
    infer_shape_facts,
    perm,
    raise_default_opset,
    readers_of,
)

__all__ = ["fuse_attention"]

ATTENTION_OPSET = 23
_AXIS_IN_ROWS = {(0, 1): 0, (2, 3): 1}  # a Shape's (start, end) of one axis of (batch, heads, seq, size) → that axis of (batch, seq, ·)


def fuse_attention(proto: Any) -> int:
    """Replaces each matching attention's nodes by one `Attention`, in place; returns how many. The
    present keys and values and the attention's output keep their names."""
    from onnx import helper

    graph = proto.graph
    if default_opset(proto) < 13 or not can_raise_default_opset(proto, ATTENTION_OPSET):
        return 0  # Softmax on one axis from 13
    facts = _Facts.of(proto)
    fused: dict[int, list[Any]] = {}  # id of the node the attention takes the place of → the nodes instead
    dropped: set[int] = set()
    shapes: list[tuple[Any, str]] = []  # Shapes to read their axis off a projection's rows instead
    for softmax in graph.node:
        match = facts.attention_at(softmax)
        if match is not None:
            place, nodes, gone, moved = match
            fused[id(place)] = nodes
            dropped |= gone
            shapes += moved
    if not fused or not _onnxruntime_runs_attention():
        return 0
    raise_default_opset(proto, ATTENTION_OPSET)
    for shape, rows in shapes:  # the rotary tables read the batch and seq sizes off a transposed projection
        start = _AXIS_IN_ROWS[attribute(shape, "start", 0), attribute(shape, "end", 4)]
        del shape.attribute[:]
        shape.attribute.extend([helper.make_attribute("start", start), helper.make_attribute("end", start + 1)])
        shape.input[0] = rows
    kept = [new for node in graph.node if id(node) not in dropped for new in fused.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(kept)
    return len(fused)


def _onnxruntime_runs_attention() -> bool:
    """Whether the onnxruntime installed runs `Attention` as the rule uses it: grouped heads on rows,
    a cache, an additive mask (onnxruntime's CPU kernel for it is recent)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    names = {"q": [1, 2, 8], "k": [1, 2, 4], "v": [1, 2, 4], "mask": [1, 1, 2, 3], "past_k": [1, 1, 1, 4], "past_v": [1, 1, 1, 4]}
    graph = helper.make_graph([helper.make_node("Attention", list(names), ["y", "present_k", "present_v"], q_num_heads=2, kv_num_heads=1)],
                              "probe", [helper.make_tensor_value_info(n, f, shape) for n, shape in names.items()],
                              [helper.make_tensor_value_info(n, f, None) for n in ("y", "present_k", "present_v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ATTENTION_OPSET)])
    model.ir_version = IR_VERSION_CAP
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(["y"], {n: np.ones(shape, np.float32) for n, shape in names.items()})[0]
    except Exception:  # onnxruntime's own exception types are not importable portably: any means no
        return False
    return y.shape == (1, 2, 8)


@dataclass
class _Facts:
    """What the rule reads off the graph: constants, ranks and static dims, producers and readers."""

    values: Constants
    ranks: dict[str, int]
    static: dict[tuple[str, int], int]
    makers: dict[str, Any]
    readers: dict[str, list[Any]]
    outputs: set[str]
    names: set[str]  # every name in the graph, and those the rule adds

    @classmethod
    def of(cls, proto: Any) -> _Facts:
        graph = proto.graph
        readers = readers_of(graph)
        makers = {o: node for node in graph.node for o in node.output}
        names = {*makers, *readers, *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
        return cls(constants(graph), *infer_shape_facts(proto), makers, readers, {o.name for o in graph.output}, names)

    def only_reader(self, name: str) -> Any:
        """The one node that reads `name`, an inner value (not a graph output); None otherwise."""
        found = self.readers.get(name, [])
        return found[0] if len(found) == 1 and name not in self.outputs else None

    def dims(self, name: str, *expected: tuple[int, int]) -> bool:
        """`name` is rank 4 with these static (axis, size) dims."""
        return self.ranks.get(name) == 4 and all(self.static.get((name, axis)) == size for axis, size in expected)

    def made_by(self, name: str, op_type: str, domain: str = "") -> Any:
        """The node that makes `name`, if it is an `op_type` of `domain`."""
        node = self.makers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ((domain, "ai.onnx") if not domain else (domain,)) else None

    def attention_at(self, softmax: Any) -> tuple[Any, list[Any], set[int], list[tuple[Any, str]]] | None:
        """The attention this Softmax belongs to: the node whose place it takes, the nodes instead
        (an `Attention`, and rotary embeddings on rows before it), the ids of the nodes that go, and
        the Shapes to re-point at rows (see `_rows`)."""
        from onnx import helper

        if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx") or attribute(softmax, "axis", -1) not in (-1, 3):
            return None
        add = self.made_by(softmax.input[0], "Add")
        if add is None or len(add.input) != 2 or self.only_reader(add.output[0]) is not softmax:
            return None
        found = [(scores, mask) for scored, mask in (add.input, reversed(add.input)) if (scores := self._scores(scored, add))]
        if len(found) != 1:
            return None
        (nodes, regroup, queries, present_k, scale), mask = found[0]
        nodes += [add, softmax]
        grouped, q, probabilities = regroup is not None, queries, softmax.output[0]
        if grouped:  # queries (batch, heads, seq, size) as (batch, kv heads, group·seq, size), probabilities back
            ungroup, regroup_back = self.made_by(queries, "Reshape"), self.only_reader(probabilities)
            if ungroup is None or regroup_back is None or regroup_back.op_type != "Reshape":
                return None
            q, probabilities, nodes = ungroup.input[0], regroup_back.output[0], [*nodes, ungroup, regroup_back]
        value_product = self.only_reader(probabilities)
        if value_product is None or value_product.op_type != "MatMul" or value_product.input[0] != probabilities:
            return None
        present_v = value_product.input[1]
        last = self.only_reader(value_product.output[0]) if grouped else value_product
        caches = self._cache(present_k), self._cache(present_v)
        if last is None or last.op_type != ("Reshape" if grouped else "MatMul") or None in caches:
            return None
        (key_concat, past_k, k), (value_concat, past_v, v) = caches
        heads, kv_heads, size = self.static.get((q, 1)), self.static.get((k, 1)), self.static.get((q, 3))
        if None in (heads, kv_heads, size) or heads % kv_heads or self.static.get((mask, 1)) not in (1, heads):
            return None
        if not (self.dims(q) and self.dims(k, (3, size)) and self.dims(v, (1, kv_heads), (3, size)) and self.dims(mask)):
            return None
        if grouped:  # query head h reads key-value head h // (heads / kv heads), as Attention groups them
            if not (self.dims(queries, (1, kv_heads), (3, size)) and self.dims(regroup.output[0], (1, heads))
                    and self.dims(probabilities, (1, kv_heads)) and self.dims(last.output[0], (1, heads), (3, size))):
                return None
        elif kv_heads not in (heads, 1):  # ungrouped heads broadcast only as one key-value head for all
            return None
        if any(len([r for r in self.readers.get(n, []) if r.op_type != "Shape"]) != 1 for n in (present_k, present_v, queries)):
            return None  # the products are the only readers of the values (a Shape reads the same shape after)
        stem = last.name or last.output[0]
        removed = [*nodes, key_concat, value_concat, value_product, last]
        inputs, before, shapes = [q, k, v], [], []
        rows = self._rows(q, k, v, last.output[0], heads, kv_heads, size, {id(n) for n in removed})
        if rows is not None:
            inputs, before, layout, last, shapes = rows
            removed += layout
        attention = helper.make_node("Attention", [*inputs, mask, past_k, past_v], [last.output[0], present_k, present_v], name=f"{stem}_attention",
                                     q_num_heads=heads, kv_num_heads=kv_heads, scale=scale, is_causal=0)
        return last, [*before, attention], {id(n) for n in removed if n is not last}, shapes

    def _cache(self, name: str) -> tuple[Any, str, str] | None:
        """(node, past, new) of a present key or value: Concat(past, new) on the sequence axis, rank 4."""
        node = self.made_by(name, "Concat")
        if node is None or len(node.input) != 2 or attribute(node, "axis", 0) not in (2, -2):
            return None
        past, new = node.input
        return (node, past, new) if self.ranks.get(past) == 4 and self.ranks.get(new) == 4 else None

    def _scores(self, name: str, add: Any) -> tuple[list[Any], Any, str, str, float] | None:
        """(nodes, regrouping Reshape or None, queries, present keys, scale) of the scores `name` that
        only `add` reads: q·kᵀ (FusedMatMul with transB, or MatMul of a Transpose), optionally times
        a scalar constant, optionally reshaped."""
        if self.only_reader(name) is not add:
            return None
        node, nodes, regroup, scale = self.makers.get(name), [], None, 1.0
        if node is not None and node.op_type == "Reshape":
            regroup, nodes = node, [node]
            node = self.makers.get(node.input[0]) if self.only_reader(node.input[0]) is node else None
        if node is not None and node.op_type == "Mul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            factors = [n for n in node.input if self.values.scalar(n) is not None]
            other = [n for n in node.input if n not in factors]
            if len(factors) != 1 or len(other) != 1:
                return None
            scale, nodes = self.values.scalar(factors[0]), [*nodes, node]
            node = self.makers.get(other[0]) if self.only_reader(other[0]) is node else None
        if node is None:
            return None
        if node.op_type == "FusedMatMul" and node.domain == "com.microsoft":
            flags = [attribute(node, f, 0) for f in ("transA", "transB", "transBatchA", "transBatchB")]
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            return ([*nodes, node], regroup, node.input[0], node.input[1], alpha * scale) if flags == [0, 1, 0, 0] else None
        transpose = self.made_by(node.input[1], "Transpose") if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
        if transpose is None or perm(transpose, 4) != [0, 1, 3, 2] or self.only_reader(transpose.output[0]) is not node:
            return None
        return [*nodes, node, transpose], regroup, node.input[0], transpose.input[0], scale

    def _rows(self, q: str, k: str, v: str, output: str, heads: int, kv_heads: int, size: int,
              replaced: set[int]) -> tuple[list[str], list[Any], list[Any], Any, list[tuple[Any, str]]] | None:
        """`Attention` on (batch, seq, heads·size) rows instead, where the export only reshapes the
        projections into heads and transposes them (a RotaryEmbedding of whole heads between them
        taking the rows as they are) and the output back: the inputs, the rotary embeddings on rows,
        the nodes that go, the node whose place the attention takes, and the Shapes that read a
        transposed projection's batch or seq size (with the rows to read it off instead); None where
        any of it does not hold. Saves three Reshapes and four Transposes a layer."""
        from onnx import helper

        shapes: list[tuple[Any, str]] = []  # Shapes of the batch or seq axis of a transposed projection, and its rows

        def rows_of(name: str, count: int) -> tuple[str, list[Any], Any] | None:
            rotary = self.made_by(name, "RotaryEmbedding", "com.microsoft")
            if rotary is not None:
                partial = any(a.name in ("num_heads", "rotary_embedding_dim") and a.i for a in rotary.attribute)
                if partial or self.static.get((rotary.input[2], 1)) != size // 2 or name in self.outputs \
                        or any(id(r) not in replaced for r in self.readers.get(name, [])):
                    return None  # a partial rotary would need the heads spelled out on rows
                name = rotary.input[0]
            transpose = self.made_by(name, "Transpose")
            if transpose is None or perm(transpose, 4) != [0, 2, 1, 3] or name in self.outputs:
                return None
            reshape = self.made_by(transpose.input[0], "Reshape")
            if reshape is None or self.only_reader(transpose.input[0]) is not transpose:
                return None
            x = reshape.input[0]
            if self.ranks.get(x) != 3 or self.static.get((x, 2)) != count * size or \
                    [self.static.get((reshape.output[0], a)) for a in (2, 3)] != [count, size]:
                return None
            others = [r for r in self.readers.get(name, []) if r is not rotary and id(r) not in replaced]
            if any(r.op_type != "Shape" or (attribute(r, "start", 0), attribute(r, "end", 4)) not in _AXIS_IN_ROWS for r in others):
                return None
            shapes.extend((r, x) for r in others)
            return x, [transpose, reshape], rotary

        found = [rows_of(q, heads), rows_of(k, kv_heads), rows_of(v, kv_heads)]
        if None in found or found[2][2] is not None:
            return None
        transpose = self.only_reader(output)
        reshape = self.only_reader(transpose.output[0]) if transpose is not None and transpose.op_type == "Transpose" else None
        if reshape is None or perm(transpose, 4) != [0, 2, 1, 3] or reshape.op_type != "Reshape" \
                or self.ranks.get(reshape.output[0]) != 3 or self.static.get((reshape.output[0], 2)) != heads * size:
            return None
        inputs, rotaries, layout = [], [], [transpose]
        for x, nodes, rotary in found:
            layout += nodes
            if rotary is None:
                inputs.append(x)
                continue
            rows = f"{rotary.output[0]}_rows"
            while rows in self.names:
                rows += "_"
            self.names.add(rows)
            rotaries.append(helper.make_node("RotaryEmbedding", [x, *rotary.input[1:]], [rows], name=f"{rotary.name or rotary.output[0]}_rows",
                                             domain="com.microsoft", interleaved=attribute(rotary, "interleaved", 0)))
            layout.append(rotary)
            inputs.append(rows)
        return inputs, rotaries, layout, reshape, shapes
