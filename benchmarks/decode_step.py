"""One decode step of several decoder graphs, timed side by side in one process: onnxruntime sessions
(same threads) fed one new token over a cache of `past` tokens, in interleaved rounds whose order
rotates; the median over rounds of each round's mean step time. Isolates the graph (its kernels and
node count) from everything a generation loop adds around it.

    python benchmarks/decode_step.py A.onnx B.onnx ... --past 256 --batch 1 [--rounds 25] [--threads 2]

Input names and dims are read from each graph: toolkit's decoders (input_ids, attention_mask,
position_ids, past_key_i/past_value_i) and onnxruntime-genai's (past_key_values.i.key, with a
head size given by --head-size) alike; the cache holds random values (a step costs the same whatever they are).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def feeds_for(session, batch: int, past: int, head_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.ones((batch, 1), np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past + 1), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.full((batch, 1), past, np.int64)
        else:  # a cache: (batch, key-value heads, past, head size)
            shape = [d if isinstance(d, int) else batch if "batch" in d else past if "past" in d else head_size for d in value.shape]
            feeds[value.name] = rng.random(shape, dtype=np.float32)
    return feeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--past", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=10, help="steps per graph and round")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--head-size", type=int, default=64, help="for a cache whose head size is a named dim (genai's kv_cache_dim)")
    args = parser.parse_args()

    import onnxruntime as ort

    sessions = []
    for path in args.graphs:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        sessions.append((path, session, feeds_for(session, args.batch, args.past, args.head_size)))
    times: dict[str, list[float]] = {path: [] for path, _, _ in sessions}
    for r in range(args.rounds):
        for path, session, feeds in sessions[r % len(sessions):] + sessions[: r % len(sessions)]:
            for _ in range(3):
                session.run(None, feeds)
            start = time.perf_counter()
            for _ in range(args.steps):
                session.run(None, feeds)
            times[path].append((time.perf_counter() - start) / args.steps * 1e3)
    first = float(np.median(times[args.graphs[0]]))
    print(f"batch {args.batch}, past {args.past}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    for path in args.graphs:
        ms = float(np.median(times[path]))
        print(f"{ms:8.2f} ms/step  {ms / first:5.3f}×  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
