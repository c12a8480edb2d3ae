"""Giving memory back to the operating system between the stages of a build."""

from __future__ import annotations

import ctypes
import gc
import sys

__all__ = ["release_memory"]


def release_memory() -> None:
    """Collects garbage, then asks glibc to return its free heap pages. An onnxruntime session or a
    torch tensor that is gone leaves its pages in malloc's free lists, where the next stage's
    allocations of other sizes do not reuse them: a build that checks four variants of a model
    otherwise holds them all at once (benchmarks/RESULTS.md, "Building a decoder: memory")."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's: musl has none
    if trim is not None:
        trim(0)
