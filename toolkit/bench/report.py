"""The bench's results: one `Row` per candidate and shape, the report around them (machine,
settings, versions), and its JSON and CSV forms."""

from __future__ import annotations

import csv
import io
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.candidates import TORCH_EAGER, Candidate

__all__ = ["ROW_FIELDS", "BenchReport", "Row", "machine", "rows"]


@dataclass
class Row:
    """One cell of the table: one candidate at one shape."""

    model: str
    provider: str
    variant: str
    batch: int
    seq: int | None
    past: int | None  # a decoder's cached tokens
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
    dims: str = ""  # the sizes of the dims other than batch and seq ("past 32", "frames 100")


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


def rows(model: str, candidates: list[Candidate], latencies: dict[str, np.ndarray], sizes: dict[str, int],
          flop: float | None, peaks: dict[str, float]) -> list[Row]:
    batch = sizes.get("batch", 1)
    torch_p50 = {(c.provider, c.threads): float(np.median(latencies[c.label])) for c in candidates if c.variant == TORCH_EAGER}
    rows = []
    for c in candidates:
        seconds = latencies[c.label]
        p50, p90, p99 = (float(np.percentile(seconds, q)) for q in (50, 90, 99))
        reference = torch_p50.get((c.provider, c.threads))
        rows.append(Row(
            model=model, provider=c.provider, variant=c.variant, batch=batch, seq=sizes.get("seq"), past=sizes.get("past"),
            threads=c.threads,
            p50_ms=p50 * 1e3, p90_ms=p90 * 1e3, p99_ms=p99 * 1e3, mean_ms=float(seconds.mean()) * 1e3,
            iterations=len(seconds), items_per_s=batch / float(seconds.mean()),
            speedup_vs_torch=reference / p50 if reference else None,
            gflop=flop / 1e9 if flop else None, gflops_per_s=flop / p50 / 1e9 if flop else None,
            gemm_peak_gflops_per_s=peaks.get(f"{c.provider} int8" if c.precision == "int8" else c.provider, peaks.get(c.provider)),
            peak_mem_mb=c.peak_mem_mb, cpu_nodes=c.cpu_nodes,
            parity=c.parity, dims=", ".join(f"{name} {size}" for name, size in sizes.items() if name not in ("batch", "seq")),
        ))
    return rows


def machine(peaks: dict[str, float]) -> dict[str, Any]:
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
