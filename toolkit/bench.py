"""`toolkit bench`: latency and throughput of a bundle's variants on each provider, side by side with
the PyTorch reference, measured in one process.

How the numbers are made honest:
- every candidate (torch eager, each provider × variant) is warmed up, then all candidates run in
  interleaved rounds (the order rotates every round) so that machine drift hits them alike, with a
  pause between turns so that threads one candidate leaves spinning do not slow the next;
- each iteration is timed on its own, so percentiles (p50/p90/p99) are real, not averages;
- torch and onnxruntime use the same number of threads in every row, and each row's speed-up is
  against torch eager at that thread count; several counts (`threads=(1, 2)`) are measured side by
  side, since the fastest count differs by model and batch;
- on CUDA, inputs and outputs stay on the device (IO binding), every iteration ends synchronized,
  and the nodes that landed on the CPU provider are counted;
- a matrix product measured in the same run gives the machine's GEMM peak, next to each row's
  achieved GFLOP/s.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime import PROVIDERS, Model, cuda_status, new_session
from toolkit.samples import make_feeds

__all__ = ["BenchReport", "Row", "available_providers", "bench", "measure", "gemm_peak", "TORCH_EAGER", "TORCH_COMPILE"]

TORCH_EAGER = "torch-eager"
TORCH_COMPILE = "torch-compile"
# Idle time between two candidates' turns (at most one turn's length, so that quick runs stay quick).
# After a run, onnxruntime's pool threads spin for tens of milliseconds waiting for more work (torch's
# OpenMP threads for a few): without a pause they keep a core from the next candidate, which doubled
# 2-thread latencies on 2 cores.
COOLDOWN_S = 0.1
Progress = Callable[[str], None]
Step = Callable[[], None]


@dataclass
class Row:
    """One cell of the table: one candidate at one shape."""

    model: str
    provider: str
    variant: str
    batch: int
    seq: int | None
    threads: int  # intra-op threads of onnxruntime, or torch's
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int
    items_per_s: float
    speedup_vs_torch: float | None
    gflop: float | None  # work of one call (MatMul, Gemm, Conv, LSTM)
    gflops_per_s: float | None
    gemm_peak_gflops_per_s: float | None
    peak_mem_mb: float | None
    cpu_nodes: int | None  # CUDA: nodes onnxruntime placed on the CPU provider
    parity: str  # pass, FAIL, unchecked, or "reference" for torch


ROW_FIELDS = tuple(f.name for f in fields(Row))


@dataclass
class BenchReport:
    rows: list[Row]
    machine: dict[str, Any]
    settings: dict[str, Any]
    versions: dict[str, str]
    schedule: list[list[str]] = field(default_factory=list)  # candidate order per round, first shape

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings, "versions": self.versions,
                "schedule": self.schedule, "rows": [asdict(r) for r in self.rows]}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in self.rows)
        return buffer.getvalue()


def available_providers() -> list[str]:
    return ["cpu"] + (["cuda"] if cuda_status()[0] else [])


def bench(
    path: str | Path,
    *,
    providers: Sequence[str] = ("cpu",),
    variants: Sequence[str] | None = None,
    batches: Sequence[int] = (1,),
    seqs: Sequence[int] | None = None,
    torch_eager: bool = True,
    torch_compile: bool = False,
    max_time: float = 1.0,
    rounds: int = 5,
    warmup: int = 5,
    threads: int | Sequence[int] | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmarks `variants` (default: all) of the bundle at `path` on `providers` at every batch
    (× seq for models with a `seq` dim) and thread count (default: the CPUs this process may use),
    spending about `max_time` seconds per cell."""
    say = progress or (lambda _msg: None)
    bundle = Bundle.open(path)
    manifest = bundle.manifest
    names = list(variants) if variants else list(manifest.variants)
    for name in names:
        bundle.variant(name)  # an unknown variant lists the bundle's variants
    _check_providers(providers)
    if max_time <= 0 or rounds < 1 or warmup < 0:
        raise ToolkitError("--max-time must be positive, --rounds at least 1 and --warmup at least 0.")
    if any(b < 1 for b in batches) or (seqs and any(s < 1 for s in seqs)):
        raise ToolkitError("batch sizes and sequence lengths must be at least 1.")
    counts = _thread_counts(threads)
    shapes = _shapes(manifest.dims, batches, seqs)

    say(f"measuring the GEMM peak on {', '.join(providers)}")
    peaks = {p: gemm_peak(p, threads=max(counts)) for p in providers}

    candidates: list[_Candidate] = []
    torch_threads = None
    if torch_eager or torch_compile:
        say("building the PyTorch reference")
        import torch

        from toolkit.source import resolve

        torch_threads = torch.get_num_threads()
        spec = resolve(manifest.source)
        for provider in providers:
            for n in counts:
                if torch_eager:
                    candidates.append(_TorchCandidate(spec.module, provider, TORCH_EAGER, n))
                if torch_compile:
                    candidates.append(_TorchCandidate(spec.module, provider, TORCH_COMPILE, n))
    for provider in providers:
        for n in counts:
            candidates.extend(_OrtCandidate(bundle, name, provider, n) for name in names)
    if len(counts) > 1:
        for candidate in candidates:
            candidate.label += f"@{candidate.threads}t"

    rows: list[Row] = []
    schedule: list[list[str]] = []
    try:
        for candidate in candidates:
            say(f"loading {candidate.label}")
            candidate.open(manifest, shapes)
        for sizes in shapes:
            say(f"measuring {len(candidates)} candidates at {_describe(sizes)}")
            feeds = make_feeds(manifest.inputs, sizes, seed=0)
            steps = {c.label: c.prepare(feeds) for c in candidates}
            latencies, order = measure(steps, max_time=max_time * len(steps), rounds=rounds, warmup=warmup,
                                       cooldown=min(COOLDOWN_S, max_time / rounds) if len(steps) > 1 else 0.0)
            schedule = schedule or order
            rows.extend(_rows(manifest.name, candidates, latencies, sizes, _flops(bundle, sizes), peaks))
    finally:
        for candidate in candidates:
            candidate.close()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # the torch candidates set it for the whole process
    import onnxruntime

    versions = {"toolkit": __version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    if torch_threads is not None:
        versions["torch"] = torch.__version__
    return BenchReport(
        rows=rows,
        machine=_machine(peaks),
        settings={"max_time_s_per_cell": max_time, "rounds": rounds, "warmup": warmup, "threads": counts,
                  "bundle": str(bundle.path)},
        versions=versions,
        schedule=schedule,
    )


def measure(
    steps: Mapping[str, Step], *, max_time: float, rounds: int, warmup: int, cooldown: float = 0.0,
    clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Times every step in interleaved rounds; returns (latencies in seconds per step, the order the
    steps ran in per round).

    Each step is warmed up `warmup` times, then each round gives each step about
    max_time / (rounds × steps) seconds (at least one iteration), starting with a different step
    every round. A step's `enter` attribute, where it has one, is called untimed before each of its
    turns, and `cooldown` seconds pass idle after each turn.
    """
    labels = list(steps)
    for label in labels:
        _enter(steps[label])
        for _ in range(warmup):
            steps[label]()
    budget = max_time / (rounds * len(labels))
    samples: dict[str, list[float]] = {label: [] for label in labels}
    order: list[list[str]] = []
    for r in range(rounds):
        this_round = labels[r % len(labels):] + labels[: r % len(labels)]
        order.append(this_round)
        for label in this_round:
            step = steps[label]
            _enter(step)
            deadline = clock() + budget
            while True:
                start = clock()
                step()
                end = clock()
                samples[label].append(end - start)
                if end >= deadline:
                    break
            sleep(cooldown)
    return {label: np.asarray(s) for label, s in samples.items()}, order


def _enter(step: Step) -> None:
    enter = getattr(step, "enter", None)
    if enter is not None:
        enter()


GEMM_SIZES = {"cpu": (256, 512, 1024), "cuda": (1024, 2048, 4096)}  # a GPU needs larger products to fill


def gemm_peak(provider: str, *, threads: int, sizes: Sequence[int] | None = None, seconds: float = 0.3) -> float:
    """GFLOP/s of onnxruntime's fp32 MatMul of square matrices on `provider`, the best over `sizes`:
    what this runtime achieves on this machine, the practical limit the model rows are compared with."""
    return max(_gemm(provider, threads, size, seconds) for size in sizes or GEMM_SIZES[provider])


def _gemm(provider: str, threads: int, size: int, seconds: float) -> float:
    from onnx import TensorProto, helper

    from toolkit._onnx import IR_VERSION_CAP

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = IR_VERSION_CAP
    session = _session(proto.SerializeToString(), provider, threads)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size)).astype(np.float32) for n in ("a", "b")}
    step = _ort_step(session, feeds, provider)
    latencies, _ = measure({"gemm": step}, max_time=seconds, rounds=1, warmup=3)
    return 2 * size**3 / float(np.median(latencies["gemm"])) / 1e9


class _Candidate:
    label: str
    provider: str
    variant: str
    threads: int
    parity: str
    peak_mem_mb: float | None = None
    cpu_nodes: int | None = None

    def open(self, manifest: Any, shapes: list[dict[str, int]]) -> None: ...

    def prepare(self, feeds: dict[str, np.ndarray]) -> Step: ...

    def close(self) -> None: ...


class _OrtCandidate(_Candidate):
    def __init__(self, bundle: Bundle, variant: str, provider: str, threads: int):
        self.bundle, self.variant, self.provider, self.threads = bundle, variant, provider, threads
        self.label = f"{provider}/{variant}"
        parity = bundle.manifest.variants[variant].parity
        self.parity = "unchecked" if parity is None else ("pass" if parity["passed"] else "FAIL")

    def open(self, manifest: Any, shapes: list[dict[str, int]]) -> None:
        before = _memory(self.provider)
        self.model = Model(self.bundle.path, variant=self.variant, provider=self.provider, threads=self.threads)
        for sizes in shapes:  # every shape once, so the memory figure covers the largest
            self.model.run(make_feeds(manifest.inputs, sizes, seed=0))
        self.peak_mem_mb = _delta_mb(before, _memory(self.provider))
        if self.provider == "cuda":
            self.cpu_nodes = _nodes_by_provider(self.bundle.variant_path(self.variant), self.provider,
                                                make_feeds(manifest.inputs, shapes[0], seed=0), self.threads).get("CPUExecutionProvider", 0)

    def prepare(self, feeds: dict[str, np.ndarray]) -> Step:
        return _ort_step(self.model.session, self.model.validate(feeds), self.provider)

    def close(self) -> None:
        self.model = None


class _TorchCandidate(_Candidate):
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


def _ort_step(session: Any, feeds: dict[str, np.ndarray], provider: str) -> Step:
    if provider != "cuda":
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    # Inputs copied to the GPU once, outputs left there: the timing holds no host-device copies.
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def step() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return step


def _session(model: bytes | str, provider: str, threads: int, profile: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    options.enable_profiling = profile
    return new_session(model, provider, options)


def _nodes_by_provider(model_file: Path, provider: str, feeds: dict[str, np.ndarray], threads: int) -> dict[str, int]:
    """How many nodes ran on each execution provider, from onnxruntime's profile of one run."""
    session = _session(str(model_file), provider, threads, profile=True)
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


def _rows(model: str, candidates: list[_Candidate], latencies: dict[str, np.ndarray], sizes: dict[str, int],
          flop: float | None, peaks: dict[str, float]) -> list[Row]:
    batch = sizes.get("batch", 1)
    torch_p50 = {(c.provider, c.threads): float(np.median(latencies[c.label])) for c in candidates if c.variant == TORCH_EAGER}
    rows = []
    for c in candidates:
        seconds = latencies[c.label]
        p50, p90, p99 = (float(np.percentile(seconds, q)) for q in (50, 90, 99))
        reference = torch_p50.get((c.provider, c.threads))
        rows.append(Row(
            model=model, provider=c.provider, variant=c.variant, batch=batch, seq=sizes.get("seq"), threads=c.threads,
            p50_ms=p50 * 1e3, p90_ms=p90 * 1e3, p99_ms=p99 * 1e3, mean_ms=float(seconds.mean()) * 1e3,
            iterations=len(seconds), items_per_s=batch / float(seconds.mean()),
            speedup_vs_torch=reference / p50 if reference else None,
            gflop=flop / 1e9 if flop else None, gflops_per_s=flop / p50 / 1e9 if flop else None,
            gemm_peak_gflops_per_s=peaks.get(c.provider), peak_mem_mb=c.peak_mem_mb, cpu_nodes=c.cpu_nodes,
            parity=c.parity,
        ))
    return rows


def _check_providers(providers: Sequence[str]) -> None:
    available = available_providers()
    if not providers:
        raise ToolkitError(f"no provider given; available here: {', '.join(available)}.")
    for provider in providers:
        if provider not in PROVIDERS:
            raise ToolkitError(f"unknown provider {provider!r}; available here: {', '.join(available)}.")
        if provider not in available:
            raise ToolkitError(f"provider {provider!r} is not available here ({cuda_status()[1]}); available: {', '.join(available)}.")


def _thread_counts(threads: int | Sequence[int] | None) -> list[int]:
    cpus = len(os.sched_getaffinity(0))
    if threads is None:
        return [cpus]
    counts = sorted(set([threads] if isinstance(threads, int) else threads))
    if not counts or not all(1 <= n <= cpus for n in counts):
        raise ToolkitError(f"thread counts {counts}: this process may use {cpus} CPUs; give counts from 1 to {cpus}.")
    return counts


def _shapes(dims: Sequence[Any], batches: Sequence[int], seqs: Sequence[int] | None) -> list[dict[str, int]]:
    by_name = {d.name: d for d in dims}
    if seqs and "seq" not in by_name:
        raise ToolkitError(f"--seq applies to models with a 'seq' dim; this one has dims {', '.join(by_name) or 'none'}.")
    if "batch" not in by_name and tuple(batches) != (1,):
        raise ToolkitError("this model has no 'batch' dim; leave --batch at 1.")
    seq_sizes = list(seqs) if seqs else ([min(32, by_name["seq"].max or 32)] if "seq" in by_name else [None])
    shapes = []
    for batch in batches:
        for seq in seq_sizes:
            sizes = {d.name: d.export for d in dims}
            sizes.update({k: v for k, v in (("batch", batch), ("seq", seq)) if k in by_name and v is not None})
            for name, value in sizes.items():
                dim = by_name[name]
                if value < dim.min or (dim.max is not None and value > dim.max):
                    raise ToolkitError(f"{name} {value} is out of range for this model: {name} must lie in [{dim.min}, {dim.max}].")
            shapes.append(sizes)
    return shapes


def _flops(bundle: Bundle, sizes: dict[str, int]) -> float | None:
    from toolkit._flops import graph_flops

    return graph_flops(bundle.variant_path("fp32", verify=False), sizes) if "fp32" in bundle.manifest.variants else None


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


def _describe(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sizes.items())


def _machine(peaks: dict[str, float]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                            "gemm_peak_gflops_per_s": {p: round(v, 1) for p, v in peaks.items()}}
    if "cuda" in peaks:
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
        except Exception:
            info["gpu"] = "unknown"
    return info
