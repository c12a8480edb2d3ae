"""Prometheus metrics of one server (a registry per app: two servers in one process do not share
counts) and the ASGI middleware that records them with a JSON access log."""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["Metrics", "Observed"]

_access = logging.getLogger("toolkit.access")
_MODEL_ROUTES = ("infer", "generate", "generate_stream", "ready", "config")


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

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Observed:
    """ASGI middleware: `guard` (e.g. the bearer token) first, then per-model request counts and
    latency, and one JSON access-log line per request."""

    def __init__(self, app: Any, metrics: Metrics, guard: Any = None):
        self.app, self.metrics, self.guard = app, metrics, guard

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def observe(message: Mapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.guard is None or await self.guard(scope, observe):
            await self.app(scope, receive, observe)
        self._record(scope, status["code"], time.perf_counter() - start)

    def _record(self, scope: Mapping[str, Any], status: int, elapsed: float) -> None:
        path = scope["path"]
        parts = path.split("/")
        model = parts[3] if len(parts) > 3 and parts[1:3] == ["v2", "models"] else ""
        route = parts[-1] if model and parts[-1] in _MODEL_ROUTES else "other"
        if model:
            self.metrics.requests.labels(model, route, str(status)).inc()
            self.metrics.latency.labels(model, route).observe(elapsed)
        client = scope.get("client") or ("", 0)
        _access.info(json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                                 "method": scope["method"], "path": path, "status": status, "ms": round(elapsed * 1000, 3),
                                 "model": model, "client": client[0]}))
