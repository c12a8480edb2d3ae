"""Whether two variants of a model look at the same evidence: the rank correlation (Spearman) of their
attributions for the same rows and the same target, the first variant's answer. A cheaper variant
that agrees on the answer but not on the evidence is right for other reasons."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["compare", "rank_correlation"]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two arrays of the same shape (ties share their average rank);
    0 where either is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64).ravel()), _ranks(np.asarray(b, dtype=np.float64).ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / norm) if norm else 0.0


def compare(models: Mapping[str, Any], feeds: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """Explains `feeds` with each model (variant name → `toolkit.Model`) for the first one's targets;
    → each later variant's rank correlation with the first, per row and on average, and how often
    its own answer is the first's target (None for an embedder, whose score is a similarity)."""
    from toolkit.attribution import explain

    options.pop("target", None)
    names = list(models)
    reference = explain(models[names[0]], feeds, **options)
    result: dict[str, Any] = {"reference": names[0], "target": reference.target.tolist(), "variants": {}}
    similar = "score" in reference.params  # an embedder: each variant explains the similarity to its own embedding
    for name in names[1:]:
        other = explain(models[name], feeds, target="auto" if similar else reference.target, **options)
        per_row = [float(np.mean([rank_correlation(reference.attributions[i][row], other.attributions[i][row]) for i in reference.attributions]))
                   for row in range(len(reference.target))]
        result["variants"][name] = {"spearman": float(np.mean(per_row)), "per_row": per_row, "same_answer": None}
        if not similar:
            own = np.asarray(models[name].run(feeds)[reference.output]).reshape(len(reference.target), -1).argmax(axis=-1)
            result["variants"][name]["same_answer"] = float(np.mean(own == reference.target))
    return result


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, tie, counts = np.unique(values, return_inverse=True, return_counts=True)
    return np.bincount(tie, weights=ranks)[tie] / counts[tie]
