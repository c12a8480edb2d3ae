"""Generation speed: prompt (prefill) latency, per-token decode latency and tokens/s of a decoder
bundle's variants against its PyTorch reference running the same KV-cache loop, measured in
interleaved rounds in one process (the same rules as `toolkit bench`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit._scoped import torch_threads
from toolkit.bench.candidates import TORCH_EAGER
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.reference.run import reference_generator
from toolkit.runtime.generate import Generator
from toolkit.runtime.samples import make_feeds

__all__ = ["GenerationRow", "bench_generation"]


@dataclass
class GenerationRow:
    model: str
    provider: str
    variant: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float  # the prompt step, ending with the first new token
    decode_ms_per_token: float  # p50 over every later step (one new token per row)
    decode_p90_ms: float
    tokens_per_s: float  # new tokens of all rows over the whole generation, prompt included
    decode_speedup_vs_torch: float | None
    parity: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bench_generation(path: str | Path | Bundle, *, variants: Sequence[str] | None = None, batches: Sequence[int] = (1, 8),
                     prompt_tokens: int = 32, new_tokens: int = 64, rounds: int = 5, threads: int | None = None,
                     torch_eager: bool = True, provider: str = "cpu",
                     progress: Callable[[str], None] | None = None, trust_source: bool = False) -> list[GenerationRow]:
    """Greedy generation of `new_tokens` after a `prompt_tokens` prompt, for each batch size, on
    `provider` ("cpu" or "cuda"; torch eager runs on the same device). Each step's feeds and results
    travel through the host, as `Generator` does. `trust_source` vouches for the code the manifest's source names (see `bundle_reference`)."""
    say = progress or (lambda _m: None)
    bundle = Bundle.of(path, trust_source=trust_source)
    manifest = bundle.manifest
    names = list(variants) if variants else [v for v, rec in manifest.variants.items() if rec.parity is None or rec.parity["passed"]]
    for name in names:
        bundle.variant(name)
    with contextlib.ExitStack() as stack:
        threads = threads or len(os.sched_getaffinity(0))
        candidates: dict[str, Generator] = {}
        if torch_eager:

            stack.enter_context(torch_threads(threads))  # process-wide in torch: put back when done
            say("building the PyTorch reference")
            candidates[TORCH_EAGER] = reference_generator(bundle, device="cuda" if provider == "cuda" else "cpu")
        for name in names:
            candidates[name] = Generator(bundle, variant=name, provider=provider, threads=threads)
        context = candidates[names[0] if names else TORCH_EAGER].layout.context
        if prompt_tokens + new_tokens > context:
            raise ToolkitError(f"prompt_tokens {prompt_tokens} + new_tokens {new_tokens} exceed the model's context of {context}.")
        rows = []
        for batch in batches:
            ids = next(iter(make_feeds(manifest.inputs[:1], {"batch": batch, "seq": prompt_tokens}, seed=0).values()))
            prompts = ids.tolist()
            say(f"generating {new_tokens} tokens after {prompt_tokens} at batch {batch}, {len(candidates)} candidates, {rounds} rounds")
            prefill: dict[str, list[float]] = {c: [] for c in candidates}
            decode: dict[str, list[float]] = {c: [] for c in candidates}
            total: dict[str, list[tuple[int, float]]] = {c: [] for c in candidates}
            labels = list(candidates)
            for r in range(rounds + 1):  # round 0 warms up and is discarded
                for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                    steps = _timed_steps(candidates[label], prompts, new_tokens)
                    if r:
                        prefill[label].append(steps[0])
                        decode[label].extend(steps[1:])
                        total[label].append((len(steps), sum(steps)))
            torch_decode = float(np.median(decode[TORCH_EAGER])) if torch_eager else None
            for label in labels:
                per_token = float(np.median(decode[label]))
                produced = sum(n for n, _ in total[label]) * batch
                parity = manifest.variants[label].parity if label in manifest.variants else None
                rows.append(GenerationRow(
                    model=manifest.name, provider=provider, variant=label, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                    prefill_ms=float(np.median(prefill[label])) * 1e3, decode_ms_per_token=per_token * 1e3,
                    decode_p90_ms=float(np.percentile(decode[label], 90)) * 1e3,
                    tokens_per_s=produced / sum(t for _, t in total[label]),
                    decode_speedup_vs_torch=torch_decode / per_token if torch_decode else None,
                    parity="reference" if label == TORCH_EAGER else ("unchecked" if parity is None else ("pass" if parity["passed"] else "FAIL")),
                ))
        return rows


def _timed_steps(generator: Generator, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds from the start (or the previous token) to each new token, the whole loop included."""
    times, last = [], time.perf_counter()
    for _ in generator.tokens(prompts, max_new_tokens=new_tokens):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times
