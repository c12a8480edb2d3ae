"""Structured pruning (`toolkit prune`) on the zoo: per model and amount, the parameter and MAC ratios,
the onnxruntime latency of the pruned graph against the unpruned one at batch 1 and 32 (interleaved,
one run), and the task before and after (fine-tuned with the model's recipe where it has one).

    python benchmarks/prune.py      # → the "## Pruning" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from serve_load import write_section  # noqa: E402

MODELS = ("mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq")
AMOUNTS = (0.25, 0.5)
BATCHES = (1, 32)
BLOCKED = ("cnn",)  # also pruned with --round-to the CPU's NCHWc block


def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc convolutions on this CPU (MLAS: 16 with AVX-512, else 8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--work", type=Path, default=HERE / ".bundles" / "prune")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)

    from toolkit.compile import export
    from toolkit.compile.prune import prune

    rows = []
    block = nchwc_block()
    for model in args.models.split(","):
        unpruned = args.work / f"{model}-unpruned"
        if not (unpruned / "manifest.json").is_file():
            export(model, unpruned, preset=args.preset, force=True, progress=print)
        for amount in AMOUNTS:
            for round_to in (1, block) if model in BLOCKED else (1,):
                target = args.work / f"{model}-{amount:g}-{round_to}"
                started = time.perf_counter()
                bundle = prune(model, target, amount=amount, preset=args.preset, round_to=round_to, force=True, progress=print)
                seconds = time.perf_counter() - started
                times = _latencies([unpruned, target], args.rounds)
                rows.append((model, amount, bundle.manifest, seconds, times))
    lines = ["## Pruning", "",
             f"Written by `python benchmarks/prune.py` on {len(os.sched_getaffinity(0))} CPUs: `toolkit prune MODEL --amount A` (l1) on "
             f"the zoo's {args.preset} presets, fine-tuned with each model's training recipe (a fifth of its steps, or 5 digit epochs). "
             "Latency: one call of the fp32 graph on onnxruntime's CPU provider at the batch given and the export size of the other "
             f"dims (a decoder's step over its export-size cache), pruned over unpruned, the median call of {args.rounds} interleaved rounds (toolkit bench's timing). "
             "Gate: what `toolkit prune` records against the unpruned model (the accuracy drop on the digits test set where there "
             "are labels, else the task metric on held-out inputs). What stayed whole, and why, is in each bundle's manifest (`pruning.kept`).", "",
             f"Amount with `--round-to {block}` (this CPU's NCHWc block): every pruned group left a multiple of {block} channels. "
             "Recipe metric: the model's own validation metric (digits test accuracy, gpt validation loss in nats/byte, seq2seq share "
             "of held-out strings reversed exactly), unpruned → pruned → fine-tuned; a dash: no training recipe.", "",
             "| model | amount | params | MACs | latency b1 | latency b32 | recipe metric | gate against the unpruned model | prune + fine-tune + export s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, amount, manifest, seconds, times in rows:
        record = manifest.pruning
        rounded = f", --round-to {record['round_to']}" if record["round_to"] > 1 else ""
        lines.append(f"| {model} | {amount:g}{rounded} | {record['params'][1] / record['params'][0]:.2f}× | {record['macs'][1] / record['macs'][0]:.2f}× | "
                     f"{times[1][1] / times[1][0]:.2f}× | {times[32][1] / times[32][0]:.2f}× | {_recipe(record)} | {_gate(record['gate'])} | "
                     f"{seconds:.0f} |")
    lines += ["", *_findings(rows, block)]
    section = "\n".join(lines) + "\n"
    write_section(args.out, section)
    print(section)
    return 0


def _findings(rows: list, block: int) -> list[str]:
    """Where fewer MACs did not mean less time, said plainly, and why where it was measured."""
    found = []
    for model, amount, manifest, _, times in rows:
        record = manifest.pruning
        macs = record["macs"][1] / record["macs"][0]
        for batch in BATCHES:
            ratio = times[batch][1] / times[batch][0]
            if ratio > 0.95 and macs < 0.9:
                rounded = f" with --round-to {record['round_to']}" if record["round_to"] > 1 else ""
                found.append(f"- {model} at {amount:g}{rounded}, batch {batch}: {macs:.2f}× the MACs in {ratio:.2f}× the time: "
                             f"{'slower' if ratio > 1.02 else 'no faster'}.")
    found += [
        f"- Why the cnn pruned by a quarter is slower: its 24 and 48 channels are not multiples of onnxruntime's NCHWc block ({block} "
        "channels on this CPU), so the pooling after its first convolution leaves the blocked layout and reorders are added around it "
        "(onnxruntime's profiler, batch 32: Conv 321 µs against 372 unpruned, but MaxPool 62 against 30 and reorders 52 against 5). "
        "With `--round-to` the block size the layout holds and the time falls with the MACs.",
        "- At batch 1 the small models (mlp, gpt and seq2seq steps, encoder) spend much of a call outside their matrix products "
        "(per-node dispatch, attention over a short cache), which pruning does not shrink: their batch-1 ratios stay well above "
        "the MAC ratios, and the seq2seq decoder step, whose heads and cache stay whole, hardly moves.",
        "- Recipe metric above the unpruned value (the digits models): the fine-tune trains 5 more epochs, so part of the gain "
        "is more training, not pruning. The gpt fails its gate although its validation loss comes back close to the unpruned "
        "model's: the gate asks for agreement with the unpruned model's next tokens (0.9), a stricter test than the loss.",
        "- The machine is shared: three runs of this script within two hours differed by up to 0.2 in a small model's ratio "
        "(gpt at 0.25, batch 32: 0.78×, 0.97×, 0.79×), so read one cell with that margin; the cnn's slowdown without "
        "`--round-to` was there in all three (1.07×, 1.46×, 1.13× at batch 1).",
    ]
    return found


def _recipe(record: dict) -> str:
    tuned = record["fine_tune"]
    if not isinstance(tuned, dict):
        return "–"
    unpruned = tuned.get("unpruned", record["gate"].get("accuracy", {}).get("unpruned"))
    return f"{tuned['metric']} {unpruned:.3f} → {tuned['pruned']:.3f} → {tuned['fine_tuned']:.3f}"


def _gate(gate: dict) -> str:
    verdict = "pass" if gate["passed"] else "FAIL"
    if "accuracy" in gate:
        return f"accuracy drop {gate['accuracy']['drop']:.3f} (at most {gate['tolerance']['max_accuracy_drop']:g}): {verdict}"
    metric = gate["task_metric"]
    return f"{metric['metric']} {metric['value']:.3f} (threshold {metric['threshold']:g}): {verdict}"


def _latencies(bundles: list[Path], rounds: int) -> dict[int, list[float]]:
    """Per batch, each bundle's median seconds per call, timed in interleaved rounds (toolkit's bench timing)."""
    import toolkit
    from toolkit.bench.measure import COOLDOWN_S, measure
    from toolkit.runtime.samples import make_feeds

    models = [toolkit.load(path) for path in bundles]
    result = {}
    for batch in BATCHES:
        steps = {}
        for index, model in enumerate(models):
            manifest = model.bundle.manifest
            feed = make_feeds(manifest.inputs, {d.name: (batch if d.name == "batch" else d.export) for d in manifest.dims}, 0)
            steps[str(index)] = partial(model.run, feed)
        latencies, _ = measure(steps, max_time=0.2 * rounds * len(steps), rounds=rounds, warmup=3, cooldown=COOLDOWN_S)
        result[batch] = [float(np.median(latencies[str(index)])) for index in range(len(models))]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
