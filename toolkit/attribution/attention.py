"""Attention rollout (Abnar & Zuidema, 2020) for transformer encoders, read from the graph itself:
every attention's probabilities (the Softmax over the keys, batch × heads × queries × keys) made
an output of the variant's graph, one run, then per layer the heads' mean plus the identity (the
residual path), rows renormalized, multiplied through the layers. It says how much each token
flows into the queries read out, whatever the target: attention, not the gradient of a class.
A graph whose attention is fused into one operator (an optimized variant's Attention) has no
probabilities to read: the unfused fp32 variant has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["attention_maps", "rollout"]

_FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
          "DecoderMaskedMultiHeadAttention"}


def attention_maps(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Each attention layer's probabilities (batch × heads × queries × keys), in graph order, for
    validated `feeds`: the variant's graph run once with its Softmax outputs added to its outputs."""
    import onnx

    from toolkit.bundle.store import Graph
    from toolkit.runtime.session import open_session

    bundle, variant = model.bundle, model.variant
    graph = bundle.graph(variant)
    proto = onnx.load_model_from_string(graph.model) if isinstance(graph.model, bytes) else onnx.load(graph.model, load_external_data=False)
    softmaxes = [node.output[0] for node in proto.graph.node if node.op_type == "Softmax"]
    fused = sorted({node.op_type for node in proto.graph.node if node.op_type in _FUSED})
    if not softmaxes:
        why = (f"variant {variant!r} fuses attention into {', '.join(fused)}: explain the unfused fp32 variant (--variant fp32)" if fused
               else f"variant {variant!r} of {model.name} has no Softmax, so no attention probabilities")
        raise ToolkitError(f"attention rollout reads the attention probabilities from the graph; {why}.")
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in softmaxes if name not in known)
    external = graph.external or {e["file"]: bundle.read(e["file"]) for e in bundle.manifest.variants[variant].external_data}
    session, _, _ = open_session(Graph(graph.path, proto.SerializeToString(), external), model.provider, None)
    values = session.run(softmaxes, dict(feeds))
    length = next(v.shape[1] for v in feeds.values() if np.ndim(v) >= 2)
    maps = [np.asarray(v, dtype=np.float64) for v in values if np.ndim(v) == 4 and v.shape[-2:] == (length, length)]
    if not maps:
        raise ToolkitError(f"none of the {len(softmaxes)} Softmax outputs of {model.name} ({variant}) is an attention map "
                           f"(batch × heads × {length} × {length}); attention rollout is for transformer encoders.")
    return maps


def rollout(maps: list[np.ndarray], mask: np.ndarray | None, query: str = "first") -> np.ndarray:
    """(batch × tokens): how much each token flows, through every layer and its residual path, into
    the first token's place (`query` "first": a classifier reading a [CLS] token) or on average into
    every token kept by `mask` ("mean": a mean-pooled encoder)."""
    if query not in ("first", "mean"):
        raise ToolkitError(f"rollout query {query!r}: choose 'first' (a [CLS] read-out) or 'mean' (mean pooling).")
    batch, _, length, _ = maps[0].shape
    flow = np.broadcast_to(np.eye(length), (batch, length, length)).copy()
    for attention in maps:
        layer = 0.5 * attention.mean(axis=1) + 0.5 * np.eye(length)
        layer /= layer.sum(axis=-1, keepdims=True)
        flow = layer @ flow
    if query == "first":
        return flow[:, 0]
    kept = np.ones((batch, length)) if mask is None else np.asarray(mask, dtype=np.float64)
    return (kept[:, :, None] * flow).sum(axis=1) / np.maximum(kept.sum(axis=1, keepdims=True), 1)
