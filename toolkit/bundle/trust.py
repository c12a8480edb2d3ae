"""Trust that remembers: the bundles whose source this user vouched for (`toolkit trust DIR`, or by
making them: export, build, prune), kept in a per-user file. A bundle is trusted while it is at the
same place and names the same source, whose code is unchanged: the manifest's `source` section
and the sha256 of the code it names (a factory's module file, found without importing anything; a
Hugging Face directory's config.json and Python files). Anything else is untrusted again.

The file: $TOOLKIT_TRUST_FILE, else $XDG_CONFIG_HOME/toolkit/trusted.json (~/.config/...), written
atomically under a lock, readable by its owner only."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from toolkit.bundle.manifest import Source
from toolkit.errors import ToolkitError

__all__ = ["TRUST_FILE_ENV", "forget", "remember", "trust_file", "trusted", "trusted_bundles"]

TRUST_FILE_ENV = "TOOLKIT_TRUST_FILE"


def trust_file() -> Path:
    if os.environ.get(TRUST_FILE_ENV):
        return Path(os.environ[TRUST_FILE_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "toolkit" / "trusted.json"


def trusted(bundle: Any) -> bool:
    """Whether this user vouched for `bundle` (a `Bundle`) as it is now."""
    entry = trusted_bundles().get(str(Path(bundle.path).resolve()))
    return entry is not None and entry == _fingerprint(bundle.manifest.source)


def remember(bundle: Any) -> None:
    """Records `bundle` (and its parts) as trusted, as it is now (a zoo model's needs no record: its
    code is toolkit's own)."""
    records = {str(Path(b.path).resolve()): _fingerprint(b.manifest.source) for b in [bundle, *bundle.parts()]
               if b.manifest.source.kind != "zoo"}
    if records:
        _update(lambda entries: entries.update(records))


def forget(path: str | os.PathLike[str]) -> bool:
    """Withdraws trust from the bundle at `path` and its parts; whether it was trusted."""
    root = str(Path(path).resolve())
    found: list[str] = []

    def drop(entries: dict[str, Any]) -> None:
        found.extend(k for k in list(entries) if k == root or k.startswith(root + os.sep))
        for key in found:
            del entries[key]

    _update(drop)
    return bool(found)


def trusted_bundles() -> dict[str, Any]:
    """{bundle directory: what was vouched for}."""
    path = trust_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"the trust file {path} cannot be read ({exc}); fix or delete it (toolkit trust records it again).") from None
    return data.get("bundles", {}) if isinstance(data, dict) else {}


def _update(change: Any) -> None:
    from filelock import FileLock

    path = trust_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        entries = trusted_bundles()
        change(entries)
        staged = path.with_name(path.name + ".tmp")
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            json.dump({"bundles": entries}, out, indent=1, sort_keys=True)
        os.replace(staged, path)


def _fingerprint(source: Source) -> dict[str, Any]:
    return {"source": source.to_json(), "code_sha256": _code_sha256(source)}


def _code_sha256(source: Source) -> str | None:
    """sha256 of the code `source` names, or None where it names none (a zoo model: toolkit's own)."""
    if source.kind == "factory":
        files = [_module_file(source.ref.partition(":")[0])]
    elif source.kind == "hf":
        directory = Path(source.path)
        files = sorted([directory / "config.json", *directory.glob("*.py")])
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file).encode() + b"\0")
        digest.update(file.read_bytes() if file is not None and file.is_file() else b"(missing)")
    return digest.hexdigest()


def _module_file(module: str) -> Path | None:
    """The file `module` (dotted) would be imported from, found on sys.path without importing it."""
    parts = module.split(".")
    for entry in sys.path:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate.resolve()
    return None
