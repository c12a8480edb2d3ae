"""`toolkit serve`: bundles behind the Open Inference Protocol (KServe v2) REST API, on Starlette
and uvicorn, with dynamic batching, Triton's binary tensor and generate extensions, Triton's model
repository API, a bearer token, a body size limit, Prometheus metrics and a JSON access log.

What keeps it standing under hostile or faulty traffic:
- every malformed request gets a 4xx naming the problem (protocol.py); an internal error gets a 500
  with a request id, its details only in the server's log;
- admission before any work: requests in flight and the bytes they hold (a JSON body counted at
  its in-memory size, up to 14× its text) are bounded, and a request past either limit gets 503;
  infer and generate alike pass through it, the readiness check and their deadline;
- decoding, validation and encoding run off the event loop (a thread pool sized to the machine; a
  large JSON body in a child process, since parsing it holds the GIL: decoder_process.py), so
  health probes answer while a big request is being decoded;
- the batcher isolates a failing request and restarts its loop if it dies (batching.py), readiness
  false meanwhile.

`create_app` builds the ASGI app from loaded models (what tests and embedders use); `serve` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import MANIFEST_NAME, is_safe_name
from toolkit.errors import ToolkitError
from toolkit.runtime.generate import Sampling
from toolkit.runtime.generate.scheduler import Busy, Event, Request, Scheduler
from toolkit.runtime.graphs import CapturedRunner
from toolkit.runtime.model import Model
from toolkit.serve.batching import BatcherFailed, DeadlinePassed, DynamicBatcher, Overloaded
from toolkit.serve.decoder_process import DecoderProcess
from toolkit.serve.generation import ClientGone, EventStream, Observer, Prompter, Unavailable, collect
from toolkit.serve.keys import Forbidden, KeyGuard, Keys
from toolkit.serve.metrics import Metrics, Observed, route_path
from toolkit.serve.openai import OpenAIRoutes
from toolkit.serve.protocol import (
    HEADER_LENGTH,
    GenerateRequest,
    InferRequest,
    ProtocolError,
    UnencodableOutput,
    checked_text,
    datatype,
    decode_generate_request,
    decode_request,
    dims,
    encode_response,
    error_body,
    explain_options,
)
from toolkit.serve.tls import TLS
from toolkit.serve.triton import batch_first, model_config

__all__ = ["EXTENSIONS", "ServeOptions", "Unavailable", "create_app", "protocol_app", "serve"]

EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "generate", "explain"]
_VERSION = "1"
# Bytes a JSON body holds in memory while it is decoded, per byte of its text, the text included:
# measured peaks (tracemalloc, decode_request) run from 3.7 (random floats) to 13.2 (`0,0,...` into
# an INT64 input: a list slot and an int64 per two bytes of text).
_JSON_EXPANSION = 14
_JSON_IN_PROCESS = 1 << 20  # JSON headers past this are parsed in a worker process: json.loads holds the GIL
_log = logging.getLogger("toolkit.serve")
Loader = Callable[[Path], Model]


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32
    max_delay_ms: float = 0.0  # as Triton: a batch is what queued while the previous one ran; > 0 waits for more
    max_queue: int = 256
    timeout_ms: float | None = None  # a request's deadline in the queue; Triton's parameters.timeout (µs) overrides
    token: str | None = None
    max_body_bytes: int = 64 << 20
    max_graphs: int = 64  # models loaded with cuda_graph=True: input shapes captured at most, the rest run uncaptured
    max_in_flight: int = 256  # requests being read, queued or run at once, all models together
    max_in_flight_bytes: int = 2 << 30  # what those requests may hold in memory at once
    slots: int = 16  # a decoder's cache slots: generations decoded together in one continuous batch
    queue_timeout_ms: float = 30_000.0  # the longest a generation waits for a slot where timeout_ms is not set
    max_prompt_bytes: int = 1 << 20  # a generate request's prompt (or rendered chat), in UTF-8
    repository: tuple[Path, ...] = field(default_factory=tuple)  # directories whose bundles /v2/repository may load
    keys: Path | None = None  # a keys file (toolkit keys): scoped API keys instead of the one token
    log_payloads: bool = False  # request and response bodies in the log: for debugging only
    body_timeout_s: float = 30.0  # the longest a request body may take to arrive (408 beyond)

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_queue, self.max_graphs, self.max_in_flight, self.slots) < 1 \
                or self.max_delay_ms < 0 or self.max_body_bytes < 1 or self.max_in_flight_bytes < 1 or self.max_prompt_bytes < 1 \
                or self.queue_timeout_ms <= 0:
            raise ToolkitError("max-batch, max-queue, max-graphs, max-in-flight and slots must be >= 1, max-delay-ms >= 0 "
                               "and the byte limits and the queue timeout positive.")
        if self.token is not None and not self.token:
            raise ToolkitError("the bearer token must not be empty.")
        if self.token is not None and self.keys is not None:
            raise ToolkitError("give --token or --keys, not both (--token is one key with every scope).")
        if self.body_timeout_s <= 0:
            raise ToolkitError("the body timeout must be positive.")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Admission:
    """Requests in flight and the bytes they hold, both bounded: past either, 503 at once. A request
    larger than the whole byte budget is admitted when nothing else is in flight (else it never could)."""

    def __init__(self, max_requests: int, max_bytes: int, on_reject: Callable[[str], None]):
        self.max_requests, self.max_bytes, self._on_reject = max_requests, max_bytes, on_reject
        self.requests = 0
        self.bytes = 0
        self.generations = 0  # of the requests: generations, which last (a stream holds its place to its end)
        self.max_generations = max(1, max_requests // 2)  # the other half stays for infer and the rest

    @asynccontextmanager
    async def request(self, generation: bool = False) -> AsyncIterator[_Held]:
        if self.requests >= self.max_requests:
            self._on_reject("requests")
            raise _HTTPError(503, f"the server has {self.requests} requests in flight, its limit; retry later.")
        if generation and self.generations >= self.max_generations:
            self._on_reject("generations")
            raise _HTTPError(503, f"the server has {self.generations} generations in flight, the most it lets generations hold "
                                  "(half of --max-in-flight); retry later.")
        self.requests += 1
        self.generations += generation
        held = _Held(self)
        try:
            yield held
        finally:
            self.requests -= 1
            self.generations -= generation
            self.bytes -= held.bytes

    def reserve(self, held: _Held, size: int) -> None:
        if self.bytes + size > self.max_bytes and self.bytes - held.bytes > 0:
            self._on_reject("bytes")
            raise _HTTPError(503, f"the requests in flight hold {self.bytes:,} bytes; this one needs {size:,} more, past the "
                                  f"server's limit of {self.max_bytes:,}; retry later.")
        self.bytes += size
        held.bytes += size


class _Held:
    def __init__(self, admission: _Admission):
        self.admission, self.bytes = admission, 0

    def reserve(self, size: int) -> None:
        self.admission.reserve(self, size)


class _Served:
    """One model served in this process: its runtime, its batcher and (for decoders) its scheduler.

    What the routes ask of a served model (an endpoint; ray_backend.py has the other kind, a model
    running in Ray Serve replicas): `signature` (inputs, outputs, validate), `healthy`, `depth`,
    `run(feeds, deadline)`, `generates`, `events(request)` (a generation's events; bad arguments
    raise before the first), `generation_stats()`, `start()`, `close()`. An endpoint raises
    `Unavailable` for what the client should retry (503)."""

    def __init__(self, model: Model, options: ServeOptions, metrics: Metrics):
        self.signature = model
        self.name = model.name
        # A session opened for CUDA graphs replays one captured graph per batch shape it has seen.
        run = CapturedRunner(model, limit=options.max_graphs).run if model.cuda_graph else model.run_validated
        self.batcher = DynamicBatcher(
            run, batch_axis=batch_first(model), max_batch=options.max_batch, max_delay_s=options.max_delay_ms / 1000,
            max_queue=options.max_queue, on_batch=lambda rows: metrics.batch_run(self.name, rows),
            on_run=lambda queued, compute: metrics.request_run(self.name, queued, compute),
        )
        generates = model.bundle.manifest.generation
        self._scheduler = Scheduler(model, slots=options.slots, max_waiting=options.max_queue) if generates else None
        if self._scheduler is not None:
            _log.info("%s generates over %d cache slots (%s)", self.name, options.slots, self._scheduler.note)

    @property
    def healthy(self) -> bool:
        return self.batcher.healthy

    @property
    def depth(self) -> int:
        return self.batcher.depth

    @property
    def generates(self) -> bool:
        return self._scheduler is not None

    def generation_stats(self) -> tuple[int, int, int] | None:
        """(running, waiting, slots) of the model's continuous batch."""
        s = self._scheduler
        return None if s is None else (s.running, s.waiting, s.slots)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()  # what it had accepted is answered first
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close, 60.0)

    async def events(self, request: Request) -> EventStream:
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = self._scheduler.submit(request, lambda event: loop.call_soon_threadsafe(arrived.put_nowait, event))
        except Busy as exc:
            raise Unavailable(str(exc)) from None
        return EventStream(arrived.get, handle.cancel)

    async def run(self, feeds: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        try:
            return await self.batcher.submit(feeds, deadline=deadline)
        except (Overloaded, DeadlinePassed, BatcherFailed) as exc:
            raise Unavailable(str(exc)) from None



def _metadata(s: Any) -> dict[str, Any]:
    return {
        "name": s.name,
        "versions": [_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in s.signature.inputs],
        "outputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in s.signature.outputs],
    }


class _Routes:
    """The protocol's routes over the served models; each handler is a small method."""

    def __init__(self, sources: Sequence[Any], options: ServeOptions, metrics: Metrics, loader: Loader | None,
                 endpoint: Callable[[Any, Metrics], Any] | None = None):
        """`sources`: what `endpoint(source, metrics)` turns into a served model, in the server's event
        loop (by default a loaded Model, served in this process)."""
        self.options, self.metrics, self.loader = options, metrics, loader
        self.served: dict[str, Any] = {}
        self._prompters: dict[str, Prompter] = {}
        self._sources = list(sources)
        self._endpoint = endpoint or (lambda model, metrics: _Served(model, options, metrics))
        self.ready = False
        self.admission = _Admission(options.max_in_flight, options.max_in_flight_bytes, lambda why: metrics.rejected.labels(reason=why).inc())
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="toolkit-serve")
        self.decoder = DecoderProcess()  # started on the first large JSON body
        self._loading: dict[str, asyncio.Lock] = {}  # repository loads in progress, by name

    @asynccontextmanager
    async def lifespan(self, app: Any):
        for source in self._sources:  # batchers and semaphores belong to the server's event loop
            self._add(source)
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for s in self.served.values():  # uvicorn has drained the connections; finish what was queued
                await s.close()
            self.threads.shutdown(wait=False)
            self.decoder.close()

    def _add(self, source: Any) -> None:
        served = self._endpoint(source, self.metrics)
        if served.name in self.served:
            raise ToolkitError(f"two bundles are both named {served.name!r}; serve them from separate servers or rename one.")
        self.metrics.add_model(served.name)
        served.start()
        self._prompters.pop(served.name, None)
        self.served[served.name] = served

    def is_ready(self, s: Any = None) -> bool:
        """The server's readiness, or one model's: started, not stopping, and every served model healthy."""
        return self.ready and all(m.healthy for m in ([s] if s else self.served.values()))

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        routes = [Route("/v2/health/live", self.live), Route("/v2/health/ready", self.server_ready), Route("/v2", self.server_metadata),
                  Route("/metrics", self.prometheus), Route("/v2/repository/index", self.repository_index, methods=["POST"]),
                  Route("/v2/repository/models/{model}/load", self.repository_load, methods=["POST"]),
                  Route("/v2/repository/models/{model}/unload", self.repository_unload, methods=["POST"])]
        routes += OpenAIRoutes(self).routes()
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                Route(prefix, self.model_metadata), Route(prefix + "/ready", self.model_ready), Route(prefix + "/config", self.configuration),
                Route(prefix + "/infer", self.infer, methods=["POST"]), Route(prefix + "/explain", self.explain, methods=["POST"]),
                Route(prefix + "/generate", self.generate, methods=["POST"]),
                Route(prefix + "/generate_stream", self.generate_stream, methods=["POST"]),
            ]
        return routes

    def find(self, request: Any) -> Any:
        name = request.path_params["model"]
        if name not in self.served:
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise _HTTPError(404, f"unknown model {shown!r}; this server has {', '.join(self.served) or 'none'}.")
        version = request.path_params.get("version")
        if version not in (None, _VERSION):
            raise _HTTPError(404, f"model {name!r} has no version {version[:20]!r}; its only version is {_VERSION}.")
        return self.served[name]

    def named(self, name: str, request: Any, action: str) -> Any:
        """The served model `name` (an OpenAI request names it in its body), if the request's key may
        `action` on it (403 if not)."""
        if name not in self.served:
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise ProtocolError(f"unknown model {shown!r}; this server has {', '.join(self.served) or 'none'}.", 404, "model")
        grants = request.scope.get("state", {}).get("grants")
        if grants is not None:
            grants.require(action, name)
        return self.served[name]

    def prompter(self, s: Any) -> Prompter:
        if s.name not in self._prompters:
            self._prompters[s.name] = Prompter(s.signature.bundle)
        return self._prompters[s.name]

    def ready_for(self, s: Any) -> None:
        if not self.is_ready(s):
            self.metrics.rejected.labels(reason="not ready").inc()
            raise _HTTPError(503, f"model {s.name!r} is not ready (starting, stopping, or restarting after a failure); retry later.")

    async def body_of(self, request: Any, held: _Held, *, json_body: bool) -> bytes:
        """The body, within the size limit, its bytes reserved as they arrive (× the JSON expansion)."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
            await self._drain(request, int(declared))
            raise _HTTPError(413, f"the body is {int(declared)} bytes; this server accepts at most {limit}.")
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _HTTPError(413, f"the body exceeds {limit} bytes, this server's limit.")
                held.reserve(len(chunk) * (_JSON_EXPANSION if json_body else 1))
                chunks.append(chunk)

        try:  # a slow upload holds its admission; it may not hold it for ever
            await asyncio.wait_for(read(), self.options.body_timeout_s)
        except asyncio.TimeoutError:
            raise _HTTPError(408, f"the body did not arrive within {self.options.body_timeout_s:g} s (--body-timeout-s).") from None
        return b"".join(chunks)

    async def _drain(self, request: Any, declared: int) -> None:
        """Reads and drops an oversized body that is not far past the limit, so that the client, still
        sending, reads its 413: closing on unread bytes resets the connection, and the answer with it."""
        if declared > 2 * self.options.max_body_bytes:
            return
        with contextlib.suppress(Exception):  # a client that hung up: nothing left to tell it
            async for _ in request.stream():
                pass

    async def off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.threads, function, *args)

    async def live(self, request: Any) -> Any:
        return _json({"live": True})

    async def server_ready(self, request: Any) -> Any:
        ready = self.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Any) -> Any:
        from toolkit._version import __version__

        return _json({"name": "toolkit", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Any) -> Any:
        return _json(_metadata(self.find(request)))

    async def model_ready(self, request: Any) -> Any:
        s = self.find(request)
        ready = self.is_ready(s)
        return _json({"name": s.name, "ready": ready}, 200 if ready else 503)

    async def configuration(self, request: Any) -> Any:
        o = self.options
        return _json(model_config(self.find(request).signature, max_batch=o.max_batch, max_delay_ms=o.max_delay_ms, instances=1))

    async def infer(self, request: Any) -> Any:
        s = self.find(request)
        self.ready_for(s)
        async with self.admission.request() as held:
            parsed, feeds = await self._tensors(request, s, held)
            results = await self.run_batched(s, feeds, parsed.parameters.get("timeout"))
            if parsed.outputs is not None:
                results = {name: results[name] for name in parsed.outputs}
            return await self._answer(s, parsed, results)

    async def explain(self, request: Any) -> Any:
        """The explain extension: an infer request whose `parameters` name the method (`method`,
        `target`, `output`, and the method's own: window, strides, patch, samples, seed), answered
        with each attributed input's attributions (`<input>_attribution`), the explained `target`
        and `score` of each row. The perturbed copies run through the model's batcher, with infer's
        traffic, within the request's deadline."""
        from toolkit.attribution import explain

        s = self.find(request)
        self.ready_for(s)
        async with self.admission.request() as held:
            parsed, feeds = await self._tensors(request, s, held)
            options = explain_options(parsed.parameters)
            loop, deadline = asyncio.get_running_loop(), self._deadline(parsed.parameters.get("timeout"))

            def run(chunk: dict[str, Any]) -> dict[str, Any]:  # from the worker thread, through the event loop's batcher
                return asyncio.run_coroutine_threadsafe(s.run(chunk, deadline), loop).result()

            try:
                explanation = await self.off_loop(functools.partial(explain, s.signature, feeds, run=run, **options))
            except Unavailable as exc:
                raise _HTTPError(503, str(exc)) from None
            except ToolkitError as exc:
                raise _HTTPError(400, str(exc)) from None
            results = {f"{name}_attribution": values.astype(np.float32) for name, values in explanation.attributions.items()}
            results |= {"target": explanation.target.astype(np.int64), "score": explanation.score.astype(np.float32)}
            binary = set(results) if parsed.parameters.get("binary_data_output") is True else set()
            return await self._answer(s, dataclasses.replace(parsed, outputs=None, binary_outputs=binary), results)

    async def _tensors(self, request: Any, s: Any, held: _Held) -> tuple[InferRequest, dict[str, Any]]:
        """An infer request's body read within the limits and its tensors decoded and validated."""
        header_length = request.headers.get(HEADER_LENGTH)
        body = await self.body_of(request, held, json_body=header_length is None)
        json_bytes = len(body) if header_length is None or not (header_length.isascii() and header_length.isdigit()) \
            else min(int(header_length), len(body))
        if header_length is not None:  # its JSON part was reserved as bytes; parsing holds more
            held.reserve(json_bytes * (_JSON_EXPANSION - 1))
        decode = self.decoder.decode if json_bytes > _JSON_IN_PROCESS else functools.partial(self.off_loop, decode_request)
        try:
            parsed = await decode(body, header_length, s.signature.inputs, s.signature.outputs, self.options.max_body_bytes * _JSON_EXPANSION)
            return parsed, await self.off_loop(s.signature.validate, parsed.inputs)
        except ProtocolError as exc:
            raise _HTTPError(exc.status, str(exc)) from None
        except ToolkitError as exc:
            raise _HTTPError(400, str(exc)) from None

    async def _answer(self, s: Any, parsed: InferRequest, results: dict[str, Any]) -> Any:
        from starlette.responses import Response

        try:
            content, header_length = await self.off_loop(encode_response, s.name, parsed, results)
        except UnencodableOutput as exc:  # the request's own values overflowed: the client's to change, not a failure here
            raise _HTTPError(422, str(exc)) from None
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    def _deadline(self, timeout_us: Any) -> float | None:
        """The request's deadline (time.monotonic): Triton's parameters.timeout in µs, or the server's."""
        if isinstance(timeout_us, (int, float)) and not isinstance(timeout_us, bool) and 0 < timeout_us < 1e13:
            return time.monotonic() + timeout_us / 1e6
        return time.monotonic() + self.options.timeout_ms / 1000 if self.options.timeout_ms else None

    async def run_batched(self, s: Any, feeds: dict[str, Any], timeout_us: Any = None) -> dict[str, Any]:
        """Runs `feeds` through the model's batcher, within the request's deadline."""
        self.metrics.queue_depth.labels(s.name).set(s.depth + 1)
        try:
            return await s.run(feeds, self._deadline(timeout_us))
        except Unavailable as exc:
            raise _HTTPError(503, str(exc)) from None
        finally:
            self.metrics.queue_depth.labels(s.name).set(s.depth)

    @asynccontextmanager
    async def _generation(self, request: Any) -> AsyncIterator[tuple[Any, GenerateRequest]]:
        """A v2 generate request through the same rules as infer: readiness, then admission (where
        generations may hold half the requests in flight), its body parsed."""
        s = self.find(request)
        if not s.generates:
            raise _HTTPError(400, f"model {s.name!r} is not a decoder with a KV cache; generate needs one (the reference gpt is).")
        self.ready_for(s)
        async with self.admission.request(generation=True) as held:
            yield s, decode_generate_request(await self.body_of(request, held, json_body=True))

    def generation_deadline(self) -> float:
        """How long a generation may wait for a cache slot: --timeout-ms, else the queue timeout."""
        return time.monotonic() + (self.options.timeout_ms or self.options.queue_timeout_ms) / 1000

    async def encode(self, s: Any, prompts: Sequence[str | Sequence[int]], param: str) -> list[list[int]]:
        """The prompts' token ids: text checked, then tokenized off the event loop (a large prompt
        takes a while); token ids as they are (the scheduler checks them against the vocabulary)."""
        prompter = self.prompter(s)
        for text in prompts:
            if isinstance(text, str):
                checked_text(text, param, self.options.max_prompt_bytes)
        try:
            return await self.off_loop(lambda: [prompter.encode(p) if isinstance(p, str) else list(p) for p in prompts])
        except ToolkitError as exc:
            raise ProtocolError(str(exc), param=param) from None

    async def start(self, s: Any, requests: Sequence[Request], arrived: float) -> list[EventStream]:
        """Every request submitted to the model's scheduler, each one's events observed for the
        metrics; bad arguments are a 400 and a full queue a 503, and then none of them runs."""
        started: list[EventStream] = []
        try:
            for r in requests:
                started.append(await s.events(r))
                started[-1].observer = Observer(self.metrics, s.name, len(r.prompt), arrived)
        except BaseException as exc:
            for events in started:
                await events.aclose()
            if isinstance(exc, ToolkitError):
                raise ProtocolError(str(exc)) from None
            if isinstance(exc, Unavailable):
                raise _HTTPError(503, str(exc)) from None
            raise
        return started

    async def generate(self, request: Any) -> Any:
        from starlette.responses import Response

        arrived = time.perf_counter()
        async with self._generation(request) as (s, g):
            (prompt,) = await self.encode(s, [g.text], "text_input")
            (events,) = await self.start(s, [_engine_request(prompt, g, self.generation_deadline())], arrived)
            try:
                got = await collect(events, request)
            except ClientGone:
                return Response(status_code=499)  # nginx's "client closed request", for the log: nobody reads it
            except Unavailable as exc:
                raise _HTTPError(503, str(exc)) from None
        return _json({"model_name": s.name, "model_version": _VERSION, "text_output": "".join(e.text for e in got)})

    async def generate_stream(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        arrived = time.perf_counter()
        held = contextlib.AsyncExitStack()
        s, g = await held.enter_async_context(self._generation(request))
        try:
            (prompt,) = await self.encode(s, [g.text], "text_input")
            (events,) = await self.start(s, [_engine_request(prompt, g, self.generation_deadline())], arrived)
        except BaseException:
            await held.aclose()
            raise

        async def sse() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if event.text:
                        yield f"data: {json.dumps({'model_name': s.name, 'model_version': _VERSION, 'text_output': event.text})}\n\n"
            except Exception as exc:  # the stream has begun: its end says what went wrong
                yield f"data: {json.dumps({'error': _stream_error(exc, request)})}\n\n"
            finally:
                await events.aclose()
                await held.aclose()  # the admission, held for the whole stream

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def prometheus(self, request: Any) -> Any:
        from starlette.responses import Response

        for s in list(self.served.values()):
            stats = s.generation_stats()
            if stats is not None:
                running, waiting, slots = stats
                self.metrics.running.labels(s.name).set(running)
                self.metrics.waiting.labels(s.name).set(waiting)
                self.metrics.cache_usage.labels(s.name).set(running / slots)
        content, media_type = self.metrics.exposition()
        return Response(content, media_type=media_type)

    # --- Triton's model repository extension ---------------------------------------------------------

    def _available(self) -> dict[str, Path]:
        """Bundles the repository directories hold, by directory name."""
        found: dict[str, Path] = {}
        for root in self.options.repository:
            for path in sorted(root.iterdir()) if root.is_dir() else []:
                if is_safe_name(path.name) and (path / MANIFEST_NAME).is_file() and not path.is_symlink():
                    found.setdefault(path.name, path)
        return found

    async def repository_index(self, request: Any) -> Any:
        index = [{"name": name, "version": _VERSION, "state": "READY" if s.healthy else "UNAVAILABLE"}
                 for name, s in self.served.items()]
        index += [{"name": name, "version": _VERSION, "state": "UNAVAILABLE", "reason": "unloaded"}
                  for name in self._available() if name not in self.served]
        return _json(index)

    async def repository_load(self, request: Any) -> Any:
        name = request.path_params["model"]
        if name in self.served or name not in self._available():
            return await self._load(name)
        async with self._loading.setdefault(name, asyncio.Lock()):  # a second load of one name waits for the first
            return await self._load(name)

    async def _load(self, name: str) -> Any:
        if name in self.served:
            return _json({})
        path = self._available().get(name)
        if path is None or self.loader is None:
            where = ", ".join(map(str, self.options.repository)) or "none given (toolkit serve --repository DIR)"
            raise _HTTPError(404, f"no bundle named {name[:64]!r} in the model repository ({where}).")
        try:
            model = await self.off_loop(self.loader, path)
        except ToolkitError as exc:
            raise _HTTPError(400, f"bundle {path} cannot be loaded: {exc}") from None
        if model.name != name:
            raise _HTTPError(400, f"bundle {path} is named {model.name!r} in its manifest, not {name!r}; rename the directory.")
        self._add(model)
        _log.info("loaded %s from %s", name, path)
        return _json({})

    async def repository_unload(self, request: Any) -> Any:
        name = request.path_params["model"]
        s = self.served.pop(name, None)
        if s is None:
            raise _HTTPError(404, f"model {name[:64]!r} is not loaded.")
        await s.close()  # what it had accepted is answered first
        _log.info("unloaded %s", name)
        return _json({})


def _engine_request(prompt: list[int], g: GenerateRequest, deadline: float) -> Request:
    """The scheduler's request for a v2 generate request; a bad sampling value is a ProtocolError."""
    try:
        sampling = Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed)
    except ToolkitError as exc:
        raise ProtocolError(str(exc)) from None
    return Request(prompt, max_new_tokens=g.max_new_tokens, sampling=sampling, stop=g.stop, deadline=deadline)


def _stream_error(exc: Exception, request: Any) -> str:
    """What a stream that fails after it began says: the reason a client may act on (retry), or an
    internal error's request id (its details only in the log)."""
    if isinstance(exc, Unavailable):
        return str(exc)
    request_id = request.scope.get("state", {}).get("request_id", "-")
    _log.error("request %s: a generation failed mid-stream", request_id, exc_info=exc)
    return f"internal error; the server's log has its details under request id {request_id}."


def _json(content: Any, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def _error(request: Any, status: int, message: str, param: str | None = None) -> Any:
    return _json(error_body(route_path(request.scope), status, message, param), status)


def _internal_error(request: Any, exc: Exception) -> Any:
    """A 500 that says nothing of the server's insides: the request id, and the details in the log."""
    request_id = request.scope.get("state", {}).get("request_id", "-")
    _log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
    body = error_body(route_path(request.scope), 500, f"internal error; the server's log has its details under request id {request_id}.")
    return _json(body | ({"request_id": request_id} if isinstance(body["error"], str) else {}), 500)


def create_app(models: Sequence[Model], options: ServeOptions | None = None, loader: Loader | None = None) -> Any:
    """The ASGI app serving `models` (by manifest name; names must be unique); `loader(path)` opens a
    bundle of `options.repository` when /v2/repository/models/{name}/load asks for it."""
    return protocol_app(models, options or ServeOptions(), loader=loader)


def protocol_app(sources: Sequence[Any], options: ServeOptions, *, loader: Loader | None = None,
                 endpoint: Callable[[Any, Metrics], Any] | None = None) -> Any:
    """The protocol's ASGI app over `sources`, each turned into a served model by `endpoint` (default:
    a loaded Model served in this process): one protocol, whichever backend runs the models."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as exc:
        raise ToolkitError(f"serving needs the serve extra ({exc.name} is missing): pip install 'toolkit[serve]'.") from None
    from starlette.applications import Starlette

    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ToolkitError(f"two bundles are both named {twice!r}; serve them from separate servers or rename one.")
    metrics = Metrics()
    routes = _Routes(sources, options, metrics, loader, endpoint)
    app = Starlette(routes=routes.routes(), lifespan=routes.lifespan, exception_handlers={
        _HTTPError: lambda request, exc: _error(request, exc.status, str(exc)),
        ProtocolError: lambda request, exc: _error(request, exc.status, str(exc), exc.param),
        Forbidden: lambda request, exc: _error(request, 403, str(exc)),
        404: lambda request, exc: _error(request, 404, f"no route {request.url.path[:200]}"),
        405: lambda request, exc: _error(request, 405, f"{request.method} is not allowed on {request.url.path[:200]}"),
        Exception: _internal_error,
    })
    keys = Keys.from_file(options.keys) if options.keys is not None else Keys.token(options.token) if options.token is not None else None
    return Observed(app, metrics, lambda: routes.served.keys(), KeyGuard(keys) if keys is not None else None, log_payloads=options.log_payloads)


def serve(models: Sequence[Model], *, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          loader: Loader | None = None, log_level: str = "info", tls: TLS | None = None) -> None:
    """Serves until interrupted; on SIGINT/SIGTERM stops accepting and finishes requests in flight.
    With `tls`, only over TLS (mutual, where it names a CA). SIGHUP reads the keys file again."""
    import signal

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = options or ServeOptions()
    warn_payloads(options)
    app = create_app(models, options, loader)
    if app.guard is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: app.guard.keys.reload())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=30,
                            **(tls.uvicorn() if tls else {}))
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()


def warn_payloads(options: ServeOptions) -> None:
    if options.log_payloads:
        _log.warning("WARNING: --log-payloads is on: request and response bodies (inputs, prompts, generated text) go to the log "
                     "(toolkit.payloads). Turn it off outside debugging.")
