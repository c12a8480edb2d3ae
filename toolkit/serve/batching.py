"""Dynamic batching: concurrent requests for one model merge along the batch axis, run as one
inference and split back, each caller getting exactly its own rows.

Requests merge only with requests of the same shape past the batch axis (a sequence model's requests
of other lengths wait for their own batch), up to `max_batch` rows, waiting at most `max_delay_s`
after the oldest. The queue is bounded (a full one refuses at once), a request whose deadline passes
while it waits is dropped unrun, and `close()` finishes everything already accepted.

One bad request does not fail its batch: when a merged batch fails, its members run again one by
one, so only the one at fault hears the error. The loop is supervised: if it dies, every request
waiting gets `BatcherFailed` at once, `healthy` is False (the server's readiness) until the loop has
restarted, after a short pause that doubles while it keeps dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatcherFailed", "DeadlinePassed", "DynamicBatcher", "Overloaded", "request_rows", "run_merged"]

_log = logging.getLogger("toolkit.serve")
_RESTART_S = (1.0, 8.0)  # the first pause before a dead loop restarts, and the longest

Feeds = Mapping[str, np.ndarray]
Results = dict[str, np.ndarray]


class Overloaded(Exception):
    """The queue is full, or the batcher is shutting down: answered 503."""


class DeadlinePassed(Exception):
    """The request waited past its deadline and was dropped without running: answered 503."""


class BatcherFailed(Exception):
    """The batching loop died while the request waited (it restarts): answered 503."""


@dataclass
class _Waiting:
    feeds: Feeds
    rows: int
    signature: tuple
    deadline: float | None
    arrived: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Runs `run(feeds) -> results` for one model on its own worker thread, one batch at a time.

    `batch_axis`: every input and output has the batch on axis 0 (otherwise requests run one by one).
    `on_batch(rows)` is told the size of each batch run, `on_run(queued_s, compute_s)` each request's
    time in the queue and in its batch's run (for metrics)."""

    def __init__(self, run: Callable[[Feeds], Results], *, batch_axis: bool, max_batch: int = 32, max_delay_s: float = 0.002,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None,
                 on_run: Callable[[list[float], float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_delay_s >= 0, got {max_batch}, {max_queue}, {max_delay_s}")
        self._run = run
        self._batch_axis = batch_axis
        self.max_batch = max_batch if batch_axis else 1
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda rows: None)
        self._on_run = on_run or (lambda queued, compute: None)
        self.healthy = True
        self._waiting: list[_Waiting] = []
        self._arrival = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="toolkit-batch")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Refuses new requests, runs those already queued, then stops."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, feeds: Feeds, *, deadline: float | None = None) -> Results:
        """The results for `feeds` (already validated); `deadline` is a time.monotonic() value."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        if len(self._waiting) >= self.max_queue:
            raise Overloaded(f"the queue is full ({self.max_queue} requests waiting); retry later")
        rows, signature = _rows_and_signature(feeds, self._batch_axis, self.max_batch)
        waiting = _Waiting(feeds, rows, signature, deadline, time.monotonic(), asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._arrival.set()
        return await waiting.future

    async def _supervise(self) -> None:
        pause = _RESTART_S[0]
        while True:
            try:
                return await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("the batching loop died; failing the requests waiting, restarting in %.1f s", pause)
                self.healthy = False
                waiting, self._waiting = self._waiting, []
                for w in waiting:
                    if not w.future.done():
                        w.future.set_exception(BatcherFailed("the server's batching loop failed while this request waited; retry"))
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RESTART_S[1])
                self.healthy = True

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            batch = await self._gather()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._run, _merge([w.feeds for w in batch]))
        except Exception as exc:
            if len(batch) > 1:  # one member may be at fault: each runs alone, and only the bad one fails
                for w in batch:
                    await self._run_batch([w])
            elif not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        with _quietly("the batch callbacks"):
            self._on_batch(sum(w.rows for w in batch))
            self._on_run([started - w.arrived for w in batch], elapsed)
        for w, own in zip(batch, _split(results, [w.rows for w in batch]), strict=True):
            if not w.future.done():  # a caller that went away is skipped
                w.future.set_result(own)

    async def _gather(self) -> list[_Waiting]:
        """Waits until the oldest request's delay is up or a full batch of its kind is there, then
        takes that batch out of the queue (dropping requests past their deadline)."""
        first = self._waiting[0]
        while not self._closing:
            rows = sum(w.rows for w in self._waiting if w.signature == first.signature)
            left = first.arrived + self.max_delay_s - time.monotonic()
            if rows >= self.max_batch or left <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except TimeoutError:
                break
        now = time.monotonic()
        batch, rows, rest = [], 0, []
        for w in self._waiting:
            if w.future.done():
                continue
            if w.deadline is not None and now > w.deadline:
                w.future.set_exception(DeadlinePassed(f"the request waited {now - w.arrived:.3f} s, past its deadline; it was not run"))
            elif w.signature == first.signature and (not batch or rows + w.rows <= self.max_batch):  # a request past max_batch runs alone
                batch.append(w)
                rows += w.rows
            else:
                rest.append(w)
        self._waiting = rest
        return batch


def run_merged(run: Callable[[Feeds], Results], requests: list[Feeds], *, batch_axis: bool, max_batch: int) -> list[Results | Exception]:
    """Each request's results (or its exception) when `requests`, which arrived together, run merged
    as the batcher merges them: requests of the same shape past the batch axis, up to `max_batch`
    rows per run; a merged run that fails runs its members again one by one, so only the one at fault
    fails. For a backend that gathers the requests itself (Ray Serve's @serve.batch)."""
    answers: list[Results | Exception | None] = [None] * len(requests)
    rows = [request_rows(feeds, batch_axis) for feeds in requests]
    groups: dict[tuple, list[list[int]]] = {}
    for i, feeds in enumerate(requests):
        runs = groups.setdefault(_rows_and_signature(feeds, batch_axis, max_batch)[1], [[]])
        if runs[-1] and sum(rows[j] for j in runs[-1]) + rows[i] > max_batch:
            runs.append([])
        runs[-1].append(i)
    for run_of in (members for runs in groups.values() for members in runs):
        try:
            results = run(_merge([requests[i] for i in run_of]))
            for i, own in zip(run_of, _split(results, [rows[i] for i in run_of]), strict=True):
                answers[i] = own
        except Exception as exc:
            if len(run_of) == 1:
                answers[run_of[0]] = exc
                continue
            for i in run_of:
                answers[i] = run_merged(run, [requests[i]], batch_axis=batch_axis, max_batch=max_batch)[0]
    return answers  # type: ignore[return-value]


def request_rows(feeds: Feeds, batch_axis: bool) -> int:
    """A request's rows: its length on the batch axis, or 1 for a model without one."""
    return len(next(iter(feeds.values()))) if batch_axis and feeds else 1


def _rows_and_signature(feeds: Feeds, batch_axis: bool, max_batch: int) -> tuple[int, tuple]:
    """A request's rows, and what it must share with others to merge with them."""
    rows = request_rows(feeds, batch_axis)
    if rows > max_batch or not batch_axis:  # larger than any batch, or no batch axis: runs alone
        return rows, ("alone", id(feeds))
    return rows, tuple((name, value.shape[1:], value.dtype.str) for name, value in sorted(feeds.items()))


def _merge(requests: list[Feeds]) -> Feeds:
    return requests[0] if len(requests) == 1 else {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def _split(results: Results, rows: list[int]) -> list[Results]:
    if len(rows) == 1:
        return [results]
    bounds = np.cumsum([0, *rows])
    return [{k: v[start:end] for k, v in results.items()} for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


@contextlib.contextmanager
def _quietly(what: str) -> Iterator[None]:
    """Logs and swallows an exception from metrics callbacks: they must not fail requests or the loop."""
    try:
        yield
    except Exception:
        _log.exception("%s failed; the requests are answered anyway", what)
