"""What `bench` times, side by side: each provider × variant of a bundle in an onnxruntime session,
and the PyTorch reference (eager or compiled) on the same device, each with its memory footprint."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.measure import Step, ort_session, ort_step
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds

__all__ = ["GRAPH_SUFFIX", "TORCH_COMPILE", "TORCH_EAGER", "Candidate", "OrtCandidate", "TorchCandidate", "nodes_by_provider"]

TORCH_EAGER = "torch-eager"
TORCH_COMPILE = "torch-compile"
GRAPH_SUFFIX = "+graph"


class Candidate:
    label: str
    provider: str
    variant: str
    threads: int
    parity: str
    precision: str = "fp32"  # which GEMM peak its throughput is set against (int8: onnxruntime's integer MatMul)
    peak_mem_mb: float | None = None
    cpu_nodes: int | None = None

    def open(self, manifest: Any, shapes: list[dict[str, int]]) -> None: ...

    def prepare(self, feeds: dict[str, np.ndarray]) -> Step: ...

    def close(self) -> None: ...


class OrtCandidate(Candidate):
    """A variant on a provider; with `cuda_graph` (CUDA), each shape's calls are captured once and
    replayed, and the row's variant reads `<variant>+graph`."""

    def __init__(self, bundle: Bundle, variant: str, provider: str, threads: int, cuda_graph: bool = False):
        self.bundle, self.provider, self.threads, self.cuda_graph = bundle, provider, threads, cuda_graph
        self.name = variant
        self.variant = variant + GRAPH_SUFFIX if cuda_graph else variant
        self.label = f"{provider}/{self.variant}"
        self._graph_ids = iter(range(1, 1 << 30))
        self.precision = bundle.manifest.variants[variant].precision
        parity = bundle.manifest.variants[variant].parity
        self.parity = "unchecked" if parity is None else ("pass" if parity["passed"] else "FAIL")

    def open(self, manifest: Any, shapes: list[dict[str, int]]) -> None:
        before = _memory(self.provider)
        self.model = Model(self.bundle, variant=self.name, provider=self.provider, threads=self.threads, cuda_graph=self.cuda_graph)
        for sizes in shapes:  # every shape once, so the memory figure covers the largest
            self.model.run(self.model.cast(make_feeds(manifest.inputs, sizes, seed=0)))
        self.peak_mem_mb = _delta_mb(before, _memory(self.provider))
        if self.provider == "cuda" and not self.bundle.sealed:  # a sealed graph is not parsed a second time
            self.cpu_nodes = nodes_by_provider(self.bundle.variant_path(self.name), self.provider,
                                                self.model.cast(make_feeds(manifest.inputs, shapes[0], seed=0)), self.threads).get("CPUExecutionProvider", 0)

    def prepare(self, feeds: dict[str, np.ndarray]) -> Step:
        graph_id = next(self._graph_ids) if self.cuda_graph else None
        return ort_step(self.model.session, self.model.validate(self.model.cast(feeds)), self.provider, graph_id)

    def close(self) -> None:
        self.model = None


class TorchCandidate(Candidate):
    def __init__(self, module: Any, provider: str, variant: str, threads: int):
        self.module, self.provider, self.variant, self.threads = module, provider, variant, threads
        self.label = f"{provider}/{variant}"
        self.parity = "reference"

    def open(self, manifest: Any, shapes: list[dict[str, int]]) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ToolkitError("torch has no CUDA here (a CPU build of torch?); bench onnxruntime alone with --no-torch.")
        before = _memory(self.provider)
        module = copy.deepcopy(self.module).to(self.device) if self.device == "cuda" else self.module
        self.run = module
        if self.variant == TORCH_COMPILE:
            self.run = torch.compile(module)
        weights = sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6
        for sizes in shapes:
            self.prepare(make_feeds(manifest.inputs, sizes, seed=0))()
        self.peak_mem_mb = weights + (_delta_mb(before, _memory(self.provider)) or 0.0)

    def prepare(self, feeds: dict[str, np.ndarray]) -> Step:
        import torch

        args = [torch.from_numpy(v).to(self.device) for v in feeds.values()]
        run, threads = self.run, self.threads
        synchronize = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)

        def step() -> None:
            with torch.inference_mode():
                run(*args)
            synchronize()

        step.enter = lambda: torch.set_num_threads(threads)  # global in torch: set as each candidate's turn begins
        return step

    def close(self) -> None:
        self.run = None


def nodes_by_provider(model_file: Path, provider: str, feeds: dict[str, np.ndarray], threads: int) -> dict[str, int]:
    """How many nodes ran on each execution provider, from onnxruntime's profile of one run."""
    session = ort_session(str(model_file), provider, threads, profile=True)
    session.run(None, feeds)
    profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text())
    finally:
        profile.unlink(missing_ok=True)
    placed: dict[str, str] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            placed[args.get("node_index", event["name"])] = args["provider"]
    counts: dict[str, int] = {}
    for name in placed.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def _memory(provider: str) -> float | None:
    """Resident bytes of this process (CPU), or bytes in use on the GPU (CUDA, through torch)."""
    if provider == "cuda":
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            return float(total - free)
        except Exception:
            return None
    import psutil

    return float(psutil.Process().memory_info().rss)


def _delta_mb(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else max(after - before, 0.0) / 1e6
