"""Sample inputs drawn from tensor descriptions: for parity checks, `toolkit run --example` and
benchmarks. numpy only, so torch-free runtimes can use it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from toolkit.spec import TensorSpec

__all__ = ["make_feeds", "concrete_shape"]


def concrete_shape(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(sum(sizes[name] for name in d.split("+")) if isinstance(d, str) else d for d in spec.shape)


def make_feeds(inputs: Sequence[TensorSpec], sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """One feed per input, shapes resolved with `sizes` (dim name → size), values from `seed`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = concrete_shape(spec, sizes)
        if spec.kind == "ids":
            value = rng.integers(0, spec.high, size=shape)
        elif spec.kind == "mask":
            value = _padding_mask(rng, shape)
        elif spec.kind == "positions":
            value = _positions(_mask_of(spec, inputs, feeds), shape)
        else:
            value = rng.standard_normal(shape)
        feeds[spec.name] = value.astype(spec.dtype)
    return feeds


def _mask_of(positions: TensorSpec, inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The mask whose last axis ends with the positions' axis ("past+seq" for "seq")."""
    axis = positions.shape[-1]
    return next((feeds[t.name] for t in inputs if t.kind == "mask" and t.name in feeds
                 and str(t.shape[-1]).split("+")[-1] == axis), None)


def _positions(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    # Positions that follow the mask, as a decoder sees them: random positions are inputs no
    # generation produces, and they amplify rounding far past what a real step sees.
    if mask is None:
        return np.broadcast_to(np.arange(shape[-1]), shape)
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)[..., -shape[-1] :]


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Right padding with a random valid length per row; row 0 stays full so the unpadded path is
    # always exercised, and every row keeps at least one valid position (an all-masked row is NaN).
    *rows, length = shape
    lengths = rng.integers(1, length + 1, size=rows)
    if lengths.size:
        lengths.flat[0] = length
    return (np.arange(length) < lengths[..., None]).astype(np.int64)
