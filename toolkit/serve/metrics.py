"""Prometheus metrics of one server (a registry per app: two servers in one process do not share
counts) and the ASGI middleware that records them with a JSON access log.

Two sets side by side: Triton's own counters under Triton's names (`nv_inference_*`, cumulative
microseconds), so that dashboards made for Triton work unchanged, and toolkit's histograms
(`toolkit_*`: latency, batch sizes, queue depth). Label sets are bounded: a model label is a model
this server serves, or `_unknown` (a 404, a probe for names), never a raw URL segment.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["UNKNOWN_MODEL", "Metrics", "Observed", "route_path"]

_access = logging.getLogger("toolkit.access")
_payloads = logging.getLogger("toolkit.payloads")  # only with --log-payloads
_PAYLOAD_BYTES = 64 << 10
_MODEL_ROUTES = ("infer", "explain", "generate", "generate_stream", "ready", "config", "load", "unload")
_INFERENCE_ROUTES = ("infer", "generate", "generate_stream")
UNKNOWN_MODEL = "_unknown"
# Triton's inference counters: name → help (Triton's words).
_TRITON = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds (includes cached requests)",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds (includes cached requests)",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds (does not include cached requests)",
}
_VERSION = "1"


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("toolkit_requests", "Requests answered, by model, route and status.",
                                ["model", "route", "status"], registry=self.registry)
        self.latency = Histogram("toolkit_request_latency_seconds", "Time from request to response, by model and route.",
                                 ["model", "route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        self.batch_size = Histogram("toolkit_batch_size", "Rows per inference run, after dynamic batching.", ["model"],
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("toolkit_queue_depth", "Requests waiting for a batch.", ["model"], registry=self.registry)
        self.rejected = Counter("toolkit_rejected", "Requests refused before any work, by reason (admission, readiness).",
                                ["reason"], registry=self.registry)
        self._triton: dict[str, dict[str, float]] = {name: defaultdict(float) for name in _TRITON}
        # Generation, under vLLM's names (label model_name), so that its dashboards work unchanged.
        latency = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time from a generate request's arrival to its first token.",
                                             ["model_name"], registry=self.registry, buckets=latency)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of one generation.",
                                             ["model_name"], registry=self.registry, buckets=latency)
        self.e2e_latency = Histogram("vllm:e2e_request_latency_seconds", "Time from a generate request's arrival to its last token.",
                                     ["model_name"], registry=self.registry, buckets=latency)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of the generations started.", ["model_name"], registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=self.registry)
        self.request_success = Counter("vllm:request_success", "Generations that ended, by why (stop, length).",
                                       ["model_name", "finished_reason"], registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "Generations in the running batch.", ["model_name"], registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Generations waiting for a cache slot.", ["model_name"], registry=self.registry)
        self.cache_usage = Gauge("vllm:kv_cache_usage_perc", "Share of the cache slots in use (1 = all).", ["model_name"],
                                 registry=self.registry)

    def add_model(self, model: str) -> None:
        """Every per-model series at zero from the moment `model` is served, as Triton exposes them: a
        dashboard's rate() has a start, and a scrape before the first request sees the model."""
        self.batch_size.labels(model)
        self.queue_depth.labels(model).set(0)
        for counts in self._triton.values():
            counts[model] += 0

    def batch_run(self, model: str, rows: int) -> None:
        """One execution of `rows` rows (after dynamic batching)."""
        self.batch_size.labels(model).observe(rows)
        self._triton["nv_inference_count"][model] += rows
        self._triton["nv_inference_exec_count"][model] += 1

    def request_run(self, model: str, queued_s: list[float], compute_s: float) -> None:
        """The requests of one batch: each one's time in the queue, and the batch's compute time."""
        self._triton["nv_inference_queue_duration_us"][model] += sum(queued_s) * 1e6
        self._triton["nv_inference_compute_infer_duration_us"][model] += compute_s * 1e6 * len(queued_s)

    def inference_request(self, model: str, ok: bool, seconds: float) -> None:
        self._triton["nv_inference_request_success" if ok else "nv_inference_request_failure"][model] += 1
        self._triton["nv_inference_request_duration_us"][model] += seconds * 1e6

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        lines = []
        for name, help_text in _TRITON.items():  # written here: prometheus_client would name a counter <name>_total
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{model="{model}",version="{_VERSION}"}} {value:.17g}' for model, value in sorted(self._triton[name].items())]
        return generate_latest(self.registry) + ("\n".join(lines) + "\n").encode(), CONTENT_TYPE_LATEST


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path within the app: without the prefix it is mounted under (ASGI's root_path,
    e.g. a Ray Serve route prefix), which the ASGI spec leaves in `path`."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class Observed:
    """ASGI middleware: a request id (the `x-request-id` header, echoed in errors and the log),
    `guard` (the API keys), then per-model request counts and latency, and one JSON access-log line
    per request: model, status, bytes in and out, latency, the key's name; never a body, a prompt or
    generated text. With `log_payloads` (debugging only) the bodies' first 64 KiB go to the
    `toolkit.payloads` log under the request id. `served()` names the models served (bounds the labels)."""

    def __init__(self, app: Any, metrics: Metrics, served: Callable[[], Collection[str]], guard: Any = None, *, log_payloads: bool = False):
        self.app, self.metrics, self.served, self.guard, self.log_payloads = app, metrics, served, guard, log_payloads

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        seen = {"status": 500, "in": 0, "out": 0}
        request_id = uuid.uuid4().hex[:16]
        scope = {**scope, "state": {**scope.get("state", {}), "request_id": request_id}}
        bodies: dict[str, list[bytes]] | None = {"request": [], "response": []} if self.log_payloads else None

        async def observe(message: Mapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
                _keep(bodies, "response", message.get("body", b""))
            await send(message)

        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
                _keep(bodies, "request", message.get("body", b""))
            return message

        try:
            if self.guard is None or await self.guard(scope, observe):
                await self.app(scope, counted, observe)
        finally:
            self._record(scope, seen, time.perf_counter() - start, request_id)
            if bodies is not None:
                for kind, chunks in bodies.items():
                    _payloads.info(json.dumps({"id": request_id, kind: b"".join(chunks)[:_PAYLOAD_BYTES].decode("utf-8", "replace")}))

    def _record(self, scope: Mapping[str, Any], seen: Mapping[str, int], elapsed: float, request_id: str) -> None:
        status = seen["status"]
        path = route_path(scope)
        parts = path.split("/")
        if parts[1:3] == ["v2", "models"] and len(parts) > 3:  # /v2/models/{m}/...
            named = parts[3]
        elif parts[1:4] == ["v2", "repository", "models"] and len(parts) > 4:  # /v2/repository/models/{m}/load
            named = parts[4]
        else:
            named = ""
        served = named in self.served()
        model = named if served else (UNKNOWN_MODEL if named else "")
        route = parts[-1] if model and parts[-1] in _MODEL_ROUTES else "other"
        if model:
            self.metrics.requests.labels(model, route, str(status)).inc()
            self.metrics.latency.labels(model, route).observe(elapsed)
        if served and route in _INFERENCE_ROUTES:
            self.metrics.inference_request(model, 200 <= status < 300, elapsed)
        client = scope.get("client") or ("", 0)
        _access.info(json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                                 "id": request_id, "method": scope["method"], "path": path[:200], "status": status,
                                 "ms": round(elapsed * 1000, 3), "model": model, "client": client[0], "bytes_in": seen["in"],
                                 "bytes_out": seen["out"], "key": getattr(scope["state"].get("grants"), "name", None)}))


def _keep(bodies: dict[str, list[bytes]] | None, kind: str, chunk: bytes) -> None:
    if bodies is not None and sum(map(len, bodies[kind])) < _PAYLOAD_BYTES:
        bodies[kind].append(chunk)
