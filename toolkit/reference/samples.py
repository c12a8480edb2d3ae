"""Real-looking inputs that ship with the code, for task gates and calibration where a model comes
without data: English sentences (the standard library's docstrings) and natural-looking images
(random fields with the 1/f amplitude spectrum of photographs), speech-like sound (voiced syllables
over a gliding pitch)."""

from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["natural_images", "sentences", "speech_like"]


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


def speech_like(n: int, samples: int, rate: int, *, seed: int) -> np.ndarray:
    """`n` waveforms (n, samples) in [-1, 1] with speech's coarse structure: syllables 120–300 ms long
    (3–8 a second) of voiced sound, a fundamental between 90 and 250 Hz gliding within each, its
    harmonics shaped by two formant peaks that move between syllables, short noise bursts (fricatives)
    between them, and a little background noise. A speech model's encoder sees log-mel spectra
    with formant bands and pitch harmonics, as on recordings, not the flat spectrum of white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    waves = np.zeros((n, samples))
    for row in range(n):
        start = 0
        while start < samples:
            length = int(rng.uniform(0.12, 0.3) * rate)
            span = slice(start, min(start + length, samples))
            local = t[span] - t[start]
            pitch = rng.uniform(90, 250) * (1 + rng.uniform(-0.2, 0.2) * local / max(local[-1], 1e-9))
            phase = 2 * np.pi * np.cumsum(pitch) / rate
            formants = rng.uniform(300, 900), rng.uniform(900, 2500)
            voiced = sum(np.sin(k * phase) * sum(np.exp(-((k * pitch.mean() - f) / 200) ** 2) for f in formants) / k
                         for k in range(1, int(4000 // pitch.mean()) + 1))
            envelope = np.sin(np.pi * local / max(local[-1], 1e-9)) ** 2
            burst = rng.standard_normal(len(local)) * 0.3 * (local > local[-1] * 0.85)
            waves[row, span] = voiced * envelope + burst
            start += length
        waves[row] += 0.01 * rng.standard_normal(samples)
    return (waves / np.maximum(np.abs(waves).max(axis=1, keepdims=True), 1e-9)).astype(np.float32)
