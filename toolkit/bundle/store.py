"""The bundle on disk: a directory with `manifest.json` and one ONNX file per variant; a model of several
graphs (an encoder-decoder) keeps each further graph as a bundle of its own in a subdirectory (a part).

The manifest is the single source of truth. Every write is atomic (temp file + rename), so a crash
or Ctrl-C never leaves a bundle that looks valid but is not; loading a variant verifies its sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, Variant
from toolkit.errors import ToolkitError

__all__ = ["Bundle", "sha256_file", "staged_directory", "write_atomic"]


class Bundle:
    """A bundle directory opened for reading and for adding or updating variants."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            what = "does not exist" if not path.exists() else f"has no {MANIFEST_NAME}"
            raise ToolkitError(f"{path} is not a bundle: it {what}. Create one with `toolkit export MODEL -o {path}`.")
        try:
            data = json.loads(manifest_path.read_text())
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise ToolkitError(
                    f"{manifest_path} has bundle format version {version}; this toolkit reads version "
                    f"{FORMAT_VERSION}. Re-export the model with this toolkit."
                )
            return cls(path, Manifest.from_json(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise ToolkitError(f"{manifest_path} is not a valid manifest ({type(exc).__name__}: {exc}).") from exc

    def parts(self) -> list[Bundle]:
        """The bundles of this model's other graphs (see `ModelSpec.parts`)."""
        return [Bundle.open(self.path / part) for part in self.manifest.parts]

    def variant(self, name: str) -> Variant:
        try:
            return self.manifest.variants[name]
        except KeyError:
            known = ", ".join(self.manifest.variants) or "none"
            raise ToolkitError(f"bundle {self.path} has no variant {name!r}; its variants: {known}.") from None

    def variant_path(self, name: str, *, verify: bool = True) -> Path:
        """The ONNX file of a variant; with `verify`, refuses files whose sha256 does not match."""
        variant = self.variant(name)
        if verify:
            for entry in [{"file": variant.file, "sha256": variant.sha256}, *variant.external_data]:
                self._verify(entry["file"], entry["sha256"], f"variant {name!r}")
        return self.path / variant.file

    def asset_path(self, name: str) -> Path:
        """A file the bundle carries beside its graphs (a tokenizer), refused if its sha256 does not match."""
        entry = self.manifest.assets.get(name)
        if entry is None:
            raise ToolkitError(f"bundle {self.path} carries no {name}; re-export it with this toolkit.")
        self._verify(name, entry["sha256"], f"asset {name!r}")
        return self.path / name

    def _verify(self, file: str, sha256: str, what: str) -> None:
        path = self.path / file
        if not path.is_file():
            raise ToolkitError(f"bundle {self.path}: {what} is missing its file {file}.")
        actual = sha256_file(path)
        if actual != sha256:
            raise ToolkitError(
                f"bundle {self.path}: {file} ({what}) fails its sha256 check (manifest {sha256[:12]}…, file {actual[:12]}…): "
                "it was modified or corrupted after it was written. Re-create it."
            )

    def add_variant(self, name: str, model_file: Path, *, recipe: dict[str, Any], precision: str, io: dict[str, str] | None = None) -> Variant:
        """Moves `model_file` (with the external data it reads, if any) into the bundle as variant
        `name` (replacing one of that name) and saves the manifest; each file lands under its final
        name only once complete, the weights before the graph that reads them."""
        from toolkit._onnx import is_large

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
            for written in [*external, file]:
                os.replace(staging / written, self.path / written)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not external:  # a variant of that name that had its weights beside it
            (self.path / f"{file}.data").unlink(missing_ok=True)
        entries = [{"file": e, "sha256": sha256_file(self.path / e), "bytes": (self.path / e).stat().st_size} for e in external]
        path = self.path / file
        variant = Variant(file=file, sha256=sha256_file(path), bytes=path.stat().st_size + sum(e["bytes"] for e in entries),
                          recipe=recipe, precision=precision, io=io or {}, external_data=entries)
        self.manifest.variants[name] = variant
        self.save()
        return variant

    def save(self) -> None:
        write_atomic(self.path / MANIFEST_NAME, (json.dumps(self.manifest.to_json(), indent=2) + "\n").encode())


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
    if target.exists() and not overwrite:
        raise ToolkitError(f"{target} already exists; pass --force to replace it.")
    if target.exists() and not (target / MANIFEST_NAME).is_file() and any(target.iterdir()):
        raise ToolkitError(f"{target} exists and is not a bundle; refusing to replace it. Choose another -o.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, retired / "bundle")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
