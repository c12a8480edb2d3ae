"""Graph rewrites, one rule per module, and the ordered pass list per execution provider.

Each rule rewrites an ONNX model in place and returns how many times it applied; `run_passes` runs a
provider's list, dropping what nothing reads any more after each rule that applied, and returns the
counts the recipe records.
Transformer fusions (`fusion`) work on files through onnxscript or onnxruntime and run before these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit.compile.passes._graph import prune
from toolkit.compile.passes.attention import fuse_attention
from toolkit.compile.passes.packed_matmul import pack_sibling_matmuls
from toolkit.compile.passes.rotary import fuse_rotary_embeddings
from toolkit.compile.passes.skip_layer_norm import split_skip_layer_norm
from toolkit.compile.passes.unit_reshape import reshapes_to_squeezes
from toolkit.compile.passes.zero_initial_state import drop_zero_initial_states

__all__ = ["PASSES", "Pass", "run_passes"]


@dataclass(frozen=True)
class Pass:
    name: str  # as the recipe counts it
    apply: Callable[[Any], int]  # ModelProto, rewritten in place → times applied


_ZERO_STATES = Pass("zero initial states dropped", drop_zero_initial_states)
_UNIT_RESHAPES = Pass("Reshape to Squeeze", reshapes_to_squeezes)
_SPLIT_SKIP_LN = Pass("SkipLayerNormalization split", split_skip_layer_norm)
_PACKED_MATMULS = Pass("sibling MatMuls packed", pack_sibling_matmuls)
_ROTARY = Pass("rotary embeddings fused", fuse_rotary_embeddings)
_ATTENTION = Pass("attention over a cache fused", fuse_attention)

PASSES: dict[str, tuple[Pass, ...]] = {
    "cpu": (_ZERO_STATES, _UNIT_RESHAPES, _SPLIT_SKIP_LN, _PACKED_MATMULS, _ROTARY, _ATTENTION),
    "cuda": (_ZERO_STATES, _UNIT_RESHAPES, _PACKED_MATMULS),
}


def run_passes(proto: Any, provider: str) -> dict[str, int]:
    """Runs `provider`'s passes over `proto` in order; returns the count of each."""
    counts = {}
    for rule in PASSES[provider]:
        counts[rule.name] = rule.apply(proto)
        if counts[rule.name]:
            prune(proto.graph)  # a later rule reads who reads what: what this one left unread must be gone
    return counts
