"""`toolkit serve`: bundles behind the Open Inference Protocol (KServe v2) REST API, on Starlette
and uvicorn, with dynamic batching, Triton's binary tensor and generate extensions, a bearer token,
a body size limit, Prometheus metrics and a JSON access log.

`create_app` builds the ASGI app from loaded models (what tests and embedders use); `serve` runs it.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from toolkit.batching import DeadlinePassed, DynamicBatcher, Overloaded
from toolkit.errors import ToolkitError
from toolkit.protocol import HEADER_LENGTH, ProtocolError, datatype, decode_request, dims, encode_response
from toolkit.runtime import Model
from toolkit.triton import batch_first, model_config

__all__ = ["ServeOptions", "create_app", "serve", "EXTENSIONS"]

EXTENSIONS = ["binary_tensor_data", "model_configuration", "generate"]
_VERSION = "1"
_access = logging.getLogger("toolkit.access")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32
    max_delay_ms: float = 0.0  # as Triton: a batch is what queued while the previous one ran; > 0 waits for more
    max_queue: int = 256
    timeout_ms: float | None = None  # a request's deadline in the queue; Triton's parameters.timeout (µs) overrides
    token: str | None = None
    max_body_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay_ms < 0 or self.max_body_bytes < 1:
            raise ToolkitError("max-batch and max-queue must be >= 1, max-delay-ms >= 0 and the body limit positive.")
        if self.token is not None and not self.token:
            raise ToolkitError("the bearer token must not be empty.")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Served:
    """One model as served: its runtime, its batcher, its metadata and (for decoders) its Generator."""

    def __init__(self, model: Model, options: ServeOptions, metrics: _Metrics):
        self.model = model
        self.name = model.name
        self.batcher = DynamicBatcher(
            model.run_validated, batch_axis=batch_first(model), max_batch=options.max_batch, max_delay_s=options.max_delay_ms / 1000,
            max_queue=options.max_queue, on_batch=metrics.batch_size.labels(self.name).observe,
        )
        self.generator = None
        if model.bundle.manifest.generation:
            from toolkit.generate import Generator

            self.generator = Generator(model)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in self.model.inputs],
            "outputs": [{"name": t.name, "datatype": datatype(t.dtype), "shape": dims(t.shape)} for t in self.model.outputs],
        }

    def config(self, options: ServeOptions) -> dict[str, Any]:
        """The model's configuration in Triton's JSON form (protobuf JSON: int64 dims as strings)."""
        return model_config(self.model, max_batch=options.max_batch, max_delay_ms=options.max_delay_ms, instances=1)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()  # per app: two servers in one process do not share counts
        self.requests = Counter("toolkit_requests", "Requests answered, by model, route and status.",
                                ["model", "route", "status"], registry=self.registry)
        self.latency = Histogram("toolkit_request_latency_seconds", "Time from request to response, by model and route.",
                                 ["model", "route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        self.batch_size = Histogram("toolkit_batch_size", "Rows per inference run, after dynamic batching.", ["model"],
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("toolkit_queue_depth", "Requests waiting for a batch.", ["model"], registry=self.registry)


def create_app(models: Sequence[Model], options: ServeOptions | None = None) -> Any:
    """The ASGI app serving `models` (by manifest name; names must be unique)."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as exc:
        raise ToolkitError(f"serving needs the serve extra ({exc.name} is missing): pip install 'toolkit[serve]'.") from None
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    options = options or ServeOptions()
    metrics = _Metrics()
    served: dict[str, _Served] = {}
    for model in models:
        if model.name in served:
            raise ToolkitError(f"two bundles are both named {model.name!r}; serve them from separate servers or rename one.")
        served[model.name] = _Served(model, options, metrics)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: Any):
        for s in served.values():
            s.batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for s in served.values():  # uvicorn has drained the connections; finish what was queued
                await s.batcher.close()

    def find(request: Request) -> _Served:
        name = request.path_params["model"]
        if name not in served:
            raise _HTTPError(404, f"unknown model {name!r}; this server has {', '.join(served) or 'none'}.")
        version = request.path_params.get("version")
        if version not in (None, _VERSION):
            raise _HTTPError(404, f"model {name!r} has no version {version!r}; its only version is {_VERSION}.")
        return served[name]

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise _HTTPError(413, f"the body is {int(declared)} bytes; this server accepts at most {options.max_body_bytes}.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body_bytes:
                raise _HTTPError(413, f"the body exceeds {options.max_body_bytes} bytes, this server's limit.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def server_metadata(request: Request) -> Response:
        from toolkit import __version__

        return JSONResponse({"name": "toolkit", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(find(request).metadata())

    async def model_ready(request: Request) -> Response:
        find(request)
        return JSONResponse({"name": request.path_params["model"], "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def configuration(request: Request) -> Response:
        return JSONResponse(find(request).config(options))

    async def infer(request: Request) -> Response:
        s = find(request)
        if not state["ready"]:
            raise _HTTPError(503, "the server is not ready.")
        body = await body_of(request)
        try:
            parsed = decode_request(body, request.headers.get(HEADER_LENGTH), s.model.inputs, s.model.outputs)
            feeds = s.model.validate(parsed.inputs)
        except (ProtocolError, ToolkitError) as exc:
            raise _HTTPError(400, str(exc)) from None
        timeout_us = parsed.parameters.get("timeout")
        wait = timeout_us / 1e6 if isinstance(timeout_us, (int, float)) and timeout_us > 0 else (
            options.timeout_ms / 1000 if options.timeout_ms else None)
        metrics.queue_depth.labels(s.name).set(s.batcher.depth + 1)
        try:
            results = await s.batcher.submit(feeds, deadline=None if wait is None else time.monotonic() + wait)
        except (Overloaded, DeadlinePassed) as exc:
            raise _HTTPError(503, str(exc)) from None
        except ToolkitError as exc:
            raise _HTTPError(500, str(exc)) from None
        finally:
            metrics.queue_depth.labels(s.name).set(s.batcher.depth)
        if parsed.outputs is not None:
            results = {name: results[name] for name in parsed.outputs}
        content, header_length = encode_response(s.name, parsed, results)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    def generation_request(s: _Served, body: bytes) -> tuple[str, dict[str, Any]]:
        if s.generator is None:
            raise _HTTPError(400, f"model {s.name!r} is not a decoder with a KV cache; generate needs one (the reference gpt is).")
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HTTPError(400, f"the request is not valid JSON: {exc}.") from None
        if not isinstance(request, dict) or not isinstance(request.get("text_input"), str):
            raise _HTTPError(400, 'the request must be a JSON object with a "text_input" string.')
        from toolkit.generate import Sampling

        p = {**request.get("parameters", {}), **{k: v for k, v in request.items() if k not in ("text_input", "parameters")}}
        known = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream"}
        if unknown := sorted(set(p) - known):
            raise _HTTPError(400, f"unknown generation parameter {unknown[0]!r}; known: {', '.join(sorted(known))}.")
        stop = p.get("stop", [])
        try:
            sampling = Sampling(temperature=float(p.get("temperature", 0.0)), top_k=p.get("top_k"), top_p=p.get("top_p"), seed=p.get("seed"))
        except (ToolkitError, TypeError, ValueError) as exc:
            raise _HTTPError(400, str(exc)) from None
        return request["text_input"], {"max_new_tokens": int(p.get("max_tokens", 64)), "stop": [stop] if isinstance(stop, str) else list(stop), "sampling": sampling}

    async def generate(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        s = find(request)
        prompt, arguments = generation_request(s, await body_of(request))
        try:
            text = await run_in_threadpool(s.generator.generate, prompt, **arguments)
        except ToolkitError as exc:
            raise _HTTPError(400, str(exc)) from None
        return JSONResponse({"model_name": s.name, "model_version": _VERSION, "text_output": text})

    async def generate_stream(request: Request) -> Response:
        s = find(request)
        prompt, arguments = generation_request(s, await body_of(request))
        try:
            pieces = s.generator.stream(prompt, **arguments)  # validates now, so bad input is a 400, not a broken stream
        except ToolkitError as exc:
            raise _HTTPError(400, str(exc)) from None

        def events() -> Iterator[str]:
            try:
                for piece in pieces:
                    yield f"data: {json.dumps({'model_name': s.name, 'model_version': _VERSION, 'text_output': piece})}\n\n"
            except ToolkitError as exc:
                yield f"data: {json.dumps({'error': str(exc)})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/metrics", prometheus),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata), Route(prefix + "/ready", model_ready), Route(prefix + "/config", configuration),
            Route(prefix + "/infer", infer, methods=["POST"]), Route(prefix + "/generate", generate, methods=["POST"]),
            Route(prefix + "/generate_stream", generate_stream, methods=["POST"]),
        ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        _HTTPError: lambda request, exc: JSONResponse({"error": str(exc)}, status_code=exc.status),
        404: lambda request, exc: JSONResponse({"error": f"no route {request.url.path}"}, status_code=404),
        405: lambda request, exc: JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405),
        Exception: lambda request, exc: JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500),
    })
    return _Observed(app, options.token, metrics)


class _Observed:
    """ASGI middleware: the bearer token (every route but health), metrics and the access log."""

    def __init__(self, app: Any, token: str | None, metrics: _Metrics):
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        start = time.perf_counter()
        status = {"code": 500}

        async def observe(message: Mapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.token is not None and not path.startswith("/v2/health/") and not self._authorized(scope):
            body = json.dumps({"error": "missing or wrong bearer token (send `Authorization: Bearer <token>`)."}).encode()
            await observe({"type": "http.response.start", "status": 401,
                           "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
        else:
            await self.app(scope, receive, observe)
        elapsed = time.perf_counter() - start
        parts = path.split("/")
        model = parts[3] if len(parts) > 3 and parts[1:3] == ["v2", "models"] else ""
        route = parts[-1] if model and parts[-1] in ("infer", "generate", "generate_stream", "ready", "config") else "other"
        if model:
            self.metrics.requests.labels(model, route, str(status["code"])).inc()
            self.metrics.latency.labels(model, route).observe(elapsed)
        client = scope.get("client") or ("", 0)
        _access.info(json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), "method": scope["method"], "path": path, "status": status["code"],
                                 "ms": round(elapsed * 1000, 3), "model": model, "client": client[0]}))

    def _authorized(self, scope: Mapping[str, Any]) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode())


def serve(models: Sequence[Model], *, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          log_level: str = "info") -> None:
    """Serves until interrupted; on SIGINT/SIGTERM stops accepting and finishes requests in flight."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(create_app(models, options), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30)
    uvicorn.Server(config).run()
