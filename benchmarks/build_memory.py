"""Where `toolkit build` spends memory: runs it on a model, samples the resident memory of its whole
process tree (the build and the children it starts: the export worker, onnxruntime's tools) every
50 ms, and prints the peak of each stage, named by the build's progress line.

    python benchmarks/build_memory.py llama mid        # the 56M LLaMA-style model of models/hf_causal.py
    python benchmarks/build_memory.py gpt2 small -- --mode int8   # arguments after -- go to toolkit build

Writes the "## Building a decoder: memory" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import write_section  # noqa: E402

from models.hf_causal import causal_lm  # noqa: E402


def main() -> int:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    kind, size, *extra = sys.argv[1:]
    extra = extra[1:] if extra[:1] == ["--"] else extra
    model = causal_lm(kind, size)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "toolkit.cli", "build", f"hf:{model}", "-o", str(Path(tmp) / "bundle"), *extra]
        stages, peak, at_peak = _sample(command)
    lines = ["## Building a decoder: memory", "",
             f"Written by `python benchmarks/build_memory.py {' '.join(sys.argv[1:])}`: `toolkit build` of the {kind} of "
             f"models/hf_causal.py size {size!r} ({weights / 2**20:.0f} MB of fp32 weights), the resident memory of its "
             "process and every child it starts, sampled every 50 ms. Peak "
             f"**{peak / 2**20:,.0f} MB** ({peak / weights:.1f}× the weights) while {at_peak}.", "",
             "| from s | stage (the build's progress line) | peak MB |", "|---|---|---|"]
    lines += [f"| {seconds:.1f} | {stage} | {rss / 2**20:,.0f} |" for stage, (seconds, rss) in stages.items() if rss]
    section = "\n".join(lines) + "\n"
    results = ROOT / "benchmarks" / "RESULTS.md"
    write_section(results, section)
    print(section)
    return 0


def _sample(command: list[str]) -> tuple[dict[str, tuple[float, int]], int, str]:
    """{progress line: (seconds since start, peak bytes while it was the latest)}, the peak, and its line with
    the share of each process."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    root, start = psutil.Process(process.pid), time.perf_counter()
    stage, stages, peak = ["start"], {"start": (0.0, 0)}, [0, ""]

    def sample() -> None:
        while process.poll() is None:
            try:
                each = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
            except psutil.Error:
                continue
            seconds, high = stages[stage[0]]
            stages[stage[0]] = (seconds, max(high, sum(each)))
            if sum(each) > peak[0]:
                peak[:] = [sum(each), f"{stage[0]} (build {each[0] / 2**20:.0f} MB, children {[round(e / 2**20) for e in each[1:]]} MB)"]
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    for line in process.stdout:
        if line.startswith("•"):
            stage[0] = line.strip("• \n")
            stages.setdefault(stage[0], (time.perf_counter() - start, 0))
    if process.wait():
        raise SystemExit(f"toolkit build failed (exit {process.returncode})")
    return stages, peak[0], peak[1]


if __name__ == "__main__":
    sys.exit(main())
