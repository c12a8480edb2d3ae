"""What every perturbation method needs from a model: the score of one target output for many
perturbed copies of one example, run through the model's batch axis in chunks; and how an input's
elements are removed from a copy (`Replace` them with a baseline, or `MaskTokens`: token ids are
removed by the model's own attention mask, not by an arbitrary id). Removing what is already
removed (a pixel at the baseline, a padding token) changes nothing: the methods skip those runs,
and their values are the same as if they had run them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["MaskTokens", "Replace", "Scorer", "tiled"]


@dataclass
class Scorer:
    """`run(feeds) -> {output: array}` scored at `output[:, target]` (a classifier's logits, a
    regressor's values; an output with more axes is flattened past its batch axis); `chunk` rows
    per run."""

    run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
    output: str
    chunk: int = 64
    shape: tuple[int, ...] = ()  # the output's past its batch axis, as the last run gave it

    def answer(self, feeds: Mapping[str, np.ndarray], target: int | str | tuple[int, ...] | Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """(the target index of each row, its score), from one run of `feeds`: `target` itself (one
        for every row; a tuple: an index into an output with several axes past the batch axis, a
        token classifier's (position, class); a list: one per row), or ("auto") the row's top
        output. Indices are into the output flattened past its batch axis (`shape` is its shape)."""
        scores = self._output(feeds)
        rows = np.arange(len(scores))
        if isinstance(target, tuple):
            if len(target) != len(self.shape) or not all(isinstance(i, (int, np.integer)) and 0 <= i < d
                                                         for i, d in zip(target, self.shape, strict=False)):
                raise ToolkitError(f"target {list(target)}: give one index per axis of output {self.output!r} past its batch axis, "
                                   f"within its shape {list(self.shape)}.")
            target = int(np.ravel_multi_index(target, self.shape))
        if isinstance(target, str) or target is None:
            if target not in (None, "auto"):
                raise ToolkitError(f"target {target!r}: give a class index, one per row, or 'auto' (each row's top one).")
            chosen = scores.argmax(axis=1)
        elif isinstance(target, (list, tuple, np.ndarray)):
            chosen = np.asarray(target)
            if chosen.shape != (len(scores),) or chosen.dtype.kind not in "iu" or not ((0 <= chosen) & (chosen < scores.shape[1])).all():
                raise ToolkitError(f"targets {chosen.tolist()}: give one class index in [0, {scores.shape[1]}) per row ({len(scores)} rows).")
        elif isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < scores.shape[1]:
            raise ToolkitError(f"target {target!r}: give an index of output {self.output!r} in [0, {scores.shape[1]}), or 'auto' "
                               "(each row's top one).")
        else:
            chosen = np.full(len(scores), int(target))
        chosen = chosen.astype(np.int64)
        return chosen, scores[rows, chosen]

    def scores(self, count: int, build: Callable[[range], Mapping[str, np.ndarray]], target: int) -> np.ndarray:
        """The target's score for `count` perturbed copies of one example; `build(indices)` makes the
        feeds of some of them, stacked along the batch axis (a chunk at a time: never all in memory)."""
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, self.chunk):
            indices = range(start, min(count, start + self.chunk))
            out[indices.start: indices.stop] = self._output(build(indices))[:, target]
        return out

    def _output(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        value = np.asarray(self.run(feeds)[self.output])
        if value.ndim == 0:
            raise ToolkitError(f"output {self.output!r} is a scalar; explaining needs one value per row (an output with a batch axis).")
        self.shape = value.shape[1:] or (1,)
        return value.reshape(len(value), -1).astype(np.float64)


def tiled(feeds: Mapping[str, np.ndarray], row: int, count: int) -> dict[str, np.ndarray]:
    """Row `row` of every input, repeated `count` times along the batch axis."""
    return {name: np.repeat(value[row: row + 1], count, axis=0) for name, value in feeds.items()}



@dataclass(frozen=True)
class Replace:
    """Removed elements of input `name` take `baseline`'s values (a number, or an array shaped like
    one row of the input)."""

    name: str
    baseline: float | np.ndarray = 0.0

    def remove(self, batch: dict[str, np.ndarray], removed: np.ndarray) -> None:
        """`removed`: which elements each copy of the batch loses, shaped like the input."""
        batch[self.name] = np.where(removed, self.baseline, batch[self.name]).astype(batch[self.name].dtype, copy=False)

    def removable(self, feeds: Mapping[str, np.ndarray], row: int) -> np.ndarray:
        """The elements of row `row` that removing changes: those not already at the baseline."""
        return feeds[self.name][row] != self.baseline


@dataclass(frozen=True)
class MaskTokens:
    """Removed tokens are masked out through the model's attention mask input `mask`: the model reads
    the sequence as if they were not there."""

    mask: str

    def remove(self, batch: dict[str, np.ndarray], removed: np.ndarray) -> None:
        batch[self.mask] = np.where(removed, 0, batch[self.mask]).astype(batch[self.mask].dtype, copy=False)

    def removable(self, feeds: Mapping[str, np.ndarray], row: int) -> np.ndarray:
        """The tokens of row `row` that removing changes: those not already masked out (padding)."""
        return feeds[self.mask][row] != 0
