"""Half precision: onnxruntime's float16 converter, with the overflow-prone ops kept in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit._onnx import is_large
from toolkit.compile._child import ChildFailed, run_child
from toolkit.compile.quantization._common import QuantizeContext, resolve_nodes
from toolkit.compile.quantization.configs import Fp16
from toolkit.errors import ToolkitError

__all__ = ["drop_repeated_nodes", "quantize_fp16"]


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
    from toolkit.compile.quantization.fp16 import drop_repeated_nodes

    # shapes inferred without the weights: the converter's own inference holds the model twice more
    converted = convert_float_to_float16(record_inferred_shapes(onnx.load(model_file)), keep_io_types=keep_io_types, op_block_list=block,
                                         node_block_list=nodes or None, disable_shape_infer=True)
    drop_repeated_nodes(converted.graph)
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
