"""The bearer token: every route but the health probes needs `Authorization: Bearer <token>`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from toolkit.serve.metrics import route_path
from toolkit.serve.protocol import error_body

__all__ = ["BearerToken"]

_OPEN_PREFIX = "/v2/health/"


class BearerToken:
    """A guard for `toolkit.serve.metrics.Observed`: answers 401 itself, or lets the request through."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Mapping[str, Any], send: Callable[[Mapping[str, Any]], Awaitable[None]]) -> bool:
        if route_path(scope).startswith(_OPEN_PREFIX) or self.authorized(scope):
            return True
        message = "missing or wrong bearer token (send `Authorization: Bearer <token>`)."
        body = json.dumps(error_body(route_path(scope), 401, message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
        return False

    def authorized(self, scope: Mapping[str, Any]) -> bool:
        headers = dict(scope.get("headers") or [])
        return secrets.compare_digest(headers.get(b"authorization", b""), self._expected)
