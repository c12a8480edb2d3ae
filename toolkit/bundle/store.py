"""The bundle on disk: a directory with `manifest.json` and one ONNX file per variant; a model of several
graphs (an encoder-decoder) keeps each further graph as a bundle of its own in a subdirectory (a part).

The manifest is the single source of truth, and it is not trusted as written: opening a bundle
validates it and the directory (validate.py); loading a variant verifies the sha256 of every file
it reads. Every write is atomic (temp file, fsync, rename, fsync of the directory), so a crash or
Ctrl-C never leaves a bundle that looks valid but is not; writers hold the bundle's lock and merge
their change into the manifest as it is on disk then (`Bundle.update`), so concurrent stages all land.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from toolkit.bundle.envelope import UnlockKey
from toolkit.bundle.manifest import MANIFEST_NAME, Manifest, Variant
from toolkit.bundle.validate import LOCK_NAME, check_directory, external_data_refused, is_safe_name, validate_manifest
from toolkit.errors import ToolkitError

__all__ = ["Bundle", "Graph", "replace_directory", "sha256_file", "staged_directory", "write_atomic"]

# How long a writer waits for another one on the same bundle (a quantization can take minutes).
_LOCK_TIMEOUT_S = 3600.0


@dataclass
class Graph:
    """A variant's graph as onnxruntime takes it: its file, or (a sealed bundle) the graph's bytes and
    its external-data files' contents, decrypted in memory."""

    path: Path
    model: str | bytes
    external: dict[str, np.ndarray] = field(default_factory=dict)


class Bundle:
    """A bundle directory opened for reading and for adding or updating variants. A sealed bundle
    (`toolkit encrypt`) opened with its key reads its files decrypted, in memory only (`graph`,
    `read`); without it, only its manifest."""

    def __init__(self, path: Path, manifest: Manifest, *, trusted_source: bool = False, data_key: bytes | None = None):
        self.path = path
        self.manifest = manifest
        # Whether the user vouched for the code the manifest's source names (they named it themselves,
        # or passed --trust-source): only then may the PyTorch reference be rebuilt from it.
        self.trusted_source = trusted_source
        self._data_key = data_key

    def __getstate__(self) -> dict[str, Any]:
        # A bundle pickled to another process (a Ray replica, a worker) goes without its data key:
        # pickles land in object stores and spill files; the receiver opens the bundle with its key.
        return {**self.__dict__, "_data_key": None}

    @property
    def sealed(self) -> bool:
        return self.manifest.encryption is not None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, trust_source: bool = False, key: UnlockKey | str | os.PathLike[str] | None = None,
             data_key: bytes | None = None) -> Bundle:
        """The bundle at `path`, its manifest validated and its directory checked (parts included), or a
        ToolkitError naming what is wrong; `trust_source` vouches for the code its source names; `key`
        (a private key or key file) opens a sealed bundle's files."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if manifest_path.is_symlink():
            raise ToolkitError(f"bundle {path}: {MANIFEST_NAME} is a symbolic link; a bundle holds its files itself.")
        if not manifest_path.is_file():
            what = "does not exist" if not path.exists() else f"has no {MANIFEST_NAME}"
            raise ToolkitError(f"{path} is not a bundle: it {what}. Create one with `toolkit export MODEL -o {path}`.")
        with _reading(path):
            manifest = _read_manifest(manifest_path)
            check_directory(path, manifest)
        for part in manifest.parts:
            cls.open(path / part)
        key = UnlockKey.of(key)
        if manifest.encryption is not None and data_key is None and key is not None:
            from toolkit.bundle.encryption import unwrap_data_key

            data_key = unwrap_data_key(manifest, key, f"bundle {path}")
        return cls(path, manifest, trusted_source=trust_source, data_key=data_key if manifest.encryption is not None else None)

    @classmethod
    def of(cls, bundle: Bundle | str | os.PathLike[str], *, trust_source: bool = False,
           key: UnlockKey | str | os.PathLike[str] | None = None) -> Bundle:
        """`bundle` itself when it is one (trusted also when `trust_source`), else the bundle at that path."""
        if isinstance(bundle, Bundle):
            bundle.trusted_source |= trust_source
            return bundle
        return cls.open(bundle, trust_source=trust_source, key=key)

    def parts(self) -> list[Bundle]:
        """The bundles of this model's other graphs (see `ModelSpec.parts`), as trusted as this one."""
        return [self.part(part) for part in self.manifest.parts]

    def part(self, name: str) -> Bundle:
        """The bundle of this model's graph `name`, opened as this one is (trusted, unlocked)."""
        if name not in self.manifest.parts:
            raise ToolkitError(f"bundle {self.path} has no part {name!r}; its parts: {', '.join(self.manifest.parts) or 'none'}.")
        return Bundle.open(self.path / name, trust_source=self.trusted_source, data_key=self._data_key)

    def require_plain(self) -> None:
        """Refuses a sealed bundle, saying how to decrypt it: for what needs its files in the clear."""
        if self.sealed:
            raise ToolkitError(f"bundle {self.path} is encrypted; this command needs its graphs in the clear: `toolkit decrypt "
                               f"{self.path} -o DIR --key KEY` first (load, run, generate, serve, bench and package open it in memory, with --key).")

    def graph(self, name: str) -> Graph:
        """Variant `name`'s graph for onnxruntime: its verified file, or (sealed) its files decrypted in memory."""
        if not self.sealed:
            path = self.variant_path(name)
            return Graph(path, str(path))
        variant = self.variant(name)
        model = self.read(variant.file).tobytes()
        external = {e["file"]: self.read(e["file"]) for e in variant.external_data}
        refused = external_data_refused(model, list(external))
        if refused:
            raise ToolkitError(f"bundle {self.path}: variant {name!r} ({variant.file}) is refused: {refused}.")
        return Graph(self.path / variant.file, model, external)

    def read(self, file: str) -> np.ndarray:
        """A file the manifest lists, its contents verified (sealed: decrypted into memory and
        authenticated), as one uint8 buffer."""
        if not self.sealed:
            self.verify_file(file, self._recorded_sha256(file), file)
            return np.fromfile(self.path / file, dtype=np.uint8)
        if self._data_key is None:
            raise ToolkitError(f"bundle {self.path} is encrypted; give its key (--key KEY or TOOLKIT_BUNDLE_KEY; "
                               "toolkit.load(DIR, key=KEY)): the private key or key file it was sealed for.")
        from toolkit.bundle.encryption import open_sealed

        if file not in self.manifest.encryption["files"]:
            raise ToolkitError(f"bundle {self.path} lists no file {file!r}.")
        return open_sealed(self.path / file, self._data_key, f"{self.manifest.name}/{file}", self._recorded_sha256(file),
                           f"bundle {self.path}")

    def _recorded_sha256(self, file: str) -> str:
        m = self.manifest
        records = {e["file"]: e["sha256"] for v in m.variants.values() for e in [{"file": v.file, "sha256": v.sha256}, *v.external_data]}
        records |= {name: entry["sha256"] for name, entry in m.assets.items()}
        if m.source.pruned:
            records[m.source.pruned] = m.source.pruned_sha256
        if file not in records:
            raise ToolkitError(f"bundle {self.path} lists no file {file!r}.")
        return records[file]

    def verify_files(self) -> None:
        """Every file the manifest lists against its sha256 (sealed: the sealed file's own), parts included."""
        if self.sealed:
            for file, entry in self.manifest.encryption["files"].items():
                self.verify_file(file, entry["sha256"], "a sealed file")
        else:
            for name in self.manifest.variants:
                self.variant_path(name)
            for name in self.manifest.assets:
                self.asset_path(name)
        for part in self.parts():
            part.verify_files()

    def variant(self, name: str) -> Variant:
        try:
            return self.manifest.variants[name]
        except KeyError:
            known = ", ".join(self.manifest.variants) or "none"
            raise ToolkitError(f"bundle {self.path} has no variant {name!r}; its variants: {known}.") from None

    def variant_path(self, name: str, *, verify: bool = True) -> Path:
        """The ONNX file of a variant; with `verify`, refuses files whose sha256 does not match. A sealed
        bundle has no such file to give: what needs one refuses it, saying how to decrypt it."""
        variant = self.variant(name)
        self.require_plain()
        path = self.path / variant.file
        if verify:
            for entry in [{"file": variant.file, "sha256": variant.sha256}, *variant.external_data]:
                self.verify_file(entry["file"], entry["sha256"], f"variant {name!r}")
            refused = external_data_refused(path, [e["file"] for e in variant.external_data])
            if refused:
                raise ToolkitError(f"bundle {self.path}: variant {name!r} ({variant.file}) is refused: {refused}.")
        return path

    def asset_path(self, name: str) -> Path:
        """A file the bundle carries beside its graphs (a tokenizer), refused if its sha256 does not match."""
        entry = self.manifest.assets.get(name)
        if entry is None:
            raise ToolkitError(f"bundle {self.path} carries no {name}; re-export it with this toolkit.")
        self.require_plain()
        self.verify_file(name, entry["sha256"], f"asset {name!r}")
        return self.path / name

    def asset(self, name: str) -> bytes:
        """A file the bundle carries beside its graphs, verified (sealed: decrypted in memory)."""
        if name not in self.manifest.assets:
            raise ToolkitError(f"bundle {self.path} carries no {name}; re-export it with this toolkit.")
        return self.read(name).tobytes()

    def verify_file(self, file: str, sha256: str, what: str) -> None:
        """Refuses the listed `file` if it is missing, a link, or its sha256 is not `sha256`."""
        path = self.path / file
        if not path.is_file() or path.is_symlink():
            raise ToolkitError(f"bundle {self.path}: {what} is missing its file {file}.")
        actual = sha256_file(path)
        if actual != sha256:
            raise ToolkitError(
                f"bundle {self.path}: {file} ({what}) fails its sha256 check (manifest {sha256[:12]}…, file {actual[:12]}…): "
                "it was modified or corrupted after it was written. Re-create it."
            )

    def add_variant(self, name: str, model_file: Path, *, recipe: dict[str, Any], precision: str, io: dict[str, str] | None = None) -> Variant:
        """Moves `model_file` (with the external data it reads, if any) into the bundle as variant
        `name` (replacing one of that name) and records it in the manifest; each file lands under its
        final name only once complete and synced, the weights before the graph that reads them."""
        from toolkit._onnx import is_large

        if not is_safe_name(name):
            raise ToolkitError(f"variant name {name!r}: use letters, digits, '_', '.' and '-' only (it names files and URLs).")
        file = f"model.{name}.onnx"
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{file}.tmp-"))
        try:
            if is_large(model_file):
                import onnx

                from toolkit._onnx import save_model

                external = save_model(onnx.load(str(model_file)), staging / file)  # named after the variant's file
            else:
                shutil.copyfile(model_file, staging / file)
                external = []
            entries = [{"file": e, "sha256": sha256_file(staging / e), "bytes": (staging / e).stat().st_size} for e in external]
            variant = Variant(file=file, sha256=sha256_file(staging / file), recipe=recipe, precision=precision, io=io or {},
                              bytes=(staging / file).stat().st_size + sum(e["bytes"] for e in entries), external_data=entries)
            for written in [*external, file]:
                _fsync(staging / written)
            with self.lock():
                for written in [*external, file]:
                    os.replace(staging / written, self.path / written)
                if not external:  # a variant of that name that had its weights beside it
                    (self.path / f"{file}.data").unlink(missing_ok=True)
                _fsync(self.path)
                self._update_locked(lambda manifest: manifest.variants.__setitem__(name, variant))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return variant

    def lock(self) -> FileLock:
        """The bundle's writer lock (reentrant within a process): hold it to change the bundle."""
        return _lock(self.path)

    def update(self, change: Callable[[Manifest], Any]) -> Manifest:
        """Applies `change` to the manifest as it is on disk now and saves it, under the bundle's lock:
        what other processes recorded meanwhile (a variant, a parity result) is kept."""
        with self.lock():
            return self._update_locked(change)

    def _update_locked(self, change: Callable[[Manifest], Any]) -> Manifest:
        current = _read_manifest(self.path / MANIFEST_NAME)
        change(current)
        self.manifest = current
        self.save()
        return current

    def save(self) -> None:
        """Writes this manifest as it is, atomically: for a bundle being created, which no one else writes."""
        write_atomic(self.path / MANIFEST_NAME, (json.dumps(self.manifest.to_json(), indent=2) + "\n").encode())


def _read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ToolkitError(f"{path} is not a valid manifest: it is not JSON ({exc}).") from None
    return validate_manifest(data, str(path))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Holds the bundle's lock while its manifest and directory are read together, so that a writer's
    files never show up unlisted; a bundle this process may not write (read-only) has no writer."""
    try:
        lock = _lock(path)
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _lock(path: Path) -> FileLock:
    lock_file = path / LOCK_NAME
    # the lock file is opened for writing: a link planted under its name must not lead that write outside the bundle
    with contextlib.suppress(FileNotFoundError):
        info = lock_file.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise ToolkitError(f"bundle {path}: {LOCK_NAME} is a link or not a regular file; remove it (it holds no data).")
    # one instance per bundle in a process, so that a writer may re-enter it (open, then update)
    return FileLock(lock_file, timeout=_LOCK_TIMEOUT_S, is_singleton=True)


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries (a rename within it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_directory(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yields an empty staging directory beside `target`; on success it replaces `target`.

    On any failure, KeyboardInterrupt included, the staging directory is removed and `target` is
    left exactly as it was.
    """
    target = Path(target)
    if target.is_symlink():
        raise ToolkitError(f"{target} is a symbolic link; refusing to replace what it points to. Give the directory itself.")
    if target.exists() and not overwrite:
        raise ToolkitError(f"{target} already exists; pass --force to replace it.")
    if target.exists() and not (target / MANIFEST_NAME).is_file() and any(target.iterdir()):
        raise ToolkitError(f"{target} exists and is not a bundle; refusing to replace it. Choose another -o.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the complete directory `staging` in place of `target` (which may not exist) with no moment
    where `target` is missing: one atomic exchange where the system has it (Linux's renameat2), then
    the old contents are removed; synced to disk."""
    if target.is_symlink():
        raise ToolkitError(f"{target} is a symbolic link; refusing to replace what it points to. Give the directory itself.")
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(staging)
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging)  # now the old contents
    elif target.exists():  # no atomic exchange here: two renames, the old kept until the new is in place
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, retired / "bundle")
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync(target.parent)


_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    libc_name = ctypes.util.find_library("c")  # runs a subprocess: once per process
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
