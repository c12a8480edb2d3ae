"""Where `toolkit build` spends memory: runs it on a model, samples the memory of its whole process
tree (the build and the children it starts: the export worker, onnxruntime's tools) every 50 ms, and
prints the peak of each stage, named by the build's progress line.

Memory is proportional set size (PSS): each page counted once, shared ones split between the
processes that map them, so the libraries that the build and its children both load (torch,
onnxruntime) are not counted twice, as a sum of resident sizes would (that sum is printed beside).
The fixed overhead, what a build needs whatever the model's size, is the peak of the same build of
the same architecture at size 'tiny' (under 1 MB of weights), run first; the issue's goal is a peak
under 4× the fp32 weights plus that overhead.

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
    overhead, _, _, _ = _build(kind, "tiny", extra)
    peak, rss, at_peak, stages = _build(kind, size, extra)
    weights = sum(f.stat().st_size for f in causal_lm(kind, size).glob("*.safetensors"))
    lines = ["## Building a decoder: memory", "",
             f"Written by `python benchmarks/build_memory.py {' '.join(sys.argv[1:])}`: `toolkit build` of the {kind} of "
             f"models/hf_causal.py size {size!r} ({weights / 2**20:.0f} MB of fp32 weights), the memory of its process and every "
             "child it starts (proportional set size: shared pages split between the processes that map them), sampled every "
             f"50 ms. Peak **{peak / 2**20:,.0f} MB** while {at_peak}; the same build of size 'tiny' peaks at {overhead / 2**20:,.0f} MB "
             f"(the fixed overhead: interpreters, torch, onnxruntime), so the model itself costs **{(peak - overhead) / weights:.1f}× its "
             f"weights** at the peak (goal: under 4×). Summed resident sizes, which count shared libraries once per process, peak at "
             f"{rss / 2**20:,.0f} MB.", "",
             "| from s | stage (the build's progress line) | peak MB |", "|---|---|---|"]
    lines += [f"| {seconds:.1f} | {stage} | {high / 2**20:,.0f} |" for stage, (seconds, high) in stages.items() if high]
    section = "\n".join(lines) + "\n"
    write_section(ROOT / "benchmarks" / "RESULTS.md", section)
    print(section)
    return 0


def _build(kind: str, size: str, extra: list[str]) -> tuple[int, int, str, dict[str, tuple[float, int]]]:
    """(peak PSS, peak summed RSS, the stage at the PSS peak, {stage: (start s, peak PSS)}) of one build."""
    model = causal_lm(kind, size)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "toolkit.cli", "build", f"hf:{model}", "-o", str(Path(tmp) / "bundle"), *extra]
        print(f"{kind} {size}: {' '.join(command[1:])}", flush=True)
        return _sample(command)


def _sample(command: list[str]) -> tuple[int, int, str, dict[str, tuple[float, int]]]:
    """Runs `command`; returns its peak PSS, its peak summed RSS, the progress line at the PSS peak with the
    share of each process, and {progress line: (seconds since start, peak PSS while it was the latest)}."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    root, start = psutil.Process(process.pid), time.perf_counter()
    stage, stages, peak, rss_peak = ["start"], {"start": (0.0, 0)}, [0, ""], [0]

    def sample() -> None:
        while process.poll() is None:
            try:
                each = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
            except psutil.Error:
                continue
            pss = [m.pss for m in each]
            seconds, high = stages[stage[0]]
            stages[stage[0]] = (seconds, max(high, sum(pss)))
            rss_peak[0] = max(rss_peak[0], sum(m.rss for m in each))
            if sum(pss) > peak[0]:
                peak[:] = [sum(pss), f"{stage[0]} (build {pss[0] / 2**20:.0f} MB, children {[round(e / 2**20) for e in pss[1:]]} MB)"]
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    for line in process.stdout:
        if line.startswith("•"):
            stage[0] = line.strip("• \n")
            stages.setdefault(stage[0], (time.perf_counter() - start, 0))
    if process.wait():
        raise SystemExit(f"toolkit build failed (exit {process.returncode})")
    return peak[0], rss_peak[0], peak[1], stages


if __name__ == "__main__":
    sys.exit(main())
