"""Scoped API keys: who may do what on `toolkit serve`.

A keys file (JSON, `toolkit keys add FILE ...`) lists each key's name, the sha256 of its secret and
its scopes; the secrets themselves are shown once when made and stored nowhere. Secrets are 32 random
bytes, so one SHA-256 is the right hash (slow password hashes are for secrets people choose); a
presented key is hashed and compared with every entry in constant time.

Scopes: `infer:MODEL`, `generate:MODEL`, `explain:MODEL` (MODEL a served name or `*`), `metrics`
(/metrics) and `admin` (the model repository: index, load, unload). A key that may act on a model
may also read its metadata, readiness and configuration. `--token` is one key with every scope.

The guard (`KeyGuard`) answers 401 to a missing or unknown key and 403 to a known key outside its
scopes, before the body is read, for every route whose model is in its path; the OpenAI routes name
their model in the body, so they ask `Grants.require` once they have read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.serve.metrics import route_path
from toolkit.serve.protocol import error_body

__all__ = ["ACTIONS", "Forbidden", "Grants", "Key", "KeyGuard", "Keys", "add_key", "read_keys", "revoke_key"]

ACTIONS = ("infer", "generate", "explain")
_SCOPE = re.compile(r"(?:(infer|generate|explain):([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|\*)|metrics|admin)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_OPEN_PREFIX = "/v2/health/"
_SECRET_PREFIX = "tk_"
_log = logging.getLogger("toolkit.serve")


class Forbidden(ToolkitError):
    """A known key asked for what its scopes do not allow (403)."""


@dataclass(frozen=True)
class Key:
    name: str
    sha256: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Grants:
    """What one authenticated key may do."""

    name: str
    scopes: tuple[str, ...]

    def allows(self, action: str, model: str | None = None) -> bool:
        """Whether the key may `action` ("infer", "generate", "explain", "metrics", "admin", or "see":
        any of the first three) on `model`."""
        if action in ("metrics", "admin"):
            return action in self.scopes
        actions = ACTIONS if action == "see" else (action,)
        return any(f"{a}:{m}" in self.scopes for a in actions for m in (model, "*"))

    def require(self, action: str, model: str | None = None) -> None:
        if not self.allows(action, model):
            what = {"see": "use", "metrics": "read the metrics", "admin": "administer the model repository"}.get(action, action)
            on = f" model {model!r}" if model and action not in ("metrics", "admin") else ""
            raise Forbidden(f"key {self.name!r} may not {what}{on}; its scopes: {', '.join(self.scopes)}.")


ALL = Grants("token", tuple(f"{a}:*" for a in ACTIONS) + ("metrics", "admin"))


class Keys:
    """The keys a server accepts: from a keys file (read again by `reload`, on SIGHUP) or one token."""

    def __init__(self, keys: Sequence[Key], path: Path | None = None):
        self._by_hash = {k.sha256: Grants(k.name, k.scopes) for k in keys}
        self.path = path
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def refresh(self) -> None:
        """Reloads the keys file if it changed (looked at once a second at most): a server whose
        process cannot be sent SIGHUP (a Ray Serve ingress replica) picks up added and revoked keys."""
        if self.path is None or time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat() if self.path else None
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ino) if info else None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keys:
        return cls(read_keys(path), Path(path))

    @classmethod
    def token(cls, token: str) -> Keys:
        return cls([Key(ALL.name, _hash(token), ALL.scopes)])

    def reload(self) -> None:
        """Reads the keys file again; a file that no longer reads keeps the keys as they were (and says why)."""
        if self.path is None:
            return
        try:
            keys = read_keys(self.path)
        except ToolkitError as exc:
            _log.error("keys file not reloaded, the keys in use stay: %s", exc)
            return
        self._by_hash = {k.sha256: Grants(k.name, k.scopes) for k in keys}  # one assignment: requests see old or new
        _log.info("reloaded %d keys from %s", len(keys), self.path)

    def grants(self, presented: bytes) -> Grants | None:
        """The grants of the key presented (`Authorization: Bearer <secret>`), or None."""
        digest = _hash(presented)
        found = None
        for known, grants in self._by_hash.items():  # every entry compared, match or not: no timing to learn from
            if secrets.compare_digest(known, digest):
                found = grants
        return found


def needs(path: str) -> tuple[str, str | None] | None:
    """(action, model) that a request for `path` needs before its body is read; None where any
    known key will do (server metadata, the OpenAI routes, which check their model themselves)."""
    parts = path.split("/")
    if path == "/metrics":
        return "metrics", None
    if parts[1:3] == ["v2", "repository"]:
        return "admin", None
    if parts[1:3] == ["v2", "models"] and len(parts) > 3:
        model, rest = parts[3], parts[4:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        last = rest[-1] if rest else ""
        action = {"infer": "infer", "generate": "generate", "generate_stream": "generate", "explain": "explain"}.get(last, "see")
        return action, model
    if parts[1:3] == ["v1", "models"] and len(parts) > 3:
        return "see", parts[3]
    return None


class KeyGuard:
    """A guard for `toolkit.serve.metrics.Observed`: 401 or 403 answered here, or the request goes on
    with its key's grants in `scope["state"]["grants"]`."""

    def __init__(self, keys: Keys):
        self.keys = keys

    async def __call__(self, scope: Mapping[str, Any], send: Callable[[Mapping[str, Any]], Awaitable[None]]) -> bool:
        path = route_path(scope)
        if path.startswith(_OPEN_PREFIX):
            return True
        self.keys.refresh()
        headers = dict(scope.get("headers") or [])
        scheme, _, presented = headers.get(b"authorization", b"").partition(b" ")
        grants = self.keys.grants(presented) if scheme.lower() == b"bearer" else None
        if grants is None:
            await _refuse(send, path, 401, "missing or unknown API key (send `Authorization: Bearer <key>`).")
            return False
        scope["state"]["grants"] = grants
        need = needs(path)
        try:
            if need is not None:
                grants.require(*need)
        except Forbidden as exc:
            await _refuse(send, path, 403, str(exc))
            return False
        return True


async def _refuse(send: Callable[[Mapping[str, Any]], Awaitable[None]], path: str, status: int, message: str) -> None:
    body = json.dumps(error_body(path, status, message)).encode()
    headers = [(b"content-type", b"application/json")] + ([(b"www-authenticate", b"Bearer")] if status == 401 else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the keys file -------------------------------------------------------------------------------------


def read_keys(path: str | os.PathLike[str]) -> list[Key]:
    """The keys in the file at `path`, each checked; a ToolkitError naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ToolkitError(f"keys file {path} does not exist; make one with `toolkit keys add {path} --name NAME --scope SCOPE`.") from None
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"keys file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ToolkitError(f"keys file {path} must be an object with a list \"keys\".")
    keys, names = [], set()
    for i, entry in enumerate(data["keys"]):
        where = f"keys file {path}, key {i}"
        if not isinstance(entry, dict) or set(entry) != {"name", "sha256", "scopes"}:
            raise ToolkitError(f"{where}: must hold exactly name, sha256 and scopes.")
        name, digest, scopes = entry["name"], entry["sha256"], entry["scopes"]
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in names:
            raise ToolkitError(f"{where}: name {name!r} must be unique, letters, digits and _.@- only.")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ToolkitError(f"{where} ({name}): sha256 must be 64 lowercase hex digits (the hash of the secret, never the secret).")
        keys.append(Key(name, digest, _checked_scopes(scopes, where)))
        names.add(name)
    return keys


def add_key(path: str | os.PathLike[str], name: str, scopes: Sequence[str]) -> str:
    """Adds a key named `name` with `scopes` to the keys file (made if missing); → its secret, which
    is stored nowhere."""
    path = Path(path)
    keys = read_keys(path) if path.exists() else []
    if any(k.name == name for k in keys):
        raise ToolkitError(f"keys file {path} already has a key named {name!r}; revoke it first or choose another name.")
    if not _NAME.fullmatch(name):
        raise ToolkitError(f"key name {name!r}: letters, digits and _.@- only, at most 64.")
    secret = _SECRET_PREFIX + secrets.token_urlsafe(32)
    _write(path, [*keys, Key(name, _hash(secret), _checked_scopes(list(scopes), f"key {name!r}"))])
    return secret


def revoke_key(path: str | os.PathLike[str], name: str) -> None:
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise ToolkitError(f"keys file {path} has no key named {name!r}; it has: {', '.join(k.name for k in keys) or 'none'}.")
    _write(Path(path), [k for k in keys if k.name != name])


def _write(path: Path, keys: Sequence[Key]) -> None:
    from toolkit.bundle import write_atomic

    data = {"keys": [{"name": k.name, "sha256": k.sha256, "scopes": list(k.scopes)} for k in keys]}
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    os.chmod(path, 0o600)


def _checked_scopes(scopes: Any, where: str) -> tuple[str, ...]:
    if not isinstance(scopes, list) or not scopes:
        raise ToolkitError(f"{where}: scopes must be a non-empty list.")
    for scope in scopes:
        if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
            raise ToolkitError(f"{where}: scope {scope!r} is none of infer:MODEL, generate:MODEL, explain:MODEL (MODEL a name or *), "
                               "metrics, admin.")
    return tuple(scopes)


def _hash(secret: str | bytes) -> str:
    """The sha256 of a secret as it travels in the header (a `--token` given as text: its UTF-8)."""
    return hashlib.sha256(secret if isinstance(secret, bytes) else secret.encode("utf-8", "surrogateescape")).hexdigest()
