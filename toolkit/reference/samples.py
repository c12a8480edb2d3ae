"""Real-looking inputs that ship with the code, for task gates and calibration where a model comes
without data: English sentences (the standard library's docstrings) and natural-looking images
(random fields with the 1/f amplitude spectrum of photographs)."""

from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["natural_images", "sentences"]


def sentences(n: int) -> list[str]:
    """`n` real English sentences that ship with every Python: the first lines of the standard
    library's docstrings, in a fixed order."""
    import importlib
    import inspect

    found: list[str] = []
    for name in ("os", "json", "collections", "pathlib", "functools", "itertools", "string", "textwrap", "random",
                 "statistics", "datetime", "calendar", "shutil", "tempfile", "csv", "argparse", "logging", "inspect",
                 "typing", "dataclasses", "enum", "heapq", "bisect", "zipfile", "tarfile", "email", "http", "urllib.parse",
                 "subprocess", "threading", "queue", "socket", "decimal", "fractions", "difflib", "pprint", "unittest"):
        module = importlib.import_module(name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            line = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
            if 20 <= len(line) <= 300 and line not in found:
                found.append(line)
            if len(found) == n:
                return found
    if len(found) < n:
        raise ToolkitError(f"only {len(found)} sentences found for a held-out set of {n}.")
    return found


def natural_images(n: int, channels: int, height: int, width: int, *, seed: int) -> np.ndarray:
    """`n` images (n, channels, height, width) in [0, 1] with the second-order statistics of
    photographs: an amplitude spectrum falling as 1/f^1.2 (smooth regions, edges at every scale,
    unlike white noise, whose activations no real input produces) through a lens and sensor's blur
    (a Gaussian point spread of half a pixel), so that neighbouring pixels correlate above 0.9 as
    they do in photographs; channels correlated as colour is (a shared luminance field plus weaker
    per-channel ones); each image stretched to the full range between its 1st and 99th percentiles."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    frequency[0, 0] = 1.0 / max(height, width)  # the mean: as strong as the coarsest wave
    amplitude = frequency**-1.2 * np.exp(-2 * (np.pi * 0.5 * frequency) ** 2)
    shape = (n, 1 + channels, height, width // 2 + 1)
    fields = np.fft.irfft2((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amplitude, s=(height, width))
    images = fields[:, :1] + 0.35 * fields[:, 1:]
    low, high = np.percentile(images, [1, 99], axis=(1, 2, 3), keepdims=True)
    return np.clip((images - low) / np.maximum(high - low, 1e-12), 0.0, 1.0).astype(np.float32)
