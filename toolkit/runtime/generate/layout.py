"""What a generation loop needs to know about a decoder graph, read from its manifest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.runtime.generate.sampling import TokenRules
from toolkit.spec import TensorSpec

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """What the loop needs to know about the graph, read from the manifest."""

    heads: int
    head_size: int
    past_dtype: str
    eos_token_id: int  # pads left-padded prompts too
    eos_ids: tuple[int, ...]  # every token that ends a row
    context: int
    logits: str
    vocab: int
    caches: tuple[str, ...]  # every past_* input; its present_* output feeds it on the next step
    inputs: frozenset[str]
    encoder: str | None  # an encoder-decoder's encoder part: prompts are its source (source_ids, source_mask)
    source_context: int | None
    decoder_start: tuple[int, ...]  # an encoder-decoder's decoder starts every row from these
    features: bool  # an encoder-decoder whose prompts are feature arrays (speech), not text
    rules: TokenRules

    @property
    def positions(self) -> bool:
        """Whether the graph takes position_ids (an encoder-decoder's counts positions from its cache)."""
        return "position_ids" in self.inputs

    @classmethod
    def of(cls, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], generation: Mapping[str, Any] | None) -> Layout:
        names = {t.name for t in inputs}
        past = [t for t in inputs if t.name.startswith("past_key_")]
        needed = {"input_ids", "attention_mask"} | (set() if generation and generation.get("encoder") else {"position_ids"})
        if not generation or not past or not needed <= names:
            raise ToolkitError(
                f"{name} is not a decoder with a KV cache: generation needs a graph taking input_ids, attention_mask, "
                f"position_ids and past_key_i/past_value_i (its inputs: {', '.join(sorted(names))}). "
                "The reference gpt and seq2seq (`toolkit export gpt`) are, and Hugging Face causal LMs (`toolkit export hf:PATH`)."
            )
        _, heads, _, head_size = past[0].shape
        vocab = next(t.high for t in inputs if t.name == "input_ids")
        caches = tuple(t.name for t in inputs if t.name.startswith("past_"))
        eos_ids = tuple(generation.get("eos_token_ids") or [generation["eos_token_id"]])
        return cls(heads, head_size, past[0].dtype, generation["eos_token_id"], eos_ids, generation["context"], outputs[0].name, vocab,
                   caches, frozenset(names), generation.get("encoder"), generation.get("source_context"),
                   tuple(generation.get("decoder_start") or [generation["eos_token_id"]]), generation.get("source") == "features",
                   TokenRules.of(generation))
