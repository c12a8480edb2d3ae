"""Half precision: onnxruntime's float16 converter, with the overflow-prone ops kept in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit._onnx import is_large
from toolkit.compile._child import ChildFailed, run_child
from toolkit.compile.quantization._common import QuantizeContext, resolve_nodes
from toolkit.compile.quantization.configs import Fp16
from toolkit.errors import ToolkitError

__all__ = ["drop_repeated_nodes", "join_fp32_neighbours", "quantize_fp16"]


def quantize_fp16(context: QuantizeContext, config: Fp16, model_file: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    edges = "inputs, outputs and " if config.io == "fp32" else ""
    chosen, unknown = resolve_nodes(model_file, config.keep_nodes)
    nodes = f" and {len(chosen)} nodes" if chosen else ""
    context.say(f"converting to fp16, keeping {edges}{', '.join(config.keep_fp32) or 'no op type'}{nodes} in fp32")
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.keep_fp32))
    try:  # in a child process: the converter holds the model several times over (toolkit.compile._child)
        run_child(_CONVERT, str(model_file.resolve()), str(target.resolve()), config.io == "fp32", block, chosen,
                  is_large(model_file), cwd=target.parent)
    except ChildFailed as exc:
        raise ToolkitError(f"onnxruntime's float16 converter failed on {model_file}: {exc}") from exc
    return {"io": config.io, "kept_fp32": list(config.keep_fp32), **({"kept_nodes": chosen} if chosen else {}),
            **({"kept_nodes_not_found": unknown} if unknown else {})}


_CONVERT = """
def main(model_file, target, keep_io_types, block, nodes, external):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from toolkit._onnx import save_model
    from toolkit.compile.passes._graph import record_inferred_shapes
    from toolkit.compile.quantization.fp16 import drop_repeated_nodes, join_fp32_neighbours

    # shapes inferred without the weights: the converter's own inference holds the model twice more
    converted = convert_float_to_float16(record_inferred_shapes(onnx.load(model_file)), keep_io_types=keep_io_types, op_block_list=block,
                                         node_block_list=nodes or None, disable_shape_infer=True)
    drop_repeated_nodes(converted.graph)
    join_fp32_neighbours(converted.graph)
    save_model(converted, target, external=external)
"""


def drop_repeated_nodes(graph: Any) -> None:
    """Removes exact repeats of a node (same name, inputs and outputs).

    The fp16 converter inserts one Cast per fp32-kept consumer of a tensor, all with one name and one
    output (a LayerNorm weight of ones shared by every LayerNorm, a residual sum read by an Add and a
    LayerNorm); the repeats make the graph invalid, and any one of them computes the same tensor.
    """
    seen = set()
    kept = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def join_fp32_neighbours(graph: Any) -> None:
    """Lets two nodes kept in fp32 exchange their tensor in fp32.

    The fp16 converter casts every kept node's fp32 output to fp16 and every kept node's input back
    to fp32, so that between two kept neighbours a tensor makes the round trip fp32 → fp16 → fp32:
    a value past 65504 (the very reason to keep both) becomes inf there. A Cast to fp32 that reads a
    Cast to fp16 of an fp32 tensor reads that tensor instead (a Cast to its own type: a copy), and the
    Cast to fp16 goes when nothing else reads it.
    """
    import onnx

    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    makers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        source = makers.get(node.input[0]) if cast_to(node) == float32 and node.input else None
        if source is not None and cast_to(source) == float16 and types.get(source.input[0]) == float32:
            node.input[0] = source.input[0]
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [node for node in graph.node if not (cast_to(node) == float16 and node.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(kept)
