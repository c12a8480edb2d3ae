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

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__
from toolkit._scoped import torch_threads
from toolkit.bench.candidates import TORCH_COMPILE, TORCH_EAGER, Candidate, OrtCandidate, TorchCandidate
from toolkit.bench.flops import graph_flops
from toolkit.bench.measure import COOLDOWN_S, gemm_peak, measure
from toolkit.bench.report import BenchReport, machine, rows
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.samples import make_feeds
from toolkit.runtime.session import PROVIDERS, cuda_status

__all__ = ["available_providers", "bench"]

Progress = Callable[[str], None]


def available_providers() -> list[str]:
    return ["cpu"] + (["cuda"] if cuda_status()[0] else [])


def bench(
    bundle: str | Path | Bundle,
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
    cuda_graph: bool = False,
    reference: Any = None,
    shapes: Sequence[Mapping[str, int]] | None = None,
    progress: Progress | None = None,
    trust_source: bool = False,
) -> BenchReport:
    """Benchmarks `variants` (default: all) of the bundle on `providers` at every batch (× seq for
    models with a `seq` dim) and thread count (default: the CPUs this process may use), spending
    about `max_time` seconds per cell. With `cuda_graph`, every CUDA variant is also timed replayed
    from a captured CUDA graph (rows `<variant>+graph`). `reference` is the bundle's PyTorch reference
    (`ModelSpec`) if the caller has it built already. `shapes` lists the sizes to time instead of
    `batches` × `seqs` (e.g. a decoder's steps: {"batch": 1, "seq": 1, "past": 32}); dims they leave
    out take their export size. `trust_source` vouches for the code the manifest's source names (see `bundle_reference`)."""
    say = progress or (lambda _msg: None)
    bundle = Bundle.of(bundle, trust_source=trust_source)
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
    shapes = _shapes(manifest.dims, batches, seqs) if shapes is None else [_sizes(manifest.dims, s) for s in shapes]
    say(f"measuring the GEMM peak on {', '.join(providers)}")
    peaks = {p: gemm_peak(p, threads=max(counts)) for p in providers}
    if "cpu" in providers and any(bundle.variant(n).precision == "int8" for n in names):  # CUDA has no integer MatMul kernels
        peaks["cpu int8"] = gemm_peak("cpu", threads=max(counts), dtype="int8")
    torch_kinds = [k for k, wanted in ((TORCH_EAGER, torch_eager), (TORCH_COMPILE, torch_compile)) if wanted]
    if torch_kinds and reference is None:
        from toolkit.reference.source import bundle_reference

        say("building the PyTorch reference")
        try:
            reference = bundle_reference(bundle)
        except ToolkitError as exc:
            raise ToolkitError(f"{exc} Or time the variants alone, without the PyTorch baseline: --no-torch.") from None
    if cuda_graph and "cuda" not in providers:
        raise ToolkitError("--cuda-graph needs the cuda provider (--providers cuda).")
    candidates = _candidates(bundle, names, providers, counts, reference.module if torch_kinds else None, torch_kinds, cuda_graph)
    table, schedule = _measure_shapes(bundle, candidates, shapes, peaks, max_time=max_time, rounds=rounds, warmup=warmup, say=say)
    import onnxruntime

    versions = {"toolkit": __version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    if torch_kinds:
        import torch

        versions["torch"] = torch.__version__
    return BenchReport(
        rows=table,
        machine=machine(peaks),
        settings={"max_time_s_per_cell": max_time, "rounds": rounds, "warmup": warmup, "threads": counts, "bundle": str(bundle.path)},
        versions=versions,
        schedule=schedule,
    )


def _candidates(bundle: Bundle, names: Sequence[str], providers: Sequence[str], counts: Sequence[int], module: Any,
                torch_kinds: Sequence[str], cuda_graph: bool) -> list[Candidate]:
    """Every candidate: the torch kinds, then each variant (and on CUDA its captured form, with
    `cuda_graph`), per provider and thread count."""
    candidates: list[Candidate] = []
    for provider in providers:
        for n in counts:
            candidates.extend(TorchCandidate(module, provider, kind, n) for kind in torch_kinds)
    for provider in providers:
        for n in counts:
            candidates.extend(OrtCandidate(bundle, name, provider, n) for name in names)
            if cuda_graph and provider == "cuda":
                candidates.extend(OrtCandidate(bundle, name, provider, n, cuda_graph=True) for name in names)
    if len(counts) > 1:
        for candidate in candidates:
            candidate.label += f"@{candidate.threads}t"
    return candidates


def _measure_shapes(bundle: Bundle, candidates: list[Candidate], shapes: list[dict[str, int]], peaks: dict[str, float], *,
                    max_time: float, rounds: int, warmup: int, say: Progress) -> tuple[list[Any], list[list[str]]]:
    """Opens every candidate, times them side by side at each shape, closes them; → rows, and the
    order the candidates ran in per round at the first shape."""
    manifest = bundle.manifest
    table, schedule = [], []
    with contextlib.ExitStack() as stack:
        if any(isinstance(c, TorchCandidate) for c in candidates):
            import torch

            # torch's thread count is process-wide: the torch candidates set theirs as their turn begins
            stack.enter_context(torch_threads(torch.get_num_threads()))
        for candidate in candidates:
            stack.callback(candidate.close)
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
            table.extend(rows(manifest.name, candidates, latencies, sizes, _flops(bundle, sizes), peaks))
    return table, schedule


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
    return [_sizes(dims, {k: v for k, v in (("batch", batch), ("seq", seq)) if k in by_name and v is not None})
            for batch in batches for seq in seq_sizes]


def _sizes(dims: Sequence[Any], given: Mapping[str, int]) -> dict[str, int]:
    """Every dim's size: `given`, else its export size; each within the dim's range."""
    by_name = {d.name: d for d in dims}
    unknown = set(given) - set(by_name)
    if unknown:
        raise ToolkitError(f"no dim {', '.join(sorted(unknown))} in this model; its dims are {', '.join(by_name) or 'none'}.")
    sizes = {d.name: given.get(d.name, d.export) for d in dims}
    for name, value in sizes.items():
        dim = by_name[name]
        if value < dim.min or (dim.max is not None and value > dim.max):
            raise ToolkitError(f"{name} {value} is out of range for this model: {name} must lie in [{dim.min}, {dim.max}].")
    return sizes


def _flops(bundle: Bundle, sizes: dict[str, int]) -> float | None:
    if "fp32" not in bundle.manifest.variants or bundle.sealed:
        return None
    return graph_flops(bundle.variant_path("fp32", verify=False), sizes)


def _describe(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sizes.items())
