"""Shapley value sampling: for each of `samples` random orderings of the features, add the features
to the baseline one by one and credit each with the change of the target's score it brought
(Captum's `ShapleyValueSampling`, with the same permutations it gives the same values). A feature is
a group of elements (`feature_mask`): a patch of an image, a column of a table. Per ordering the
credits sum exactly to f(input) - f(baseline); one ordering's steps run as one batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.attribution.scoring import Replace, Scorer, tiled
from toolkit.errors import ToolkitError

__all__ = ["ShapleySampling", "patch_mask"]


class ShapleySampling:
    name = "shapley"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def attribute(self, feeds: Mapping[str, np.ndarray], name: str, targets: np.ndarray, *, feature_mask: np.ndarray | None = None,
                  samples: int = 25, seed: int = 0, baseline: float | np.ndarray = 0.0,
                  permutations: Sequence[Sequence[int]] | None = None, ablation: Any = None) -> np.ndarray:
        """Attributions shaped like `feeds[name]`: each element carries its feature's value. A feature
        not yet added is removed by `ablation` (default: replaced with `baseline`)."""
        ablation = ablation or Replace(name, baseline)
        value = feeds[name]
        shape = value.shape[1:]
        mask = np.arange(int(np.prod(shape))).reshape(shape) if feature_mask is None else np.asarray(feature_mask)
        features = _features(mask, shape)
        if permutations is None:
            if samples < 1:
                raise ToolkitError(f"samples {samples}: give at least 1 ordering of the features.")
            rng = np.random.default_rng(seed)
            permutations = [rng.permutation(len(features)) for _ in range(samples)]
        attributions = np.zeros(value.shape, dtype=np.float64)
        for row, target in enumerate(targets):
            credit = np.zeros(len(features))
            removable = np.broadcast_to(ablation.removable(feeds, row), shape)
            null = np.array([not removable[elements].any() for elements in features])  # adding one changes nothing
            for order in permutations:
                order = np.asarray(order)
                rank = np.empty(shape, dtype=np.int64)  # each element's feature's place in the ordering
                for place, feature in enumerate(order):
                    rank[features[feature]] = place
                # step s: the ordering's first s features are the input's, the rest removed; a step that adds a
                # null feature scores as the one before it, so only the others run
                steps = [0] + [place + 1 for place, feature in enumerate(order) if not null[feature]]

                def build(indices: range, row: int = row, rank: np.ndarray = rank, steps: np.ndarray = np.array(steps)) -> dict[str, np.ndarray]:
                    batch = tiled(feeds, row, len(indices))
                    ablation.remove(batch, rank[None] >= steps[indices.start: indices.stop].reshape(-1, *[1] * rank.ndim))
                    return batch

                scores = np.empty(len(features) + 1)
                scores[steps] = self.scorer.scores(len(steps), build, int(target))
                for place, feature in enumerate(order):
                    if null[feature]:
                        scores[place + 1] = scores[place]
                credit[order] += np.diff(scores)
            credit /= len(permutations)
            for feature, elements in enumerate(features):
                attributions[row][elements] = credit[feature]
        return attributions


def patch_mask(shape: Sequence[int], patch: int) -> np.ndarray:
    """A feature mask of `patch`×`patch` squares over the last two axes (shared by the leading ones:
    an image's channels), numbered row by row."""
    if len(shape) < 2:
        raise ToolkitError(f"patches need an input with two spatial axes; this one is {list(shape)}: give a feature mask.")
    height, width = shape[-2:]
    rows, columns = np.arange(height) // patch, np.arange(width) // patch
    grid = rows[:, None] * (-(-width // patch)) + columns[None, :]
    return np.broadcast_to(grid, tuple(shape)).copy()


def _features(mask: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    if mask.shape != shape or mask.dtype.kind not in "iu":
        raise ToolkitError(f"the feature mask must be integers shaped like the input past its batch axis, {list(shape)}; "
                           f"got {mask.dtype} {list(mask.shape)}.")
    ids = np.unique(mask)
    if len(ids) > 4096:
        raise ToolkitError(f"{len(ids)} features: every ordering runs the model once per feature; group them (a feature mask, or patches).")
    return [mask == i for i in ids]
