"""Hugging Face hub ids (`hf:org/name[@revision]`): resolved to a snapshot through the Hugging Face
cache (huggingface_hub: downloaded where the network allows, read from the cache alone with
HF_HUB_OFFLINE=1), the commit it resolved to and its files' sha256 recorded in the manifest."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from toolkit.errors import ToolkitError

__all__ = ["HUB_ID", "hub_snapshot", "snapshot_files"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?")
# what a model needs to be rebuilt: its config, weights (safetensors), tokenizer and processor files, remote code
_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def hub_snapshot(spec: str) -> tuple[Path, str, str]:
    """(snapshot directory, repo id, commit) of `spec`, "org/name" or "org/name@revision" (a branch,
    tag or commit)."""
    if not HUB_ID.fullmatch(spec):
        raise ToolkitError(f"hf:{spec}: not a directory with a config.json, nor a hub id (org/name, or org/name@revision).")
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ToolkitError(f"hf:{spec}: hub ids need huggingface_hub (pip install 'toolkit[hf]').") from None
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    options = {"revision": revision or None, "cache_dir": cache, "local_files_only": constants.HF_HUB_OFFLINE}
    try:
        path = Path(snapshot_download(repo, allow_patterns=_FILES, **options))
        if not any(path.glob("*.safetensors")):  # weights only as PyTorch pickles: those too
            path = Path(snapshot_download(repo, allow_patterns=[*_FILES, "*.bin"], **options))
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ToolkitError(f"hf:{spec}: not in the Hugging Face cache ({cache}) and {where}; download it where "
                           f"the network allows (`hf download {repo}`), or give a directory (hf:PATH).") from None
    except HfHubHTTPError as exc:
        raise ToolkitError(f"hf:{spec}: the hub refused it: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"hf:{spec}: cannot resolve it through the Hugging Face cache: {exc}") from None
    if not (path / "config.json").is_file():
        raise ToolkitError(f"hf:{spec}: the snapshot {path} has no config.json: not a transformers model.")
    return path, repo, path.name


def snapshot_files(path: Path) -> dict[str, str]:
    """{file in the snapshot: its sha256}."""
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):  # noqa: B023 (read at once)
                digest.update(block)
        hashes[file.relative_to(path).as_posix()] = digest.hexdigest()
    return hashes
