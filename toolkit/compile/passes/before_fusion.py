"""Rewrites that put a dynamo export in the form onnxscript's fusion rules match (toolkit.compile.passes
.fusion runs them first, in its child process; they need onnx_ir).

Symbolic dims: shape inference names one dim "past + seq" on a decoder's keys and "seq + past" on
its values, and the attention rules compare dims by name: on a model with grouped-query attention
(LLaMA, Mistral, Qwen2, Phi) every layer but the first kept its unfused attention for that spelling
alone. Sums are spelled one way, and each layer's attention becomes a MultiHeadAttention.

Left out on purpose: rewriting the rotary frequencies (which torch.export writes as a broadcast Mul)
into the MatMul form onnxscript's cos/sin-cache rule matches. That rule fuses RotaryEmbedding, and
then grouped-query attention fuses into onnxruntime's GroupQueryAttention, whose CPU kernel reads
the attention mask as right padding (greedy agreement 0.25 on the check's left-padded prompts) and
refuses a multi-token step over a cache at batch > 1.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare"]


def prepare(model: Any) -> dict[str, int]:
    """The rewrites on an onnx_ir model, in place; returns how often each applied."""
    return {"symbolic sums spelled one way": _symbolic_sums(model)}


def _symbolic_sums(model: Any) -> int:
    """Spells every symbolic dim that is a sum of names with its terms sorted ("past + seq"), on the
    graph's inner values (its inputs and outputs keep the names the manifest gives them)."""
    import onnx_ir as ir

    boundary = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    changed = 0
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if id(value) in boundary or value.shape is None:
                continue
            dims = [_sorted_sum(d) for d in value.shape]
            if any(new is not old for new, old in zip(dims, value.shape, strict=True)):
                value.shape = ir.Shape(dims)
                changed += 1
    return changed


def _sorted_sum(dim: Any) -> Any:
    import onnx_ir as ir

    name = getattr(dim, "value", None)
    if not isinstance(name, str) or "+" not in name or any(c in name for c in "-*/()"):
        return dim
    spelled = " + ".join(sorted(term.strip() for term in name.split("+")))
    return dim if spelled == name else ir.SymbolicDim(spelled)
