"""int4 (weight-only, MatMulNBits) beside fp32, the fused graph and int8 on the zoo gpt (trained): decode
ms/token and time to first token at batch 1 and 8, each variant's bundle size, and the greedy agreement
its parity check measured against the PyTorch reference (64 new tokens over held-out prompts).

    python benchmarks/int4.py      # → the "## int4 (zoo gpt)" section of benchmarks/RESULTS.md

Seeded 124M decoders (GPT-2 small, a LLaMA of the same shape) against onnxruntime-genai's own int4 are
in `python benchmarks/peers.py` ("## Peers").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from serve_load import write_section  # noqa: E402

VARIANTS = ("fp32", "opt", "int8", "int4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="zoo gpt preset")
    parser.add_argument("--work", type=Path, default=HERE / ".bundles" / "gpt-int4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)

    from toolkit.bench.generation import bench_generation
    from toolkit.bundle import Bundle
    from toolkit.compile import build

    if not (args.work / "manifest.json").is_file():
        build("gpt", args.work, preset=args.preset, modes=["int8", "int4"], select=False, force=True, progress=print)
    bundle = Bundle.open(args.work, trust_source=True)
    variants = bundle.manifest.variants
    rows = bench_generation(args.work, variants=VARIANTS, batches=(1, 8), new_tokens=64, rounds=args.rounds, torch_eager=False,
                            progress=print, trust_source=True)
    record = variants["int4"].parity["greedy"]
    greedy_shape = f"{record['new_tokens']} new tokens after each of {record['prompts']} held-out prompts"
    lines = ["## int4 (zoo gpt)", "",
             f"Written by `python benchmarks/int4.py` on {len(os.sched_getaffinity(0))} CPUs: the zoo gpt ({args.preset} preset, trained), "
             "`toolkit build gpt --mode int8 --mode int4`; greedy generation of 64 tokens after 32, medians of "
             f"{args.rounds} rounds. Greedy agreement: what the variant's parity check measured, the share of greedy tokens "
             f"equal to the PyTorch reference's ({greedy_shape}; up to each prompt's first divergence).", "",
             "| variant | bundle MB | batch 1 decode ms/token | batch 1 prefill ms (to the first token) | batch 8 decode ms/token | greedy agreement |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        by_batch = {r.batch: r for r in rows if r.variant == name}
        greedy = (variants[name].parity or {}).get("greedy", {}).get("token_agreement")
        lines.append(f"| {name} | {variants[name].bytes / 1e6:.2f} | {by_batch[1].decode_ms_per_token:.3f} | {by_batch[1].prefill_ms:.2f} | "
                     f"{by_batch[8].decode_ms_per_token:.3f} | {'-' if greedy is None else f'{greedy:.3f}'} |")
    section = "\n".join(lines) + "\n"
    write_section(args.out, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
