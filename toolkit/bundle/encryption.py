"""Encrypted bundles: every file but the manifest sealed with AES-256-GCM under one random data key,
which the manifest's `encryption` section holds wrapped for each recipient (envelope.py).

A sealed file is `MAGIC`, a random 7-byte nonce prefix, then the plaintext in chunks of
`CHUNK_BYTES`, each encrypted and authenticated on its own (the STREAM construction of age and
Tink): a chunk's nonce is the prefix, its index and whether it is the last, and every chunk is bound
to the file's name in its bundle, so chunks cannot be reordered, dropped, cut short or moved to
another file without the tag failing. Files are sealed and opened a chunk at a time: neither side
ever holds a file twice.

The manifest stays readable (names, shapes, parity evidence: what an operator needs to deploy a
model without its key) and its sha256 records are the plaintext's, checked as each file is opened;
the `encryption` section also records each sealed file's own sha256, so `toolkit sign` and `verify`
work on a sealed bundle without its key. Opening a sealed bundle (`Bundle.open(..., key=KEY)`)
decrypts into memory only; `seal_bundle` moves every graph's weights into its external-data file
first, so that onnxruntime takes them from memory (`add_external_initializers_from_files_in_memory`)
and the graph itself is small.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle.envelope import UnlockKey, new_data_key, unwrap, wrap_for
from toolkit.bundle.manifest import Manifest
from toolkit.errors import ToolkitError

__all__ = ["CHUNK_BYTES", "MAGIC", "SCHEME", "decrypt", "encrypt", "open_sealed", "seal_file", "sealed_files", "unwrap_data_key"]

SCHEME = "toolkit-seal-v1"
MAGIC = b"TKSEAL1\n"
CHUNK_BYTES = 1 << 20
_PREFIX = 7
_TAG = 16
_HEADER = len(MAGIC) + _PREFIX
_INDEX = struct.Struct(">I")


def sealed_files(manifest: Manifest) -> list[str]:
    """The files of a bundle that sealing encrypts: all it lists but the manifest."""
    files = [name for v in manifest.variants.values() for name in (v.file, *(e["file"] for e in v.external_data))]
    files += list(manifest.assets)
    return files + ([manifest.source.pruned] if manifest.source.pruned else [])


def seal_file(source: Path, target: Path, data_key: bytes, label: str) -> None:
    """Encrypts `source` into `target`, a chunk at a time; `label` (the file's name in its bundle)
    is authenticated with every chunk."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, prefix = AESGCM(data_key), os.urandom(_PREFIX)
    aad = label.encode()
    size = source.stat().st_size
    chunks = max(1, -(-size // CHUNK_BYTES))
    with source.open("rb") as plain, target.open("wb") as sealed:
        sealed.write(MAGIC + prefix)
        for index in range(chunks):
            sealed.write(aead.encrypt(_nonce(prefix, index, index == chunks - 1), plain.read(CHUNK_BYTES), aad))
        if plain.read(1):
            raise ToolkitError(f"{source} grew while it was being sealed; seal it again once nothing writes it.")


def open_sealed(path: Path, data_key: bytes, label: str, sha256: str, where: str) -> np.ndarray:
    """The plaintext of the sealed file at `path`, in one buffer of its own (uint8), checked against
    its tags and against `sha256`; a ToolkitError naming the file when either fails."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise ToolkitError(f"{where}: {path.name} is missing.")
    body = size - _HEADER
    chunks = -(-body // (CHUNK_BYTES + _TAG)) if body > 0 else 0
    if chunks == 0 or body - (chunks - 1) * (CHUNK_BYTES + _TAG) < _TAG:  # a cut at a chunk's end fails the last chunk's tag
        raise ToolkitError(f"{where}: {path.name} is truncated ({size:,} bytes is no sealed file's length); copy it again.")
    aead, aad = AESGCM(data_key), label.encode()
    plaintext = np.empty(body - chunks * _TAG, dtype=np.uint8)
    view = memoryview(plaintext)
    digest = hashlib.sha256()
    with path.open("rb") as sealed:
        head = sealed.read(_HEADER)
        if head[: len(MAGIC)] != MAGIC:
            raise ToolkitError(f"{where}: {path.name} is not a sealed file (it does not start as one); the bundle was altered.")
        prefix = head[len(MAGIC):]
        offset = 0
        for index in range(chunks):
            chunk = sealed.read(CHUNK_BYTES + _TAG)
            out = view[offset: offset + len(chunk) - _TAG]
            try:
                aead.decrypt_into(_nonce(prefix, index, index == chunks - 1), chunk, aad, out)
            except InvalidTag:
                raise ToolkitError(f"{where}: {path.name} fails its authentication at byte {_HEADER + index * (CHUNK_BYTES + _TAG):,}: "
                                   "it was modified, cut short or moved from another file after it was sealed.") from None
            except ValueError:  # a chunk longer or shorter than the size read at first allows: the file is being written
                raise ToolkitError(f"{where}: {path.name} changed while it was being read; open the bundle again once nothing writes it.") from None
            digest.update(out)
            offset += len(out)
    if digest.hexdigest() != sha256:
        raise ToolkitError(f"{where}: {path.name} decrypts, but not to the file the manifest records (sha256 "
                           f"{sha256[:12]}…, got {digest.hexdigest()[:12]}…); the manifest or the file was replaced.")
    return plaintext


def unwrap_data_key(manifest: Manifest, key: UnlockKey, where: str) -> bytes:
    return unwrap(manifest.encryption["recipients"], key, where)


def encrypt(path: str | os.PathLike[str], *, recipients: list[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None,
            force: bool = False, progress: Any = None) -> Path:
    """Seals the bundle at `path` for `recipients` (public keys or key files): into `out`, or in its
    place. The bundle's files are verified first; its signature, which covered the plaintext, is not
    carried over (sign the sealed bundle: `toolkit sign` works without the key). → the sealed bundle."""
    from toolkit.bundle.store import Bundle, staged_directory

    bundle = Bundle.open(path)
    if bundle.sealed:
        raise ToolkitError(f"bundle {path} is already encrypted.")
    if not recipients:
        raise ToolkitError("give at least one --recipient (an X25519 or RSA public key, or a key file) to seal the bundle for.")
    data_key = new_data_key()
    wrapped = [wrap_for(r, data_key) for r in recipients]
    target = Path(out) if out is not None else bundle.path
    with bundle.lock(), staged_directory(target, overwrite=out is None or force) as staging:
        _seal(bundle, staging, data_key, wrapped, progress or (lambda _m: None))
    return target


def decrypt(path: str | os.PathLike[str], *, key: UnlockKey | str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
            force: bool = False, progress: Any = None) -> Path:
    """Writes the sealed bundle at `path`, opened with `key`, decrypted into `out` (or in its place):
    every file authenticated and checked against its sha256 before the bundle is in place."""
    from toolkit.bundle.store import Bundle, staged_directory

    bundle = Bundle.open(path, key=key)
    if not bundle.sealed:
        raise ToolkitError(f"bundle {path} is not encrypted.")
    target = Path(out) if out is not None else bundle.path
    with bundle.lock(), staged_directory(target, overwrite=out is None or force) as staging:
        _unseal(bundle, staging, progress or (lambda _m: None))
    return target


def _seal(bundle: Any, directory: Path, data_key: bytes, wrapped: list[dict[str, Any]], progress: Any) -> None:
    from toolkit.bundle.store import sha256_file

    manifest = Manifest.from_json(bundle.manifest.to_json())
    sources: dict[str, Path] = {}
    for name, variant in manifest.variants.items():
        graph = bundle.variant_path(name)  # verified
        if not variant.external_data:
            _weights_beside(graph, directory / variant.file, variant)  # sealed in place below
            sources |= {file: directory / file for file in (variant.file, *(e["file"] for e in variant.external_data))}
        else:
            sources |= {file: bundle.path / file for file in (variant.file, *(e["file"] for e in variant.external_data))}
    sources |= {name: bundle.asset_path(name) for name in manifest.assets}
    if manifest.source.pruned:
        sources[manifest.source.pruned] = bundle.path / manifest.source.pruned
    records = {}
    for file, source in sources.items():
        progress(f"sealing {bundle.path.name}/{file}")
        sealing = directory / f".{file}.tmp"
        seal_file(source, sealing, data_key, f"{manifest.name}/{file}")
        os.replace(sealing, directory / file)
        records[file] = {"sha256": sha256_file(directory / file), "bytes": (directory / file).stat().st_size}
    manifest.encryption = {"scheme": SCHEME, "cipher": "AES-256-GCM", "chunk_bytes": CHUNK_BYTES, "recipients": wrapped, "files": records}
    _write_manifest(directory, manifest)
    for part in bundle.parts():
        (directory / part.path.name).mkdir()
        _seal(part, directory / part.path.name, data_key, wrapped, progress)


def _unseal(bundle: Any, directory: Path, progress: Any) -> None:
    manifest = Manifest.from_json(bundle.manifest.to_json())
    for file in sealed_files(manifest):
        progress(f"decrypting {bundle.path.name}/{file}")
        bundle.read(file).tofile(directory / file)
    manifest.encryption = None
    _write_manifest(directory, manifest)
    for part in bundle.parts():
        (directory / part.path.name).mkdir()
        _unseal(part, directory / part.path.name, progress)


def _weights_beside(source: Path, target: Path, variant: Any) -> None:
    """Writes the graph at `source` to `target` with its weights in an external-data file beside it,
    recording both in `variant`: onnxruntime then takes the weights from memory as they are, and
    parses a small graph (a graph holding its weights would be in memory three times while it loads:
    decrypted, parsed, and the session's own)."""
    import onnx

    from toolkit._onnx import save_model
    from toolkit.bundle.store import sha256_file

    written = [f for f in save_model(onnx.load(str(source)), target, external=True) if (target.parent / f).is_file()]
    variant.sha256 = sha256_file(target)
    variant.external_data = [{"file": f, "sha256": sha256_file(target.parent / f), "bytes": (target.parent / f).stat().st_size}
                             for f in written]
    variant.bytes = target.stat().st_size + sum(e["bytes"] for e in variant.external_data)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    import json

    from toolkit.bundle.manifest import MANIFEST_NAME

    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + _INDEX.pack(index) + (b"\x01" if last else b"\x00")

