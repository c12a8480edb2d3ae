"""KernelSHAP (Lundberg & Lee, 2017): sample coalitions of the features, score each with the absent
features removed, and fit a linear model of the score on which features were present, weighted by
the Shapley kernel; its coefficients are the features' Shapley values, estimated. As Captum's
`KernelShap`: the full and the empty coalition first, weighted 1e6 (so that the fit passes through
both ends: the credits sum to about f(input) - f(baseline)), then coalitions whose size k is drawn
with probability ∝ (M - 1) / (k (M - k)) and whose members are uniform among those of that size,
each weighted 1, fitted by weighted least squares with an intercept. With the same coalitions it
gives Captum's values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from toolkit.attribution.scoring import Replace, Scorer, tiled
from toolkit.attribution.shapley import feature_ids
from toolkit.errors import ToolkitError

__all__ = ["KernelShap", "draw_coalitions"]

_ENDS_WEIGHT = 1e6  # the full and the empty coalition: the fit must pass (nearly) through them


class KernelShap:
    name = "kernel-shap"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def attribute(self, feeds: Mapping[str, np.ndarray], name: str, targets: np.ndarray, *, feature_mask: np.ndarray | None = None,
                  samples: int = 64, seed: int = 0, baseline: float | np.ndarray = 0.0, coalitions: np.ndarray | None = None,
                  ablation: Any = None) -> np.ndarray:
        """Attributions shaped like `feeds[name]`: each element carries its feature's coefficient.
        `coalitions` (samples × features, 1: present) replaces the drawn ones."""
        ablation = ablation or Replace(name, baseline)
        value = feeds[name]
        shape = value.shape[1:]
        ids, count = feature_ids(feature_mask, shape)
        if coalitions is None:
            coalitions = draw_coalitions(count, samples, np.random.default_rng(seed))
        coalitions = np.asarray(coalitions)
        if coalitions.ndim != 2 or coalitions.shape[1] != count or len(coalitions) < 2:
            raise ToolkitError(f"coalitions {list(coalitions.shape)}: give two or more rows of {count} flags (1: the feature is present).")
        size = coalitions.sum(axis=1)
        weights = np.where((size == 0) | (size == count), _ENDS_WEIGHT, 1.0)
        design = np.column_stack([coalitions.astype(np.float64), np.ones(len(coalitions))])
        attributions = np.zeros(value.shape, dtype=np.float64)
        for row, target in enumerate(targets):

            def build(indices: range, row: int = row) -> dict[str, np.ndarray]:
                batch = tiled(feeds, row, len(indices))
                ablation.remove(batch, coalitions[indices.start: indices.stop][:, ids] == 0)
                return batch

            scores = self.scorer.scores(len(coalitions), build, int(target))
            root = np.sqrt(weights)[:, None]
            coefficients = np.linalg.lstsq(design * root, scores * root[:, 0], rcond=None)[0][:-1]
            attributions[row] = coefficients[ids]
        return attributions


def draw_coalitions(count: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` coalitions of `count` features (samples × count, 1: present): the full and the empty
    one, then coalitions drawn by the Shapley kernel (see the module)."""
    if samples < 2:
        raise ToolkitError(f"samples {samples}: KernelSHAP needs at least 2 coalitions (the full and the empty one), and more to fit.")
    if count < 2:
        raise ToolkitError(f"{count} feature: KernelSHAP needs two or more features to share the credit.")
    sizes = np.arange(1, count)
    probability = (count - 1) / (sizes * (count - sizes))
    chosen = rng.choice(sizes, size=samples - 2, p=probability / probability.sum())
    coalitions = np.zeros((samples, count), dtype=np.int64)
    coalitions[0] = 1
    for i, k in enumerate(chosen):
        coalitions[i + 2, rng.permutation(count)[:k]] = 1
    return coalitions
