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

__all__ = ["ShapleySampling", "feature_ids", "patch_mask"]


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
        ids, count = feature_ids(feature_mask, shape)
        if permutations is None:
            if samples < 1:
                raise ToolkitError(f"samples {samples}: give at least 1 ordering of the features.")
            rng = np.random.default_rng(seed)
            permutations = [rng.permutation(count) for _ in range(samples)]
        attributions = np.zeros(value.shape, dtype=np.float64)
        for row, target in enumerate(targets):
            credit = np.zeros(count)
            removable = np.broadcast_to(ablation.removable(feeds, row), shape)
            null = np.bincount(ids.ravel(), weights=removable.ravel(), minlength=count) == 0  # adding one changes nothing
            for order in permutations:
                order = np.asarray(order)
                place = np.empty(count, dtype=np.int64)
                place[order] = np.arange(count)
                rank = place[ids]  # each element's feature's place in the ordering
                # step s: the ordering's first s features are the input's, the rest removed; a step that adds a
                # null feature scores as the one before it, so only the others run
                steps = np.array([0] + [p + 1 for p, feature in enumerate(order) if not null[feature]])

                def build(indices: range, row: int = row, rank: np.ndarray = rank, steps: np.ndarray = steps) -> dict[str, np.ndarray]:
                    batch = tiled(feeds, row, len(indices))
                    ablation.remove(batch, rank[None] >= steps[indices.start: indices.stop].reshape(-1, *[1] * rank.ndim))
                    return batch

                scores = np.empty(count + 1)
                scores[steps] = self.scorer.scores(len(steps), build, int(target))
                for p, feature in enumerate(order):
                    if null[feature]:
                        scores[p + 1] = scores[p]
                credit[order] += np.diff(scores)
            attributions[row] = credit[ids] / len(permutations)
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


def feature_ids(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(each element's feature, numbered 0.., shaped like one row of the input; how many features):
    from `mask` (integers shaped like that row: equal values make one feature), or one per element."""
    if mask is None:
        ids, count = np.arange(int(np.prod(shape))).reshape(shape), int(np.prod(shape))
    else:
        mask = np.asarray(mask)
        if mask.shape != shape or mask.dtype.kind not in "iu":
            raise ToolkitError(f"the feature mask must be integers shaped like the input past its batch axis, {list(shape)}; "
                               f"got {mask.dtype} {list(mask.shape)}.")
        values, ids = np.unique(mask, return_inverse=True)
        ids, count = ids.reshape(shape), len(values)
    if count > 4096:
        raise ToolkitError(f"{count} features: every sample runs the model once per feature or more; group them (a feature mask, "
                           "or patches).")
    return ids, count
