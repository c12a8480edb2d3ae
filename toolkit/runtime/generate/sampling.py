"""How the next token is chosen: `Sampling` (greedy, or temperature with top-k and top-p, seeded),
and the token rules a Hugging Face generation config adds (`TokenRules`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["Sampling", "TokenRules"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution, cut to the top_k tokens and/or the top_p probability mass."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ToolkitError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ToolkitError(f"top_k must be at least 1, got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ToolkitError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ToolkitError("top_k and top_p apply to sampling; set a temperature above 0 to sample (0 is greedy).")

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """logits (B, vocab) → next token per row (B,)."""
        if self.temperature == 0:
            return lambda logits: logits.argmax(-1)
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> np.ndarray:
            # shifted before the division: a tiny temperature then sends every other token to -inf
            # (probability 0) rather than overflowing to inf - inf = NaN
            logits = logits.astype(np.float64)
            with np.errstate(over="ignore"):  # to -inf, as meant
                scaled = (logits - logits.max(-1, keepdims=True)) / self.temperature
            if self.top_k is not None and self.top_k < scaled.shape[-1]:
                kth = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
                scaled = np.where(scaled < kth, -np.inf, scaled)
            probs = np.exp(scaled)
            probs /= probs.sum(-1, keepdims=True)
            if self.top_p is not None:
                order = np.argsort(-probs, axis=-1)
                sorted_probs = np.take_along_axis(probs, order, -1)
                # Keep the smallest prefix whose mass reaches top_p (the most likely token always).
                drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= self.top_p
                drop = np.zeros_like(drop_sorted)
                np.put_along_axis(drop, order, drop_sorted, -1)
                probs = np.where(drop, 0.0, probs)
                probs /= probs.sum(-1, keepdims=True)
            return np.array([rng.choice(len(p), p=p) for p in probs])

        return choose



@dataclass(frozen=True)
class TokenRules:
    """The token rules of a Hugging Face model's generation config, applied to the logits before a
    token is chosen, as transformers' `generate()` does: a token forced first (BART's
    forced_bos_token_id) or last (forced_eos_token_id, at max_new_tokens), tokens never chosen
    (suppress_tokens) or not first (begin_suppress_tokens)."""

    forced_first: int | None = None
    forced_last: int | None = None
    suppress: tuple[int, ...] = ()
    suppress_first: tuple[int, ...] = ()

    @classmethod
    def of(cls, generation: Mapping[str, Any]) -> TokenRules:
        forced_last = generation.get("forced_eos_token_id")
        return cls(generation.get("forced_bos_token_id"), forced_last[0] if isinstance(forced_last, list) else forced_last,
                   tuple(generation.get("suppress_tokens") or ()), tuple(generation.get("begin_suppress_tokens") or ()))

    def apply(self, logits: np.ndarray, step: int, last: bool) -> np.ndarray:
        forced = self.forced_first if step == 0 else None
        forced = self.forced_last if last and self.forced_last is not None else forced
        banned = self.suppress + (self.suppress_first if step == 0 else ())
        if forced is None and not banned:
            return logits
        logits = logits.copy()
        if forced is not None:
            logits[:, :forced] = -np.inf
            logits[:, forced + 1 :] = -np.inf
        if banned:
            logits[:, list(banned)] = -np.inf
        return logits
