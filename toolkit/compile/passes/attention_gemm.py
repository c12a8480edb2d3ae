"""Rule (after fusion): a Gemm fed by a fused attention node becomes MatMul (+ Add).

GPT-2's projections are `addmm` on the attention output flattened to 2-D; onnxscript's attention
fusion replaces the flattening with a MultiHeadAttention node whose output is 3-D (batch, seq,
hidden), and onnxruntime refuses the Gemm (rank 2 only) when it loads the graph. MatMul and Add
broadcast over the leading dims, so they compute the same values on the 3-D input; the Reshape that
follows restores the shape the graph expects.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ATTENTION_OPS", "gemms_after_attention_to_matmul"]

# Fused attention ops: (batch, sequence, hidden) out, whatever shape the name once had.
ATTENTION_OPS = {"MultiHeadAttention", "Attention", "GroupQueryAttention", "PackedMultiHeadAttention"}


def gemms_after_attention_to_matmul(proto: Any) -> int:
    """Rewrites each plain Gemm (no transposed A, alpha = beta = 1) whose A is a fused attention
    output as MatMul, plus Add of C, in place; returns how many."""
    from onnx import helper

    graph = proto.graph
    attention = {out for node in graph.node if node.domain == "com.microsoft" and node.op_type in ATTENTION_OPS for out in node.output[:1]}
    nodes, rewritten, stale = [], 0, set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or node.input[0] not in attention or not plain:
            nodes.append(node)
            continue
        stem, (a, b, *c) = node.name or node.output[0], node.input
        weight = b
        if attrs.get("transB", 0):
            weight = f"{stem}_weight_t"
            nodes.append(helper.make_node("Transpose", [b], [weight], name=f"{stem}_transpose_b", perm=[1, 0]))
        product = f"{stem}_matmul" if c and c[0] else node.output[0]
        nodes.append(helper.make_node("MatMul", [a, weight], [product], name=f"{stem}_as_matmul"))
        if c and c[0]:
            nodes.append(helper.make_node("Add", [product, c[0]], [node.output[0]], name=f"{stem}_bias"))
        stale.update((a, node.output[0]))  # both 3-D now, whatever rank was recorded before
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    for record in graph.value_info:
        if record.name in stale:  # the type holds (the quantizer reads it), the rank recorded before does not
            record.type.tensor_type.ClearField("shape")
    return rewritten
