"""Arithmetic work of an ONNX graph at given input sizes: 2·M·N·K per matrix product, counted for
MatMul, Gemm, Conv and LSTM (the ops that hold nearly all of a model's floating-point work) and the
integer MatMul and Conv of dynamic int8, from shapes found by onnxruntime's symbolic shape inference."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import onnx

from toolkit._onnx import without_weights

__all__ = ["graph_flops"]


def graph_flops(path: Path, sizes: Mapping[str, int]) -> float | None:
    """FLOPs of one run of the model at `path` with dynamic dims set to `sizes`; None when the shape
    of some counted op cannot be inferred (the count would be an underestimate)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = without_weights(onnx.load(str(path), load_external_data=False))
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                size = sizes[dim.dim_param]
                dim.Clear()
                dim.dim_value = size
    try:
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # the inference gives up on graphs it does not understand
        return None
    shapes: dict[str, list[int | None]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    total = 0.0
    for node in model.graph.node:
        op = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}.get(node.op_type, node.op_type)
        if op not in ("MatMul", "Gemm", "Conv", "LSTM"):
            continue
        operands = [shapes.get(name) for name in (*node.input[:2], node.output[0])]
        if any(s is None or None in s for s in operands):
            return None
        a, b, y = operands
        if op == "MatMul":
            total += 2 * math.prod(y) * a[-1]
        elif op == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += 2 * math.prod(y) * (a[0] if trans_a else a[-1])
        elif op == "Conv":
            total += 2 * math.prod(y) * math.prod(b[1:])  # every output element: C_in/group · kernel MACs
        else:
            seq, batch, features = a
            directions, gates, hidden = b[0], b[1], b[1] // 4
            total += 2 * seq * batch * directions * gates * (features + hidden)
    return total
