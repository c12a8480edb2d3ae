"""Continuous batching (iteration-level scheduling, as in Orca and vLLM) for one decoder.

A `Scheduler` owns a fixed number of cache slots (slots.py) and one worker thread. Once per
iteration it decides: waiting requests take the free slots, cancelled ones leave, prompts run
(each alone, at most `prefill_tokens` prompt tokens an iteration while rows are running, a long
prompt in pieces over several iterations where the cache allows it, so that an arrival stalls the
running rows for one short piece, not its whole prompt), then one decode step runs every running
row at once. A row that
finishes (end of text, a stop string, its token limit) or is cancelled frees its slot at once, and
the next waiting request takes it at the next iteration. Sampling, stop strings, token limits and
seeds are each request's own: a request's tokens do not depend on its neighbours (a seeded request
draws from its own generator), so greedy tokens equal those of the request run alone.

Callers hear of their request through `deliver(event)`, called on the worker thread after every
token (keep it short: put the event on a queue); `events()` wraps that in an iterator. The model
runs only here; the protocol routes (toolkit.serve) turn HTTP requests into `Request`s.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.generate.generator import Generator
from toolkit.runtime.generate.sampling import Sampling
from toolkit.runtime.generate.slots import InplaceSlots, PaddedSlots
from toolkit.runtime.generate.text import TextStream
from toolkit.runtime.model import Model

__all__ = ["Busy", "Event", "Handle", "Request", "Scheduler"]

_log = logging.getLogger("toolkit.generate")


class Busy(Exception):
    """The request could not get a slot: the queue was full, its deadline passed while it waited, or
    the scheduler is closing. A server answers 503: retry later."""


@dataclass(frozen=True)
class Request:
    """What to generate: `prompt` as token ids (a speech model's: its features), at most
    `max_new_tokens`, chosen by `sampling`, cut before the first of `stop`. `logprobs`: report
    each token's log-probability and the `logprobs` most likely tokens (0: the chosen one only).
    `deadline` (time.monotonic()): the latest it may still be waiting for a slot."""

    prompt: Sequence[int] | np.ndarray
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class Event:
    """One token of a request (or its error): the token, the text now safe to show (text that may
    begin a stop string is held back), its log-probability and the most likely alternatives when
    asked, and once the request ends, why ("stop": end of text or a stop string; "length")."""

    token: int | None
    text: str = ""
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    error: Exception | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Handle:
    """A submitted request: `cancel()` frees its slot before the next decode step (or drops it
    from the queue), and it hears nothing more."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._scheduler._wake()


class _Sequence:
    def __init__(self, request: Request, deliver: Callable[[Event], None], text: TextStream, handle: Handle):
        self.request, self.deliver, self.text, self.handle = request, deliver, text, handle
        self.choose = request.sampling.chooser()
        self.fed = 0  # prompt tokens in the cache (a chunked prefill takes several iterations)
        self.step = 0
        self.token = -1


class Scheduler:
    """Continuous batching over `slots` cache rows of one decoder (a bundle path, a `Model` or a
    `Generator`). On the CPU, a fused rotary decoder runs over slots written in place
    (`InplaceSlots`); every other decoder over a left-padded batch of the bundle's own graph
    (`PaddedSlots`); `note` says which and why."""

    def __init__(self, model: Model | Generator | str | os.PathLike[str], *, slots: int = 16, max_waiting: int = 256,
                 prefill_tokens: int = 32, variant: str | None = None, provider: str = "auto", threads: int | None = None):
        if slots < 1 or max_waiting < 0 or prefill_tokens < 1:
            raise ToolkitError(f"slots and prefill_tokens must be >= 1 and max_waiting >= 0, got {slots}, {prefill_tokens}, {max_waiting}.")
        self.generator = generator = model if isinstance(model, Generator) else _generator(model, variant, provider, threads)
        layout = generator.layout
        if generator._inplace is not None:
            logits = next(o for o in generator.model.outputs if o.name == layout.logits)
            self.cache: InplaceSlots | PaddedSlots = InplaceSlots(generator._inplace, layout, slots, layout.context, logits)
            self.note = "cache slots written in place"
        else:
            self.cache = PaddedSlots(generator.model.run_validated, layout, generator.model.inputs, slots)
            self.note = f"a left-padded batch of the bundle's graph ({generator.note or 'its attention is not rewritten in place'})"
        self.slots, self.max_waiting, self.prefill_tokens = slots, max_waiting, prefill_tokens
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._joining: collections.deque[_Sequence] = collections.deque()  # with a slot, their prompts not yet in the cache
        self._running: list[_Sequence] = []
        self._chunked = isinstance(self.cache, InplaceSlots)
        # An encoder-decoder whose graph counts its decoder positions from the cache (BART's and Whisper's
        # learned positions) would read a left-padded row's position wrongly: its rows must stand at one
        # length, so requests join only an empty batch (batching by request, not by step).
        self.aligned = isinstance(self.cache, PaddedSlots) and bool(layout.encoder) and not layout.positions
        if self.aligned:
            self.note += "; its positions come from the cache, so requests join only when the batch is empty"
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and metrics

    @property
    def running(self) -> int:
        """Requests holding a slot: decoding, or their prompt going in."""
        return len(self._running) + len(self._joining)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the caller's side -----------------------------------------------------------------------

    def submit(self, request: Request, deliver: Callable[[Event], None]) -> Handle:
        """Queues `request`; bad arguments raise ToolkitError here, a full queue or a closing
        scheduler `Busy`. `deliver` hears every event, on the scheduler's thread."""
        self.generator._validate([request.prompt], request.max_new_tokens)
        if request.logprobs is not None and not 0 <= request.logprobs <= self.generator.layout.vocab:
            raise ToolkitError(f"logprobs must lie in [0, {self.generator.layout.vocab}], got {request.logprobs}.")
        handle = Handle(self)
        sequence = _Sequence(request, deliver, TextStream(self.generator.tokenizer, request.stop), handle)
        with self._lock:
            if self._closing:
                raise Busy("the scheduler is shutting down; retry on another server.")
            if len(self._waiting) >= self.max_waiting and len(self._running) + len(self._joining) >= self.slots:
                raise Busy(f"{len(self._waiting)} requests are waiting for one of {self.slots} cache slots, the limit; retry later.")
            self._waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="toolkit-scheduler", daemon=True)
                self._thread.start()
            self._lock.notify()
        return handle

    def events(self, request: Request) -> Iterator[Event]:
        """The request's events as an iterator (blocking); closing it early cancels the request."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(request, events.put)

        def iterate() -> Iterator[Event]:
            try:
                while True:
                    event = events.get()
                    yield event
                    if event.last:
                        return
            finally:
                handle.cancel()

        return iterate()

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests; what was accepted runs to its end (within `timeout` seconds)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # --- the worker thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._joining or self._running or self._closing):
                    self._lock.wait()
                if self._closing and not (self._waiting or self._joining or self._running):
                    return
                self._admit()
            self._leave_cancelled()
            try:
                self._prefill()
                if self._running:
                    self._decode()
            except Exception as exc:  # the model failed: every running request hears it, the slots start empty
                _log.exception("a decode step failed; %d running requests end with it", len(self._running))
                error = exc if isinstance(exc, ToolkitError) else ToolkitError(f"generation failed: {type(exc).__name__}: {exc}")
                for sequence in self._running:
                    sequence.deliver(Event(None, error=error))
                self._running.clear()
                self.cache.clear()

    def _admit(self) -> None:
        """Waiting requests take the free slots, oldest first (they join at the next prefill); those
        cancelled or past their deadline leave the queue. Holds the lock."""
        now = time.monotonic()
        while self._waiting and len(self._running) + len(self._joining) < self.slots and not (self.aligned and self._running):
            sequence = self._waiting.popleft()
            deadline = sequence.request.deadline
            if sequence.handle.cancelled:
                continue
            if deadline is not None and now > deadline:
                sequence.deliver(Event(None, error=Busy("the request waited past its deadline for a cache slot; retry later.")))
                continue
            self._joining.append(sequence)
        for sequence in self._waiting:  # expired ones behind a full house hear it now, not when a slot frees
            deadline = sequence.request.deadline
            if deadline is not None and now > deadline and not sequence.handle.cancelled:
                sequence.handle.cancelled = True
                sequence.deliver(Event(None, error=Busy("the request waited past its deadline for a cache slot; retry later.")))

    def _leave_cancelled(self) -> None:
        for row in range(len(self._running) - 1, -1, -1):
            if self._running[row].handle.cancelled:
                self._remove(row)

    def _prefill(self) -> None:
        """Prompts of the joining requests, oldest first, at most `prefill_tokens` of them while
        rows are running (all of them while none are): a chunked cache takes a prompt in pieces
        over several iterations, any other takes whole prompts (at least one an iteration)."""
        budget = self.prefill_tokens if self._running else math.inf
        spent = 0
        while self._joining and spent < budget:
            sequence = self._joining[0]
            if sequence.handle.cancelled:
                self._joining.popleft()
                continue
            prompt = sequence.request.prompt
            try:
                if self._chunked:
                    size = int(min(len(prompt) - sequence.fed, budget - spent))
                    logits = self.cache.feed(np.asarray(prompt[sequence.fed : sequence.fed + size], dtype=np.int64), sequence.fed)
                    sequence.fed, spent = sequence.fed + size, spent + size
                    if sequence.fed < len(prompt):
                        return  # the budget is spent: the rest of this prompt next iteration
                    self.cache.commit(len(prompt))
                else:
                    if spent and spent + len(prompt) > budget:
                        return
                    feeds = self.generator._first_feeds([prompt])
                    logits = self.cache.add({name: value.numpy() if hasattr(value, "numpy") else value  # a CUDA encoder's memory
                                             for name, value in feeds.items()})
                    spent += len(prompt)
            except Exception as exc:  # this prompt's step failed: only its request hears it
                self._joining.popleft()
                sequence.deliver(Event(None, error=exc if isinstance(exc, ToolkitError) else ToolkitError(f"generation failed: {exc}")))
                continue
            self._joining.popleft()
            self._running.append(sequence)
            self._choose([sequence], logits, first=len(self._running) - 1)

    def _decode(self) -> None:
        tokens = np.array([s.token for s in self._running], dtype=np.int64)
        logits = self.cache.decode(tokens)
        self.steps += 1
        self._choose(self._running, logits, first=0)

    def _choose(self, sequences: list[_Sequence], logits: np.ndarray, first: int) -> None:
        """Each sequence's next token from its row of `logits`; delivers it; removes the finished
        (`first`: the row of sequences[0] in the cache)."""
        rules, eos = self.generator.layout.rules, self.generator.layout.eos_ids
        finished = []
        for i, sequence in enumerate(list(sequences)):
            request = sequence.request
            last = sequence.step + 1 == request.max_new_tokens
            row = rules.apply(logits[i : i + 1], sequence.step, last)
            token = int(sequence.choose(row)[0])
            logprob, top = _logprobs(logits[i], token, request.logprobs) if request.logprobs is not None else (None, ())
            text = sequence.text.push(token)
            reason = "stop" if sequence.text.stopped or token in eos else ("length" if last else None)
            if reason == "length":
                text += sequence.text.close()
            sequence.token, sequence.step = token, sequence.step + 1
            if not sequence.handle.cancelled:
                sequence.deliver(Event(token, text, logprob, top, reason))
            if reason:
                finished.append(first + i)
        for row in sorted(finished, reverse=True):
            self._remove(row)

    def _remove(self, row: int) -> None:
        """Frees the cache row `row`: the last row moves into it, as in the cache."""
        self.cache.remove(row)
        last = self._running.pop()
        if row < len(self._running):
            self._running[row] = last


def _logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token` (its raw distribution, before sampling's changes) and
    the `top` most likely tokens with theirs."""
    shifted = logits.astype(np.float64) - logits.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logp, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
    best = best[np.argsort(-logp[best], kind="stable")]
    return float(logp[token]), tuple((int(t), float(logp[t])) for t in best)


def _generator(model: Model | str | os.PathLike[str], variant: str | None, provider: str, threads: int | None) -> Generator:
    """The model's Generator over the in-place cache where its graph allows, else its own graph.
    A `Model` given (a server shares it with its infer route) keeps its session."""
    if not isinstance(model, Model):  # its own: the in-place cache where it applies, the bundle graph's session released
        return Generator(model, variant=variant, provider=provider, threads=threads)
    if model.provider == "cpu" and not (model.bundle.manifest.generation or {}).get("encoder"):
        try:
            return Generator(model, cache="inplace")
        except ToolkitError as exc:
            generator = Generator(model, cache="growing")
            generator.note = str(exc)
            return generator
    return Generator(model, cache="growing")
