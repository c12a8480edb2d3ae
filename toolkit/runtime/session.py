"""onnxruntime sessions: the one place providers are chosen and sessions are opened, so that every
caller (the runtime, bench, serve) gets the same settings and nothing falls back to the CPU silently."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.bundle.store import Graph

__all__ = ["CPU_DISABLED_OPTIMIZERS", "PROVIDERS", "cuda_status", "in_memory", "new_session", "open_session", "ort_message", "preload_cuda",
           "session_options", "session_providers"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnxruntime's CPU SkipLayerNormalization kernel is a scalar loop, slower than the Add +
# LayerNormalization it would replace (benchmarks/RESULTS.md, "Kernel choices"), so CPU sessions keep
# them apart. CUDA's fused kernel is the faster one there.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def ort_message(exc: BaseException) -> str:
    """onnxruntime's error without its C++ source location: the node and what went wrong."""
    text = " ".join(str(exc).split())
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    detail = text.split("Status Message:", 1)[-1]
    detail = detail.rsplit(" was false. ", 1)[-1].strip()
    return f"{node.group(1)} node {node.group(2)!r}: {detail}" if node else detail


def cuda_status() -> tuple[bool, str]:
    """Whether a CUDA session can be attempted here, and if not, why (said in words)."""
    import onnxruntime as ort

    if PROVIDERS["cuda"] not in ort.get_available_providers():
        return False, f"the installed onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver found (libcuda.so.1 cannot be loaded): this machine has no usable GPU"
    return True, ""


def preload_cuda() -> None:
    """Lets the CUDA provider find the CUDA/cuDNN libraries shipped in pip packages (e.g. PyTorch's)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def session_providers(provider: str, *, cuda_graph: bool = False) -> list[Any]:
    """onnxruntime's providers argument for `provider` ("cpu" or "cuda", with CPU for what CUDA lacks).
    onnxruntime's CUDA provider computes fp32 MatMul and Conv in TF32 by default (a 10-bit mantissa,
    past the fp32 gate); here the fp32 variant means fp32. `cuda_graph` lets
    runs through IO binding on fixed device buffers be captured and replayed as CUDA graphs."""
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    return [(PROVIDERS["cuda"], {"use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}), PROVIDERS["cpu"]]


def new_session(model: str | bytes, provider: str, options: Any = None, *, cuda_graph: bool = False) -> Any:
    """An onnxruntime session of `model` (a path or the serialized model) on `provider` ("cpu" or
    "cuda"), with this toolkit's settings for that provider."""
    import onnxruntime as ort

    if provider == "cuda":
        preload_cuda()
    disabled = list(CPU_DISABLED_OPTIMIZERS) if provider == "cpu" else None
    return ort.InferenceSession(model, sess_options=options, providers=session_providers(provider, cuda_graph=cuda_graph),
                                disabled_optimizers=disabled)


def in_memory(options: Any, files: Mapping[str, np.ndarray]) -> None:
    """Gives the session the contents of its graph's external-data files from memory (onnxruntime
    copies them while it creates the session; the buffers may go once it has)."""
    if files:
        options.add_external_initializers_from_files_in_memory(list(files), list(files.values()), [f.nbytes for f in files.values()])


def session_options(threads: int | None) -> Any:
    """onnxruntime's session options as every toolkit session has them: `threads` intra-op threads
    (None: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions with the same text; no duplicate log
    if threads is not None:
        if threads < 1:
            raise ToolkitError(f"threads {threads}: give at least 1, or leave it unset for onnxruntime's default (one per core).")
        options.intra_op_num_threads = threads
    return options


def open_session(graph: Graph, provider: str, threads: int | None, *, cuda_graph: bool = False) -> tuple[Any, str, str]:
    """(session, provider in use, why CUDA was not used) for a bundle's graph (a file, or in memory)."""
    if provider not in ("auto", *PROVIDERS):
        raise ToolkitError(f"unknown provider {provider!r}; choose auto, {', '.join(PROVIDERS)}.")
    options = session_options(threads)
    in_memory(options, graph.external)
    path = graph.path

    def session(name: str) -> Any:
        try:
            return new_session(graph.model, name, options, cuda_graph=cuda_graph and name == "cuda")
        except Exception as exc:
            raise ToolkitError(f"onnxruntime cannot load {path}{' for CUDA graphs' if cuda_graph else ''}: {ort_message(exc)}") from exc

    if cuda_graph and provider == "cpu":
        raise ToolkitError("CUDA graphs need the CUDA provider; use provider 'cuda' (or 'auto').")
    if provider == "cpu":
        return session("cpu"), "cpu", ""
    usable, why = cuda_status()
    if usable:
        sess = session("cuda")
        # onnxruntime keeps going on CPU when the CUDA provider fails to load: ask the session.
        if PROVIDERS["cuda"] in sess.get_providers():
            return sess, "cuda", ""
        why = "the CUDA provider failed to load (onnxruntime's log above names the missing library)"
    if provider == "cuda":
        raise ToolkitError(f"provider 'cuda' is not available: {why}. Use provider 'cpu' (or 'auto' to pick).")
    return session("cpu"), "cpu", f"CUDA not used: {why}"
