"""Continuous batching: a request's tokens do not depend on when it arrives or who it runs beside.

Every test runs requests through a Scheduler with random arrivals (each new request waits until a
random earlier one has made a random number of tokens), with fewer slots than requests so that
some wait for a slot and join a batch mid-way of others at other positions, and compares each
request's tokens with the same request run alone by the Generator."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from toolkit import Generator, Sampling
from toolkit.errors import ToolkitError
from toolkit.runtime.generate.scheduler import Busy, Request, Scheduler

PROMPTS = ["Return the value of", "If the", "Raise ValueError when the argument is not a", "The", "Create a new",
           "Return a list of all the", "A", "This module provides"]


def _causal(kind: str, variant: str):
    def make(exported, with_variants):
        from models.hf_causal import causal_lm

        pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
        return with_variants(f"hf:{causal_lm(kind)}", ("opt",) if variant == "opt" else (), preset=None), variant

    return make


def _seq2seq(kind: str):
    def make(exported, with_variants):
        from models.hf_heads import hf_model

        pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
        return exported(f"hf:{hf_model(kind)}", None), "fp32"

    return make


slow = pytest.mark.slow
CASES = {
    # (bundle, variant) made from the fixtures, the slots the scheduler must use, marks
    "gpt": (lambda e, v: (e("gpt"), "fp32"), "PaddedSlots", ()),
    "seq2seq": (lambda e, v: (e("seq2seq"), "fp32"), "PaddedSlots", ()),
    "llama-fp32": (_causal("llama", "fp32"), "PaddedSlots", ()),
    "llama-opt": (_causal("llama", "opt"), "InplaceSlots", ()),
    "llama-opt-in-pieces": (_causal("llama", "opt"), "InplaceSlots", ()),  # prompts fed 3 tokens an iteration while rows run
    "gpt2-opt": (_causal("gpt2", "opt"), "PaddedSlots", slow),  # onnxruntime's MultiHeadAttention over the cache
    **{f"{kind}-opt": (_causal(kind, "opt"), "InplaceSlots", slow) for kind in ("mistral", "qwen2", "phi")},
    **{kind: (_seq2seq(kind), "PaddedSlots", slow) for kind in ("bart", "t5", "whisper")},
}


@pytest.fixture(params=[pytest.param(name, marks=marks) for name, (_, _, marks) in CASES.items()])
def case(request, exported, with_variants):
    make, slots, _ = CASES[request.param]
    path, variant = make(exported, with_variants)
    pieces = {"prefill_tokens": 3} if request.param.endswith("in-pieces") else {}
    return (Generator(path, variant=variant, provider="cpu", cache="growing"),
            Scheduler(path, variant=variant, provider="cpu", slots=3, **pieces), slots)


def _prompts(generator: Generator) -> list:
    """Text prompts of several lengths; a speech model's: clips of sound-like features."""
    if generator.layout.features:
        from models.hf_heads import hf_model
        from toolkit.reference.hf import hf_spec

        clips = hf_spec(hf_model("whisper")).parts["encoder"].sample_data(len(PROMPTS))["input_features"]
        return list(clips)
    return [generator.encode(p) for p in PROMPTS]


class _Arrivals:
    """Submits requests one after another, each once a random earlier request has made a random
    number of tokens (or ended); collects every request's events."""

    def __init__(self, scheduler: Scheduler, seed: int):
        self.scheduler, self.rng = scheduler, np.random.default_rng(seed)
        self.events: list[list] = []
        self.done: list[threading.Event] = []
        self.most_running = 0

    def run(self, requests: list[Request]) -> list[list]:
        for request in requests:
            if self.events:
                earlier = int(self.rng.integers(len(self.events)))
                self._wait(earlier, int(self.rng.integers(0, 6)))
            self.events.append([])
            self.done.append(threading.Event())
            self.scheduler.submit(request, self._deliver(len(self.events) - 1))
        for done in self.done:
            assert done.wait(120), "a request never ended"
        return self.events

    def _deliver(self, index: int):
        def deliver(event) -> None:
            self.most_running = max(self.most_running, self.scheduler.running)
            self.events[index].append(event)
            if event.last:
                self.done[index].set()

        return deliver

    def _wait(self, index: int, tokens: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.events[index]) < tokens and not self.done[index].is_set() and time.monotonic() < deadline:
            time.sleep(0.0005)


def _alone(generator: Generator, prompt, new_tokens: int, sampling: Sampling | None = None) -> list[int]:
    eos, tokens = generator.layout.eos_ids, []
    for (token,) in generator.tokens([prompt], max_new_tokens=new_tokens, sampling=sampling):
        tokens.append(int(token))
        if token in eos:
            break
    return tokens


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_tokens_are_those_of_the_request_alone_whenever_it_arrives(case, seed):
    generator, scheduler, slots = case
    assert type(scheduler.cache).__name__ == slots, scheduler.note
    rng = np.random.default_rng(seed)
    prompts = _prompts(generator)
    limits = [int(n) for n in rng.integers(4, 24, size=len(prompts))]
    try:
        events = _Arrivals(scheduler, seed).run([Request(p, max_new_tokens=n) for p, n in zip(prompts, limits, strict=True)])
    finally:
        scheduler.close()
    for prompt, limit, got in zip(prompts, limits, events, strict=True):
        assert all(e.error is None for e in got), [e.error for e in got]
        assert [e.token for e in got] == _alone(generator, prompt, limit)
        assert got[-1].finish_reason == ("stop" if got[-1].token in generator.layout.eos_ids else "length")
        assert "".join(e.text for e in got) == generator.tokenizer.decode([e.token for e in got if e.token not in generator.layout.eos_ids])
    if not scheduler.aligned:  # (BART's and Whisper's rows join only an empty batch: their positions come from the cache)
        assert scheduler.steps < sum(len(e) for e in events)  # rows shared decode steps


def test_seeded_sampling_is_the_requests_own_whatever_its_neighbours(exported):
    path = exported("gpt")
    generator = Generator(path, provider="cpu", cache="growing")
    scheduler = Scheduler(path, provider="cpu", slots=4)
    prompts = [generator.encode(p) for p in PROMPTS[:6]]
    samplings = [Sampling(temperature=0.9, top_k=40, seed=i) if i % 2 else Sampling() for i in range(len(prompts))]
    try:
        arrivals = _Arrivals(scheduler, 3)
        events = arrivals.run([Request(p, max_new_tokens=16, sampling=s) for p, s in zip(prompts, samplings, strict=True)])
    finally:
        scheduler.close()
    assert arrivals.most_running > 1
    for prompt, sampling, got in zip(prompts, samplings, events, strict=True):
        assert [e.token for e in got] == _alone(generator, prompt, 16, sampling)


def test_stop_strings_logprobs_and_cancelling(exported):
    path = exported("gpt")
    generator = Generator(path, provider="cpu", cache="growing")
    scheduler = Scheduler(path, provider="cpu", slots=2)
    try:
        full = generator.generate("Return the", max_new_tokens=24)
        stop = full[5:8]
        events = list(scheduler.events(Request(generator.encode("Return the"), max_new_tokens=24, stop=(stop,), logprobs=3)))
        assert "".join(e.text for e in events) == full[: full.index(stop)] and events[-1].finish_reason == "stop"
        for event in events:
            assert len(event.top) == 3 and event.top[0][0] == event.token  # greedy: the most likely token
            assert event.logprob == pytest.approx(event.top[0][1]) and event.top[0][1] >= event.top[1][1] >= event.top[2][1]
        assert sum(np.exp(p) for _, p in events[0].top) <= 1 + 1e-9

        stream = scheduler.events(Request(generator.encode("If the"), max_new_tokens=100))
        next(stream), next(stream)
        stream.close()  # cancels: the slot is free within a step
        deadline = time.monotonic() + 10
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.001)
        assert scheduler.running == 0
    finally:
        scheduler.close()


def test_a_full_queue_and_a_passed_deadline_are_busy_and_bad_requests_raise(exported):
    path = exported("gpt")
    scheduler = Scheduler(path, provider="cpu", slots=1, max_waiting=1)
    prompt = scheduler.generator.encode("Return the")
    try:
        with pytest.raises(ToolkitError, match="context"):
            scheduler.submit(Request(prompt, max_new_tokens=10**6), lambda e: None)
        with pytest.raises(ToolkitError, match="logprobs"):
            scheduler.submit(Request(prompt, logprobs=-1), lambda e: None)
        held, release = threading.Event(), threading.Event()

        def hold(event) -> None:  # the running request holds the scheduler's thread, and its one slot, until released
            held.set()
            release.wait(30)

        long = scheduler.submit(Request(prompt, max_new_tokens=100), hold)
        assert held.wait(30)
        late = scheduler.events(Request(prompt, max_new_tokens=4, deadline=time.monotonic() + 0.01))
        with pytest.raises(Busy, match="limit"):
            scheduler.submit(Request(prompt), lambda e: None)
        time.sleep(0.02)
        long.cancel()
        release.set()
        event = next(late)
        assert isinstance(event.error, Busy) and "deadline" in str(event.error)
    finally:
        scheduler.close()


def test_a_prompt_that_arrives_while_rows_run_comes_in_pieces_and_keeps_its_tokens(with_variants):
    path, variant = _causal("llama", "opt")(None, with_variants)
    generator = Generator(path, variant=variant, provider="cpu", cache="growing")
    scheduler = Scheduler(path, variant=variant, provider="cpu", slots=2, prefill_tokens=3)
    pieces, entered, submitted, done, got_first = [], threading.Event(), threading.Event(), threading.Event(), []
    feed = scheduler.cache.feed
    scheduler.cache.feed = lambda ids, start: pieces.append((start, len(ids))) or feed(ids, start)
    prompts = [generator.encode(p) for p in PROMPTS]
    first = next(p for p in prompts if len(_alone(generator, p, 30)) == 30)  # runs its 30 tokens: no end of text before
    second = max(prompts, key=len)

    def hold(event) -> None:  # the running request holds the loop at its first token until the second is queued
        got_first.append(event)
        entered.set()
        submitted.wait(30)
        if event.last:
            done.set()

    try:
        scheduler.submit(Request(first, max_new_tokens=30), hold)
        assert entered.wait(30)  # the first is running (and the loop held): the second arrives mid-way
        later = scheduler.events(Request(second, max_new_tokens=12))
        submitted.set()
        got_second = list(later)
        assert done.wait(30)
    finally:
        scheduler.close()
    assert [e.token for e in got_second] == _alone(generator, second, 12)
    assert [e.token for e in got_first] == _alone(generator, first, 30)
    assert len(second) > 3 and pieces[1:] == [(start, min(3, len(second) - start)) for start in range(0, len(second), 3)], pieces
