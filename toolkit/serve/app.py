"""`toolkit serve`: bundles behind the Open Inference Protocol (KServe v2) REST API, on Starlette
and uvicorn, with dynamic batching, Triton's binary tensor and generate extensions, a bearer token,
a body size limit, Prometheus metrics and a JSON access log.

`create_app` builds the ASGI app from loaded models (what tests and embedders use); `serve` runs it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.runtime.generate import Generator, Sampling
from toolkit.runtime.graphs import CapturedRunner
from toolkit.runtime.model import Model
from toolkit.serve.auth import BearerToken
from toolkit.serve.batching import DeadlinePassed, DynamicBatcher, Overloaded
from toolkit.serve.metrics import Metrics, Observed
from toolkit.serve.protocol import (
    HEADER_LENGTH,
    GenerateRequest,
    ProtocolError,
    datatype,
    decode_generate_request,
    decode_request,
    dims,
    encode_response,
)
from toolkit.serve.triton import batch_first, model_config

__all__ = ["EXTENSIONS", "ServeOptions", "create_app", "serve"]

EXTENSIONS = ["binary_tensor_data", "model_configuration", "generate"]
_VERSION = "1"


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32
    max_delay_ms: float = 0.0  # as Triton: a batch is what queued while the previous one ran; > 0 waits for more
    max_queue: int = 256
    timeout_ms: float | None = None  # a request's deadline in the queue; Triton's parameters.timeout (µs) overrides
    token: str | None = None
    max_body_bytes: int = 64 << 20
    max_graphs: int = 64  # models loaded with cuda_graph=True: input shapes captured at most, the rest run uncaptured

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay_ms < 0 or self.max_body_bytes < 1 or self.max_graphs < 1:
            raise ToolkitError("max-batch, max-queue and max-graphs must be >= 1, max-delay-ms >= 0 and the body limit positive.")
        if self.token is not None and not self.token:
            raise ToolkitError("the bearer token must not be empty.")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Served:
    """One model as served: its runtime, its batcher, its metadata and (for decoders) its Generator."""

    def __init__(self, model: Model, options: ServeOptions, metrics: Metrics):
        self.model = model
        self.name = model.name
        # A session opened for CUDA graphs replays one captured graph per batch shape it has seen.
        run = CapturedRunner(model, limit=options.max_graphs).run if model.cuda_graph else model.run_validated
        self.batcher = DynamicBatcher(
            run, batch_axis=batch_first(model), max_batch=options.max_batch, max_delay_s=options.max_delay_ms / 1000,
            max_queue=options.max_queue, on_batch=metrics.batch_size.labels(self.name).observe,
        )
        self.generator = Generator(model) if model.bundle.manifest.generation else None

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in self.model.inputs],
            "outputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in self.model.outputs],
        }


class _Routes:
    """The protocol's routes over the served models; each handler is a small method."""

    def __init__(self, models: Sequence[Model], options: ServeOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.served: dict[str, _Served] = {}
        for model in models:
            if model.name in self.served:
                raise ToolkitError(f"two bundles are both named {model.name!r}; serve them from separate servers or rename one.")
            self.served[model.name] = _Served(model, options, metrics)
        self.ready = False

    @asynccontextmanager
    async def lifespan(self, app: Any):
        for s in self.served.values():
            s.batcher.start()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            for s in self.served.values():  # uvicorn has drained the connections; finish what was queued
                await s.batcher.close()

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        routes = [Route("/v2/health/live", self.live), Route("/v2/health/ready", self.server_ready), Route("/v2", self.server_metadata),
                  Route("/metrics", self.prometheus)]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                Route(prefix, self.model_metadata), Route(prefix + "/ready", self.model_ready), Route(prefix + "/config", self.configuration),
                Route(prefix + "/infer", self.infer, methods=["POST"]), Route(prefix + "/generate", self.generate, methods=["POST"]),
                Route(prefix + "/generate_stream", self.generate_stream, methods=["POST"]),
            ]
        return routes

    def find(self, request: Any) -> _Served:
        name = request.path_params["model"]
        if name not in self.served:
            raise _HTTPError(404, f"unknown model {name!r}; this server has {', '.join(self.served) or 'none'}.")
        version = request.path_params.get("version")
        if version not in (None, _VERSION):
            raise _HTTPError(404, f"model {name!r} has no version {version!r}; its only version is {_VERSION}.")
        return self.served[name]

    async def body_of(self, request: Any) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _HTTPError(413, f"the body is {int(declared)} bytes; this server accepts at most {limit}.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"the body exceeds {limit} bytes, this server's limit.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def live(self, request: Any) -> Any:
        return _json({"live": True})

    async def server_ready(self, request: Any) -> Any:
        return _json({"ready": self.ready}, 200 if self.ready else 503)

    async def server_metadata(self, request: Any) -> Any:
        from toolkit import __version__

        return _json({"name": "toolkit", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Any) -> Any:
        return _json(self.find(request).metadata())

    async def model_ready(self, request: Any) -> Any:
        self.find(request)
        return _json({"name": request.path_params["model"], "ready": self.ready}, 200 if self.ready else 503)

    async def configuration(self, request: Any) -> Any:
        o = self.options
        return _json(model_config(self.find(request).model, max_batch=o.max_batch, max_delay_ms=o.max_delay_ms, instances=1))

    async def infer(self, request: Any) -> Any:
        from starlette.responses import Response

        s = self.find(request)
        if not self.ready:
            raise _HTTPError(503, "the server is not ready.")
        body = await self.body_of(request)
        try:
            parsed = decode_request(body, request.headers.get(HEADER_LENGTH), s.model.inputs, s.model.outputs)
            feeds = s.model.validate(parsed.inputs)
        except (ProtocolError, ToolkitError) as exc:
            raise _HTTPError(400, str(exc)) from None
        results = await self._run_batched(s, feeds, parsed.parameters.get("timeout"))
        if parsed.outputs is not None:
            results = {name: results[name] for name in parsed.outputs}
        content, header_length = encode_response(s.name, parsed, results)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def _run_batched(self, s: _Served, feeds: dict[str, Any], timeout_us: Any) -> dict[str, Any]:
        """Runs `feeds` through the model's batcher, within the request's deadline (Triton's
        parameters.timeout, in µs) or the server's."""
        if isinstance(timeout_us, (int, float)) and timeout_us > 0:
            wait = timeout_us / 1e6
        else:
            wait = self.options.timeout_ms / 1000 if self.options.timeout_ms else None
        self.metrics.queue_depth.labels(s.name).set(s.batcher.depth + 1)
        try:
            return await s.batcher.submit(feeds, deadline=None if wait is None else time.monotonic() + wait)
        except (Overloaded, DeadlinePassed) as exc:
            raise _HTTPError(503, str(exc)) from None
        except ToolkitError as exc:
            raise _HTTPError(500, str(exc)) from None
        finally:
            self.metrics.queue_depth.labels(s.name).set(s.batcher.depth)

    async def _generation(self, request: Any) -> tuple[_Served, GenerateRequest]:
        s = self.find(request)
        if s.generator is None:
            raise _HTTPError(400, f"model {s.name!r} is not a decoder with a KV cache; generate needs one (the reference gpt is).")
        try:
            return s, decode_generate_request(await self.body_of(request))
        except ProtocolError as exc:
            raise _HTTPError(400, str(exc)) from None

    async def generate(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        s, g = await self._generation(request)
        try:
            text = await run_in_threadpool(s.generator.generate, g.text, **_arguments(g))
        except ToolkitError as exc:
            raise _HTTPError(400, str(exc)) from None
        return _json({"model_name": s.name, "model_version": _VERSION, "text_output": text})

    async def generate_stream(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        s, g = await self._generation(request)
        try:
            pieces = s.generator.stream(g.text, **_arguments(g))  # validates now: bad input is a 400, not a broken stream
        except ToolkitError as exc:
            raise _HTTPError(400, str(exc)) from None

        def events() -> Iterator[str]:
            try:
                for piece in pieces:
                    yield f"data: {json.dumps({'model_name': s.name, 'model_version': _VERSION, 'text_output': piece})}\n\n"
            except ToolkitError as exc:
                yield f"data: {json.dumps({'error': str(exc)})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def prometheus(self, request: Any) -> Any:
        from starlette.responses import Response

        content, media_type = self.metrics.exposition()
        return Response(content, media_type=media_type)


def _arguments(g: GenerateRequest) -> dict[str, Any]:
    """The Generator's keyword arguments for a generate request; a bad sampling value is a ToolkitError."""
    return {"max_new_tokens": g.max_new_tokens, "stop": g.stop,
            "sampling": Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed)}


def _json(content: Any, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def create_app(models: Sequence[Model], options: ServeOptions | None = None) -> Any:
    """The ASGI app serving `models` (by manifest name; names must be unique)."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as exc:
        raise ToolkitError(f"serving needs the serve extra ({exc.name} is missing): pip install 'toolkit[serve]'.") from None
    from starlette.applications import Starlette

    options = options or ServeOptions()
    metrics = Metrics()
    routes = _Routes(models, options, metrics)
    app = Starlette(routes=routes.routes(), lifespan=routes.lifespan, exception_handlers={
        _HTTPError: lambda request, exc: _json({"error": str(exc)}, exc.status),
        404: lambda request, exc: _json({"error": f"no route {request.url.path}"}, 404),
        405: lambda request, exc: _json({"error": f"{request.method} is not allowed on {request.url.path}"}, 405),
        Exception: lambda request, exc: _json({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500),
    })
    return Observed(app, metrics, BearerToken(options.token) if options.token is not None else None)


def serve(models: Sequence[Model], *, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          log_level: str = "info") -> None:
    """Serves until interrupted; on SIGINT/SIGTERM stops accepting and finishes requests in flight."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(create_app(models, options), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30)
    uvicorn.Server(config).run()
