"""Occlusion: slide a window over an input, replace what it covers with a baseline, and credit each
element with the average drop of the target's score over the windows that covered it (Captum's
`Occlusion`: the same windows, strides and averaging)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.attribution.scoring import Replace, Scorer, tiled
from toolkit.errors import ToolkitError

__all__ = ["Occlusion"]


class Occlusion:
    name = "occlusion"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def attribute(self, feeds: Mapping[str, np.ndarray], name: str, targets: np.ndarray, *, window: Sequence[int],
                  strides: Sequence[int] | None = None, baseline: float | np.ndarray = 0.0, ablation: Any = None) -> np.ndarray:
        """Attributions shaped like `feeds[name]`: for each row, each element's average score drop
        when a window covering it is removed (`ablation`; default: replaced with `baseline`)."""
        ablation = ablation or Replace(name, baseline)
        value = feeds[name]
        shape = value.shape[1:]
        window, strides = _sizes(window, shape, "window"), _sizes(strides or window, shape, "strides")
        if any(s > w for s, w, d in zip(strides, window, shape, strict=True) if w < d):
            raise ToolkitError(f"occlusion strides {list(strides)} must not exceed the window {list(window)} (elements would go unseen).")
        counts = [math.ceil((d - w) / s) + 1 for d, w, s in zip(shape, window, strides, strict=True)]
        corners = list(itertools.product(*(range(0, c * s, s) for c, s in zip(counts, strides, strict=True))))
        regions = [tuple(slice(c, c + w) for c, w in zip(corner, window, strict=True)) for corner in corners]
        covered = np.zeros(shape, dtype=np.float64)
        for region in regions:
            covered[region] += 1
        attributions = np.zeros(value.shape, dtype=np.float64)
        for row, target in enumerate(targets):
            removable = np.broadcast_to(ablation.removable(feeds, row), shape)
            changing = [region for region in regions if removable[region].any()]  # the others' drop is 0

            def build(indices: range, row: int = row, changing: list = changing) -> dict[str, np.ndarray]:
                batch = tiled(feeds, row, len(indices))
                removed = np.zeros((len(indices), *shape), dtype=bool)
                for k, index in enumerate(indices):
                    if index:  # copy 0 is the input as it is: its score is where the drops are measured from
                        removed[k][changing[index - 1]] = True
                ablation.remove(batch, removed)
                return batch

            scores = self.scorer.scores(len(changing) + 1, build, int(target))
            drops = scores[0] - scores[1:]
            for region, drop in zip(changing, drops, strict=True):
                attributions[row][region] += drop
            attributions[row] /= covered
        return attributions


def _sizes(sizes: Sequence[int], shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != len(shape) or any(s < 1 or s > d for s, d in zip(sizes, shape, strict=True)):
        raise ToolkitError(f"occlusion {what} {list(sizes)}: give one size per axis of the input past its batch axis, each in "
                           f"[1, its size]: the input is {list(shape)}.")
    return sizes
