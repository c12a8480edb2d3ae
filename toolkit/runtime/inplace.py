"""Decoding over a cache written in place, on the CPU: the decoder graph with each layer's attention
over its cache made onnxruntime's GroupQueryAttention, whose kernel writes a step's keys and values
into the cache it is given when the same buffer is bound as past and present, and reads only the
positions filled so far. The loop (toolkit.runtime.generate) allocates the cache once per call, to
the prompt plus the tokens asked for, and binds it once; a step then copies no cache at all, where
the bundle's graph concatenates the whole cache into a new one at every step.

The rewrite applies to the graphs toolkit's attention pass made (toolkit.compile.passes.attention):
ONNX `Attention` on the projections' rows, fed the graph's own additive mask and the past keys and
values, returning the present ones. That mask (padding and causality as the model builds it) goes
to GroupQueryAttention as its attention bias, so left-padded rows stay masked; each row's length is
an input (`SEQLENS`): a left-padded batch counts every row full (the padding is in the mask), a
continuous batch's rows stand at lengths of their own. Where the graph reads a past input's
shape (its mask and positions are built from the past length), it reads the length the attention
mask implies instead, since the buffer's own is the whole allocation.

The bundle's graph stays what `check` compares with PyTorch on its cases; this one runs only the
steps a generation loop makes, which GroupQueryAttention's CPU kernel takes (a multi-token step at
batch > 1 only over an empty cache), and `check` runs its greedy parity through it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from toolkit.bundle.store import Graph

__all__ = ["SEQLENS", "inplace_graph", "inplace_session"]

_PREFIX = "inplace_"  # of the names this rewrite adds
# The graph's one new input, GroupQueryAttention's own: per row, the tokens its cache holds after
# this step, minus one. Where a step writes a row's keys (that length minus the step's tokens) and
# how far it reads follow from it, so rows of one batch may stand at different lengths (a
# continuous batch's slots); a left-padded batch gives every row the mask's whole width.
SEQLENS = "seqlens_k"


def inplace_session(graph: Graph, threads: int | None) -> tuple[Any | None, str]:
    """(a CPU session of a bundle's decoder graph rewritten by `inplace_graph`, "") or (None, why not)."""
    import tempfile

    from onnx.external_data_helper import uses_external_data

    from toolkit._onnx import save_model
    from toolkit.runtime.session import in_memory, new_session, ort_message, session_options

    proto, why = inplace_graph(graph.model)
    if proto is None:
        return None, why
    options = session_options(threads)
    in_memory(options, graph.external)
    with tempfile.TemporaryDirectory(prefix="toolkit-inplace-", ignore_cleanup_errors=True) as scratch:
        if graph.external or isinstance(graph.model, bytes):  # decrypted in memory: nothing of it may touch the disk
            model: str | bytes = proto.SerializeToString()
        elif any(uses_external_data(t) for t in proto.graph.initializer):  # its weights stay in the bundle's files
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.path.parent))
            model = proto.SerializeToString()
        else:  # written a weight at a time, so that the graph and its session are not in memory at once
            model = str(Path(scratch) / "model.onnx")
            save_model(proto, model, external=True)
        del proto
        try:
            return new_session(model, "cpu", options), ""
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            return None, f"onnxruntime cannot load the rewritten graph: {ort_message(exc)}"


def inplace_graph(model: str | bytes) -> tuple[Any | None, str]:
    """(the rewritten model, "") for the decoder graph at `model` (a path, or the serialized graph), or
    (None, why it does not apply). Weights the graph keeps in external files stay there (the model
    refers to them by location)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    graph = proto.graph
    pasts = {i.name: i for i in graph.input if i.name.startswith("past_")}
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not pasts:
        return None, "the graph takes no cache"
    if not attentions:
        theirs = sorted({n.op_type for n in graph.node if n.domain == "com.microsoft" and "Attention" in n.op_type})
        if theirs:
            return None, f"its attention is onnxruntime's {', '.join(theirs)}, which the rewrite does not cover"
        return None, "its attention is not fused (the fused variants opt, int8 and int4 of a rotary decoder have it)"
    outputs = {o.name for o in graph.output}
    by_past = {n.input[4]: n for n in attentions if len(n.input) == 6 and len(n.output) >= 3
               and [*n.output[1:3]] == ["present_" + p.removeprefix("past_") for p in n.input[4:6]] and set(n.output[1:3]) <= outputs}
    covered = {name for n in by_past.values() for name in n.input[4:6]}
    if covered != set(pasts) or len(by_past) != len(attentions):
        return None, "some of its attention is not one ONNX Attention from a past input to its present output"
    for node in graph.node:
        if node.op_type not in ("Attention", "Shape") and set(node.input) & set(pasts):
            return None, f"its {node.op_type} node {node.name!r} reads the cache"
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info if v.type.tensor_type.HasField("shape")}
    heads_form = {}
    for node in attentions:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("is_causal") or attrs.get("qk_matmul_output_mode") or not node.input[3]:
            return None, f"its Attention {node.name!r} does not attend with the graph's own mask"
        rank = next((ranks[t] for t in node.input[:3] if t in ranks), None)  # queries, keys and values share a layout
        if rank not in (3, 4) or (rank == 3 and not attrs.get("q_num_heads")):
            return None, f"the layout of its Attention {node.name!r}'s queries is not known"
        heads_form[id(node)] = rank == 4
    _rewrite(graph, pasts, heads_form)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto, ""


def _to_rows(nodes: list[Any], tensor: str, name: Any) -> str:
    """(batch, heads, seq, size) → (batch, seq, heads·size), by two nodes appended to `nodes`."""
    from onnx import helper

    moved, rows = name(f"{tensor}_moved"), name(f"{tensor}_rows")
    nodes.append(helper.make_node("Transpose", [tensor], [moved], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", [moved, name("rows_shape")], [rows]))
    return rows


def _rewrite(graph: Any, pasts: dict[str, Any], heads_form: dict[int, bool]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    first = next(iter(pasts.values())).type.tensor_type.shape.dim
    heads, size = first[1].dim_value, first[3].dim_value
    name = lambda s: _PREFIX + s  # noqa: E731
    for key, value in {"heads": [heads], "size": [size], "one": [1], "rows_shape": [0, 0, -1], "heads_shape": [0, 0, -1, size]}.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name(key)))
    # the past length is what the mask covers beyond this step's tokens, whatever the buffer holds
    lengths = [
        helper.make_node("Shape", ["input_ids"], [name("batch")], start=0, end=1),
        helper.make_node("Shape", ["input_ids"], [name("seq")], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], [name("total")], start=1, end=2),
        helper.make_node("Sub", [name("total"), name("seq")], [name("past")]),
        helper.make_node("Concat", [name("batch"), name("heads"), name("past"), name("size")], [name("past_shape")], axis=0),
        helper.make_node("Cast", [name("total")], [name("total32")], to=TensorProto.INT32),
        helper.make_node("Squeeze", [name("total32")], [name("total_length")]),
    ]
    nodes = []
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in pasts:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            bounds = [name(f"{node.output[0]}_start"), name(f"{node.output[0]}_end")]
            graph.initializer.extend([numpy_helper.from_array(np.array([attrs.get("start", 0)], np.int64), bounds[0]),
                                      numpy_helper.from_array(np.array([attrs.get("end", 4)], np.int64), bounds[1])])
            nodes.append(helper.make_node("Slice", [name("past_shape"), *bounds], list(node.output), name=node.name))
        elif id(node) in heads_form:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            query, key, value, mask, past_key, past_value = node.input
            output = node.output[0]
            if heads_form[id(node)]:  # (batch, heads, seq, size): GroupQueryAttention takes and gives rows
                query, key, value = (_to_rows(nodes, t, name) for t in (query, key, value))
                output = name(f"{node.output[0]}_rows")
            extra = {k: attrs[k] for k in ("scale", "softcap") if attrs.get(k)}
            nodes.append(helper.make_node("GroupQueryAttention", [query, key, value, past_key, past_value, SEQLENS,
                                                                 name("total_length"), "", "", "", mask],
                                          [output, *node.output[1:3]], name=node.name, domain="com.microsoft",
                                          num_heads=attrs["q_num_heads"], kv_num_heads=attrs["kv_num_heads"], **extra))
            if heads_form[id(node)]:
                nodes.append(helper.make_node("Reshape", [output, name("heads_shape")], [f"{output}_heads"]))
                nodes.append(helper.make_node("Transpose", [f"{output}_heads"], [node.output[0]], perm=[0, 2, 1, 3]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(lengths + nodes)
    graph.input.append(helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]))
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.shape.dim[2].dim_param = "cache"
