"""Generation behind the routes: what the v2 generate routes and the OpenAI routes share.

- `Prompter`: a decoder bundle's text side, in the front end (whichever backend runs the model):
  its tokenizer, how a prompt is encoded, its chat template and how many tokens may follow a prompt.
- `EventStream`: a generation's events, observed for the metrics (`Observer`: under the names
  vLLM's users know, time to first token, inter-token latency, tokens in and out), and cancelled
  the moment its client or its request is gone.
- `collect`: a generation's events to its end, cancelled as soon as the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.chat import render_chat
from toolkit.runtime.generate.scheduler import Event
from toolkit.runtime.tokenizer import tokenizer_for
from toolkit.serve.metrics import Metrics

__all__ = ["ClientGone", "EventStream", "Observer", "Prompter", "Unavailable", "collect"]

class Unavailable(Exception):
    """A served model cannot take the request now (its queue is full, its deadline passed, its replica
    died): answered 503, for the client to retry."""


class ClientGone(Exception):
    """The client disconnected before its generation ended; the generation was cancelled."""


class Prompter:
    """A decoder bundle's text side: encodes prompts and renders chats as the model expects."""

    def __init__(self, bundle: Bundle):
        generation = bundle.manifest.generation or {}
        self.name = bundle.manifest.name
        self.features = generation.get("source") == "features"
        self.tokenizer = None if self.features else tokenizer_for(generation, bundle)
        self._special = bool(generation.get("source_special_tokens"))
        self.encoder = bool(generation.get("encoder"))
        self.context = int(generation["context"])
        self._start = len(generation.get("decoder_start") or [generation.get("eos_token_id")])
        self.eos_ids = tuple(generation.get("eos_token_ids") or [generation.get("eos_token_id")])
        self.template = generation.get("chat_template")
        self._chat_tokens = generation.get("chat_tokens") or {}

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (an encoder-decoder's source framed with its special tokens, as trained)."""
        if self.tokenizer is None:
            raise ToolkitError(f"model {self.name!r} is a speech model: its prompts are audio features, which text routes do not carry.")
        if not text:
            raise ToolkitError("the prompt is empty; give at least one character to continue.")
        return self.tokenizer.encode(text, special_tokens=self._special)

    def chat(self, messages: Sequence[dict[str, Any]]) -> str:
        if not self.template:
            raise ToolkitError(f"model {self.name!r} has no chat template (its tokenizer had none at export); use /v1/completions "
                               "with a prompt of your own.")
        return render_chat(self.template, messages, special_tokens=self._chat_tokens)

    def room(self, prompt_tokens: int) -> int:
        """How many tokens may follow a prompt of `prompt_tokens` tokens."""
        return self.context - (self._start if self.encoder else prompt_tokens)


class Observer:
    """One generation's metrics: its prompt tokens when it starts, each token's latency (the first's
    from the request's arrival), and its end."""

    def __init__(self, metrics: Metrics, model: str, prompt_tokens: int, arrived: float):
        self.metrics, self.model, self.arrived, self._last = metrics, model, arrived, None
        metrics.prompt_tokens.labels(model).inc(prompt_tokens)

    def token(self) -> None:
        now = time.perf_counter()
        m = self.metrics
        (m.time_to_first_token if self._last is None else m.inter_token_latency).labels(self.model).observe(now - (self._last or self.arrived))
        self._last = now
        m.generation_tokens.labels(self.model).inc()

    def finish(self, reason: str) -> None:
        self.metrics.e2e_latency.labels(self.model).observe(time.perf_counter() - self.arrived)
        self.metrics.request_success.labels(self.model, reason).inc()


class EventStream:
    """A generation's events as an async iterator, from `next_event()` (a model served here: its
    scheduler's queue; in Ray: the replica's stream), observed for the metrics where an observer is
    set. `aclose()` cancels the generation at once, whether or not anyone iterated it (a client gone,
    a request that failed beside it); an error event ends it, raised as Unavailable (503) where
    the client should retry."""

    def __init__(self, next_event: Callable[[], Awaitable[Event]], cancel: Callable[[], None]):
        self._next, self._cancel = next_event, cancel
        self.observer: Observer | None = None
        self.ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        from toolkit.runtime.generate.scheduler import Busy

        if self.ended:
            raise StopAsyncIteration
        try:
            event = await self._next()
        except StopAsyncIteration:
            self.ended = True
            raise
        if event.error is not None:
            await self.aclose()
            raise Unavailable(str(event.error)) if isinstance(event.error, (Busy, Unavailable)) else event.error
        if self.observer is not None:
            self.observer.token()
            if event.finish_reason:
                self.observer.finish(event.finish_reason)
        self.ended = event.last
        return event

    async def aclose(self) -> None:
        if not self.ended:
            self.ended = True
            self._cancel()


async def collect(events: AsyncIterator[Event], request: Any) -> list[Event]:
    """Every event of a generation whose answer is sent whole; if the client disconnects first, the
    generation is cancelled at once (its slot freed within a decode step) and ClientGone raised."""

    async def gather() -> list[Event]:
        return [event async for event in events]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        with contextlib.suppress(Exception):
            await events.aclose()  # it may not have begun: cancel the generation all the same
        raise ClientGone()
    return work.result()
