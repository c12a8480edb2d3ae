"""Rule (CPU): SkipLayerNormalization is split back into Add + LayerNormalization.

onnxruntime's CPU kernel for the fused op is a scalar loop, slower than the two it replaces
(benchmarks/layernorm.py, the Kernel choices section of benchmarks/RESULTS.md); CUDA's fused kernel
is the faster one there, so a CUDA-made graph keeps it.
"""

from __future__ import annotations

from typing import Any

from toolkit._onnx import default_opset

__all__ = ["split_skip_layer_norm"]


def split_skip_layer_norm(proto: Any) -> int:
    """Replaces each SkipLayerNormalization whose mean and inverse-deviation outputs are unused by
    Add(input, skip) [+ bias] and LayerNormalization over the last axis, in place; returns how many.
    The sum output, where the graph reads it, keeps its name."""
    from onnx import helper

    if default_opset(proto) < 17:
        return 0  # LayerNormalization is an ONNX op from opset 17
    graph = proto.graph
    read = ({name for node in graph.node for name in node.input} | {o.name for o in graph.output}) - {""}
    nodes, split = [], 0
    for node in graph.node:
        outputs = [*node.output, "", "", ""][:4]
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or read & set(outputs[1:3]):
            nodes.append(node)
            continue
        x, skip, gamma, beta, bias = [*node.input, "", "", ""][:5]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)  # the contrib op's default
        stem = node.name or outputs[0]
        total = outputs[3] if outputs[3] in read else f"{stem}_sum"
        partial = f"{stem}_skip_sum" if bias else total
        nodes.append(helper.make_node("Add", [x, skip], [partial], name=f"{stem}_add"))
        if bias:
            nodes.append(helper.make_node("Add", [partial, bias], [total], name=f"{stem}_add_bias"))
        nodes.append(helper.make_node("LayerNormalization", [total, gamma, *([beta] if beta else [])], [outputs[0]],
                                      name=f"{stem}_layer_norm", axis=-1, epsilon=epsilon))
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return split
