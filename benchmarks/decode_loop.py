"""What the loop around a decode graph costs: onnxruntime-genai's own loop (C++, its cache in one
buffer that GroupQueryAttention writes in place), the same graph driven by the leanest Python loop
there is (session.run on numpy arrays, each step fed the cache the last one returned, argmax), toolkit's
graph driven by that very loop, and toolkit's Generator over the growing cache and over the in-place
one (toolkit.runtime.inplace). All run in one process on one onnxruntime (the one onnxruntime-genai
installs), in interleaved rounds, so the columns differ only in the graph and the loop.

    python benchmarks/decode_loop.py [--batches 1,8] [--new 64,256] [--rounds 5]

It reads the models `python benchmarks/peers.py --models llama` leaves in its work directory: toolkit's
bundle (opt, and int4 with the 4-bit head) and onnxruntime-genai's fp32 and int4, and runs itself again
in the peers' onnxruntime-genai environment. Decode ms/token as in peers.py: (T(new) - T(1)) / (new - 1),
medians over the rounds; 32-token prompts, exactly `new` tokens (end-of-text ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# precision → (toolkit's bundle under the model's work directory, its variant, onnxruntime-genai's directory)
PAIRS = {"int4": ("toolkit-head4", "int4", "genai-int4"), "fp32": ("toolkit", "opt", "genai-fp32")}
LOOPS = ("genai", "genai graph, Python loop", "toolkit graph, Python loop", "toolkit Generator, growing cache",
         "toolkit Generator, in-place cache")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", default="64,256", help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "peers" / "llama-small")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    from peers import VENVS, _venv
    from serve_load import write_section

    from toolkit.bench.report import machine

    missing = [args.work / d for pair in PAIRS.values() for d in (pair[0], pair[2]) if not (args.work / d).is_dir()]
    if missing:
        parser.error(f"{missing[0]} is missing: run python benchmarks/peers.py --models llama first")
    python = _venv(args.work.parent / "venvs" / "genai", VENVS["genai"])
    child = subprocess.run([str(python), __file__, "--child", *sys.argv[1:]], check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(child.stdout.splitlines()[-1])
    text = section(result, " ".join(["python benchmarks/decode_loop.py", *sys.argv[1:]]), machine({})["cpu"])
    write_section(args.results, text)
    print(text)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    rows = []
    for precision, (bundle, variant, genai_dir) in PAIRS.items():
        runners = _runners(args.work, bundle, variant, genai_dir, args.threads)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = np.random.default_rng(batch).integers(1, 32000, (batch, 32))
            for run in runners.values():  # warm-up: sessions' first runs allocate
                run(prompts, 2)
            for new in [int(n) for n in args.new.split(",")]:
                times: dict[str, list[float]] = {name: [] for name in runners}
                for r in range(args.rounds):
                    for name in list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]:
                        first = _seconds(runners[name], prompts, 1)
                        times[name].append((_seconds(runners[name], prompts, new) - first) / (new - 1) * 1e3)
                rows.append({"precision": precision, "batch": batch, "new": new,
                             "ms_per_token": {name: float(np.median(t)) for name, t in times.items()}})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"onnxruntime": ort.__version__, "rounds": args.rounds, "threads": args.threads, "rows": rows}


def _seconds(run: Any, prompts: np.ndarray, new: int) -> float:
    start = time.perf_counter()
    run(prompts, new)
    return time.perf_counter() - start


def _runners(work: Path, bundle: str, variant: str, genai_dir: str, threads: int) -> dict[str, Any]:
    from peer_worker import genai_runner

    from toolkit.runtime.generate import Generator

    genai = genai_runner(str(work / genai_dir), threads)
    growing, inplace = (Generator(work / bundle, variant=variant, provider="cpu", threads=threads, cache=c) for c in ("growing", "inplace"))
    for generator in (growing, inplace):
        generator.layout = dataclasses.replace(generator.layout, eos_ids=())  # exactly `new` tokens, as the peers
    head_size = json.loads((work / genai_dir / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    return {
        LOOPS[0]: lambda prompts, new: genai(prompts.tolist(), new),
        LOOPS[1]: _python_loop(work / genai_dir / "model.onnx", threads, head_size),
        LOOPS[2]: _python_loop(growing.model.bundle.variant_path(variant), threads, head_size),
        LOOPS[3]: lambda prompts, new: list(growing.tokens(prompts.tolist(), max_new_tokens=new)),
        LOOPS[4]: lambda prompts, new: list(inplace.tokens(prompts.tolist(), max_new_tokens=new)),
    }


def _python_loop(path: Path, threads: int, head_size: int) -> Any:
    """Greedy decoding over the graph at `path` with nothing around session.run but the feeds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    caches = {i.name: i.shape[1] for i in session.get_inputs() if i.name.startswith("past")}
    # toolkit's past_key_0 → present_key_0; onnxruntime-genai's past_key_values.0.key → present.0.key
    present = {name: name.replace("past_key_values.", "present.") if "past_key_values." in name else "present_" + name[5:] for name in caches}
    positions = any(i.name == "position_ids" for i in session.get_inputs())

    def run(prompts: np.ndarray, new: int) -> None:
        batch, length = prompts.shape
        feeds = {"input_ids": prompts, "attention_mask": np.ones((batch, length), np.int64)}
        feeds |= {name: np.zeros((batch, heads, 0, head_size), np.float32) for name, heads in caches.items()}
        if positions:
            feeds["position_ids"] = np.tile(np.arange(length), (batch, 1))
        for _ in range(new):
            outputs = dict(zip(names, session.run(None, feeds), strict=True))
            token = outputs["logits"][:, -1].argmax(-1)
            total = feeds["attention_mask"].shape[1]
            feeds = {"input_ids": token[:, None], "attention_mask": np.ones((batch, total + 1), np.int64)}
            feeds |= {name: outputs[present[name]] for name in caches}
            if positions:
                feeds["position_ids"] = np.full((batch, 1), total)

    return run


def section(result: dict[str, Any], command: str, cpu: str) -> str:
    lines = ["## The loop around the decode graph (LLaMA 124M)", "",
             f"Written by `{command}` ({cpu}, {result['threads']} threads, onnxruntime {result['onnxruntime']} for every column, "
             f"medians of {result['rounds']} interleaved rounds): decode ms/token, and each column ÷ onnxruntime-genai's own loop. "
             "The Python loop is the leanest there is: session.run on numpy arrays, the cache the last step returned, argmax. "
             "int4 is toolkit's with its head in 4-bit blocks (onnxruntime-genai's precision), fp32 toolkit's `opt`. "
             "The second column against the first is what driving onnxruntime from Python costs on the peer's own graph (a call "
             "per step, numpy in and out, a new cache every step); the third against the second compares the two graphs in the "
             "same loop; the last two are toolkit's Generator, over the bundle's graph and over the graph rewritten for a cache "
             "written in place (the default on the CPU where it applies).", "",
             "| precision | batch | new | " + " | ".join(LOOPS) + " |", "|---|---|---|" + "---|" * len(LOOPS)]
    for row in result["rows"]:
        ms = row["ms_per_token"]
        cells = [f"{ms[name]:.2f}" + ("" if name == LOOPS[0] else f" ({ms[name] / ms[LOOPS[0]]:.2f}×)") for name in LOOPS]
        lines.append(f"| {row['precision']} | {row['batch']} | {row['new']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    raise SystemExit(main())
