"""Rule: the exact GELU, x · 0.5 · (1 + erf(x / √2)), that exporters write as five elementwise ops
becomes onnxruntime's Gelu (com.microsoft), one pass over the tensor instead of five.

onnxruntime fuses two of the orders the product can be written in; the dynamo exporter writes a
third (0.5 · (1 + erf) first, then x), which it leaves as five ops. A transformer's graph quantized
from the export (where its fused attention would keep weights from the quantizer) spends a fifth of
its batch-32 time on them. Exact: Gelu is the erf form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.compile.passes._graph import constants, sole_reader

__all__ = ["fuse_erf_gelu"]


def fuse_erf_gelu(proto: Any) -> int:
    """Replaces each exact GELU's Div (or Mul by 1/√2), Erf, Add 1 and two Muls by one Gelu, in place;
    returns how many. The GELU's output keeps its name."""
    from onnx import helper

    graph = proto.graph
    values = constants(graph)
    only_reader = sole_reader(graph)

    def is_const(name: str, value: float) -> bool:
        found = values.scalar(name)
        return found is not None and bool(np.isclose(found, value, rtol=1e-4))

    def other(node: Any, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(node.input) == 2 and len(rest) == 1 else None

    makers = {o: node for node in graph.node for o in node.output}
    replaced: dict[int, Any] = {}  # id of the GELU's last node → its Gelu
    dropped: set[int] = set()
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        scaled = makers.get(erf.input[0])
        if scaled is None or only_reader(scaled.output[0]) is not erf or scaled.op_type not in ("Div", "Mul") or len(scaled.input) != 2:
            continue
        x, c = scaled.input
        if scaled.op_type == "Mul" and is_const(x, 1 / np.sqrt(2.0)):
            x, c = c, x
        if not is_const(c, np.sqrt(2.0) if scaled.op_type == "Div" else 1 / np.sqrt(2.0)):
            continue
        plus = only_reader(erf.output[0])
        if plus is None or plus.op_type != "Add" or not is_const(other(plus, erf.output[0]) or "", 1.0):
            continue
        first = only_reader(plus.output[0])
        factor = other(first, plus.output[0]) if first is not None and first.op_type == "Mul" else None
        if factor is None:
            continue
        if is_const(factor, 0.5) or factor == x:  # 0.5 · (1 + erf) or x · (1 + erf), then times the other
            last = only_reader(first.output[0])
            rest = other(last, first.output[0]) if last is not None and last.op_type == "Mul" else None
            if rest is None or not (rest == x if factor != x else is_const(rest, 0.5)):
                continue
            chain = [scaled, erf, plus, first]
        else:  # (x · 0.5) · (1 + erf)
            half = makers.get(factor)
            if half is None or half.op_type != "Mul" or only_reader(factor) is not first or other(half, x) is None or \
                    not is_const(other(half, x), 0.5):
                continue
            last, chain = first, [scaled, erf, plus, half]
        replaced[id(last)] = helper.make_node("Gelu", [x], [last.output[0]], name=f"{last.name or last.output[0]}_gelu", domain="com.microsoft")
        dropped.update(id(n) for n in chain)
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)
