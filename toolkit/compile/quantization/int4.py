"""Weight-only int4: MatMul weights packed into onnxruntime's MatMulNBits by its own quantizer
(onnxruntime.quantization.matmul_nbits_quantizer); activations stay float."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from toolkit._onnx import is_large, save_model
from toolkit._scoped import logging_disabled
from toolkit.compile.quantization._common import (
    QuantizeContext,
    calibration_feeds,
    op_report,
    preprocess,
    resolve_nodes,
)
from toolkit.compile.quantization.configs import Int4
from toolkit.errors import ToolkitError

__all__ = ["int4_applies", "quantize_int4"]

# Nodes a head's MatMul may sit behind on its way to a graph output: they reshape or shift the logits
# but compute nothing an int4 error would hide in.
_PASS_THROUGH = ("Add", "Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def quantize_int4(context: QuantizeContext, config: Int4, model_file: Path, target: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    pre, options = preprocess(context, model_file)
    model = onnx.load(str(pre))
    weighted = _weighted_matmuls(model.graph)
    if not weighted:
        others = Counter(n.op_type for n in model.graph.node if n.op_type in ("Gemm", "Conv", "LSTM") and len(n.input) > 1)
        found = ", ".join(f"{op} ×{count}" for op, count in sorted(others.items())) or "none the quantizer reads"
        raise ToolkitError(f"int4 packs the weights of MatMul nodes (MatMulNBits), and {context.bundle.manifest.name} has no MatMul "
                           f"with a constant weight (its weighted ops: {found}); int4 does not apply. --mode int8 quantizes "
                           "Gemm and LSTM weights, --mode int8-static convolutions.")
    chosen, unknown = resolve_nodes(pre, config.exclude)
    head_nodes = [h for h in _heads(model.graph, weighted) if h not in chosen]
    heads = head_nodes if config.head != "int4" else []
    kept = list(dict.fromkeys([*heads, *chosen]))
    if heads:
        held = "in 8-bit blocks" if config.head == "int8" else "in float"
        context.say(f"packing the head {held} ({', '.join(heads)}): its error would land on the outputs directly")
    context.say(f"packing {len(weighted) - len(set(kept) & set(weighted))} MatMul weights into int4 blocks of {config.block_size} "
                f"({config.algo}, accuracy level {config.accuracy_level})")
    quantizer = _quantizer(nbits)(model, bits=4, block_size=config.block_size, is_symmetric=False,
                                           accuracy_level=config.accuracy_level, nodes_to_exclude=kept,
                                           algo_config=_algorithm(context, config, nbits))
    _process(quantizer)
    packed = quantizer.model.model
    if heads and config.head == "int8":
        # a second pass over what stayed float, the head alone: same kernel, 8 bits, round to nearest
        others = [n.name for n in packed.graph.node if n.op_type == "MatMul" and n.name not in heads]
        eight = _quantizer(nbits)(packed, bits=8, block_size=config.block_size, is_symmetric=False, accuracy_level=config.accuracy_level,
                                  nodes_to_exclude=others, algo_config=nbits.DefaultWeightOnlyQuantConfig(
                                      block_size=config.block_size, is_symmetric=False, accuracy_level=config.accuracy_level, bits=8))
        _process(eight)
        packed = eight.model.model
        kept = chosen
    for node in packed.graph.node:  # every algorithm's nodes compute at the asked accuracy level (HQQ's set none)
        if node.op_type == "MatMulNBits":
            for attribute in [a for a in node.attribute if a.name == "accuracy_level"]:
                node.attribute.remove(attribute)
            if config.accuracy_level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", config.accuracy_level))
    save_model(packed, target, external=is_large(pre))
    return {
        **options, "weights": f"int4 asymmetric, blocks of {config.block_size} (MatMulNBits)", "activations": "float",
        "algo": config.algo, "block_size": config.block_size, "accuracy_level": config.accuracy_level,
        "head": {"nodes": head_nodes, "stored": config.head} if head_nodes else None, "kept_float": kept, **({"excluded_not_found": unknown} if unknown else {}),
        "ops": op_report(pre, target),
    }


def _process(quantizer: Any) -> None:
    with logging_disabled(logging.INFO), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # (its own INFO logger, GPTQ's progress bar, and HQQ's torch.from_numpy of a read-only weight, which it only reads)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        quantizer.process()


def _quantizer(nbits: Any) -> type:
    class Quantizer(nbits.MatMulNBitsQuantizer):
        """onnxruntime's quantizer, with `nodes_to_exclude` honoured by GPTQ too (it marks them only for RTN)."""

        def _generate_q4_node_config(self) -> dict[str, Any]:
            config = super()._generate_q4_node_config()
            return {**config, **dict.fromkeys(self.nodes_to_exclude & config.keys(), "fp32")}

    return Quantizer


def _algorithm(context: QuantizeContext, config: Int4, nbits: Any) -> Any:
    if config.algo == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    if config.algo == "gptq":
        feeds, where = calibration_feeds(context, config.calibration_samples)
        context.say(f"GPTQ on {len(feeds)} inputs from {where}")
        return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(feeds))
    return nbits.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=False, accuracy_level=config.accuracy_level, bits=4)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds (GPTQ copies it, then iterates)."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self.feeds = feeds
        self._next = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._next, None)

    def __iter__(self):
        return iter(self.feeds)


def _weighted_matmuls(graph: Any) -> list[str]:
    """MatMul nodes whose second input is a 2-D constant: what MatMulNBits can hold."""
    weights = {t.name: t for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights
            and len(weights[n.input[1]].dims) == 2]


def _heads(graph: Any, weighted: list[str]) -> list[str]:
    """The weighted MatMuls that make a graph output, through nothing but pass-through nodes."""
    makers = {o: n for n in graph.node for o in n.output}
    constants = {t.name for t in graph.initializer}
    candidates = set(weighted)
    heads = []
    for output in graph.output:
        node = makers.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            inputs = [i for i in node.input if i and i not in constants and i in makers]
            node = makers[inputs[0]] if len(inputs) == 1 else None
        if node is not None and node.name in candidates:
            heads.append(node.name)
    return list(dict.fromkeys(heads))


_ATTENTION = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention")


def int4_applies(bundle: Any) -> str | None:
    """Why int4 is worth building for this bundle (a transformer: attention, and MatMul weights
    besides its head, which int4 packs in 8 bits), or None."""
    import onnx

    graph = onnx.load(str(bundle.variant_path("fp32")), load_external_data=False).graph
    if not any(n.op_type in _ATTENTION for n in graph.node):
        return None
    weighted = _weighted_matmuls(graph)
    body = sorted(set(weighted) - set(_heads(graph, weighted)))
    return f"a transformer with {len(body)} MatMul weights int4 packs" if body else None
