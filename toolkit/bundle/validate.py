"""What a bundle must be before anything reads it. A bundle is data from wherever it was copied or
downloaded from, so nothing in its manifest is trusted as written:

- the manifest's schema and types (a `ToolkitError` naming the field, never a raw Python error);
- names that become URL segments and directory names (the model, its variants, parts and the
  encoder) are safe names, and every file the manifest lists is a plain file name in the bundle
  directory: no path separators, no `..`, no absolute paths;
- every entry of the directory is listed (the manifest, variant graphs and their external data,
  assets, parts, a signature), a regular file or directory and never a symlink; listed files have
  one link (a hardlink could be a file outside the bundle, by another name);
- a graph reads external data only from files its variant lists, with their sha256
  (`external_data_refused`, run before onnxruntime opens the graph; the ONNX external-data
  traversal CVEs are exactly a graph's `location` pointing elsewhere).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from toolkit.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME, SOURCE_KINDS, Manifest
from toolkit.errors import ToolkitError

__all__ = ["LOCK_NAME", "SIGNATURE_NAME", "check_directory", "external_data_refused", "is_safe_name", "is_transient",
           "validate_manifest"]

SIGNATURE_NAME = "model.sig"  # written by `toolkit sign` (OpenSSF model-signing)
LOCK_NAME = ".toolkit.lock"  # writers' lock (filelock); holds no data
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Entries that writers stage under, renamed into place when complete (store.py); never read.
_TRANSIENT = re.compile(r"\..+(\.tmp|\.tmp-\w+|\.staging-\w+|\.old-\w+)")

Check = Callable[[Any, str], None]


def is_safe_name(text: Any) -> bool:
    """Letters, digits, '_', '.' and '-', not starting with '.' or '-', at most 128 characters."""
    return isinstance(text, str) and _SAFE.fullmatch(text) is not None and text not in (".", "..")


def is_transient(name: str) -> bool:
    """Whether `name` is an entry a writer stages under before renaming it into place (store.py)."""
    return _TRANSIENT.fullmatch(name) is not None


def validate_manifest(data: Any, where: str) -> Manifest:
    """The `Manifest` of the parsed JSON `data` (read from `where`), or a ToolkitError naming the first
    field that is wrong."""
    if not isinstance(data, dict):
        raise ToolkitError(f"{where} is not a valid manifest: it holds a JSON {_kind(data)}, not an object.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ToolkitError(f"{where} has bundle format version {version!r}; this toolkit reads version {FORMAT_VERSION}. "
                           "Re-export the model with this toolkit.")
    try:
        return _consistent(data)
    except (ToolkitError, ValueError, TypeError) as exc:  # from_json: a dim's sizes out of order, a source missing what it needs
        raise ToolkitError(f"{where} is not a valid manifest: {exc}") from None


def _consistent(data: dict[str, Any]) -> Manifest:
    _MANIFEST(data, "")
    manifest = Manifest.from_json(data)
    files = [v.file for v in manifest.variants.values()] + [e["file"] for v in manifest.variants.values() for e in v.external_data]
    files += list(manifest.assets)
    taken = {MANIFEST_NAME, SIGNATURE_NAME, LOCK_NAME, *manifest.parts}
    for file in files:
        if file in taken:
            raise ToolkitError(f"{file!r} is listed twice, or is a name the bundle keeps for itself.")
        taken.add(file)
    if manifest.encryption is not None:
        from toolkit.bundle.encryption import sealed_files

        _list(_RECIPIENT)(manifest.encryption["recipients"], ".encryption.recipients")
        if set(manifest.encryption["files"]) != set(sealed_files(manifest)):
            raise ToolkitError("encryption.files must list exactly the bundle's files but the manifest (its graphs, weights and assets).")
    _tensors_consistent(manifest)
    if manifest.best is not None and manifest.best["variant"] not in manifest.variants:
        raise ToolkitError(f"best names variant {manifest.best['variant']!r}, which the bundle does not have.")
    if manifest.generation is not None:
        _tokens_in_vocabulary(manifest)
    for key in ("encoder", "static"):
        part = (manifest.generation or {}).get(key)
        if part is not None and part not in manifest.parts:
            raise ToolkitError(f"generation.{key} names part {part!r}, which is not among the bundle's parts "
                               f"({', '.join(manifest.parts) or 'none'}).")
    return manifest


def check_directory(path: Path, manifest: Manifest) -> None:
    """Refuses a bundle directory holding anything its manifest does not list, or a listed entry that
    is not a plain regular file (or a directory, for a part) inside it."""
    files = {MANIFEST_NAME, *manifest.assets, *([manifest.source.pruned] if manifest.source.pruned else [])}
    for variant in manifest.variants.values():
        files.update([variant.file, *(e["file"] for e in variant.external_data)])
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if is_transient(name):
                continue
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise ToolkitError(f"bundle {path}: {name} is a symbolic link; a bundle holds its files itself "
                                   "(a link can point anywhere on the machine that reads it). Copy the bundle with `cp -rL`.")
            if name in manifest.parts:
                if not stat.S_ISDIR(info.st_mode):
                    raise ToolkitError(f"bundle {path}: part {name} is not a directory.")
            elif name in files or name in (SIGNATURE_NAME, LOCK_NAME):
                if not stat.S_ISREG(info.st_mode):
                    raise ToolkitError(f"bundle {path}: {name} is not a regular file.")
                if info.st_nlink > 1:
                    raise ToolkitError(f"bundle {path}: {name} is a hard link ({info.st_nlink} names for one file), so it may be a "
                                       "file outside the bundle; copy the bundle with `cp -r`, not `cp -l`.")
            else:
                raise ToolkitError(f"bundle {path}: {name} is not listed in its manifest. Every file in a bundle is listed there "
                                   "with its sha256; remove it, or re-create the bundle.")


def external_data_refused(graph: Path | bytes, listed: Iterable[str]) -> str | None:
    """Why onnxruntime must not open `graph`: the external-data locations it names that are not in
    `listed` (the variant's verified external-data files), or None when all are."""
    from toolkit._onnx import external_files

    try:
        unlisted = [location for location in external_files(graph) if location not in set(listed)]
    except Exception as exc:  # a file that is not an ONNX model (protobuf's errors are not portable types)
        return f"it is not a readable ONNX model ({type(exc).__name__}: {exc})"
    if unlisted:
        return (f"its graph reads external data from {', '.join(repr(u) for u in unlisted)}, which the manifest does not list "
                "with a sha256; onnxruntime would read it unverified")
    return None


def _tensors_consistent(manifest: Manifest) -> None:
    """Every dim an input's shape names is one of the manifest's dims (inputs are made and checked from
    them; an output may carry a name its exporter gave an axis), every fixed size is >= 0, and a
    variant's io dtypes are for tensors it has, in dtypes the runtime carries."""
    from toolkit.spec import DTYPES

    dims = {d.name for d in manifest.dims}
    for tensor in [*manifest.inputs, *manifest.outputs]:
        for axis in tensor.shape:
            if isinstance(axis, int) and axis < 0:
                raise ToolkitError(f"tensor {tensor.name!r}: size {axis} must be >= 0.")
            unknown = [n for n in (axis.split("+") if isinstance(axis, str) and tensor in manifest.inputs else []) if n not in dims]
            if unknown:
                raise ToolkitError(f"tensor {tensor.name!r}: its shape names dim {unknown[0]!r}, which is not among the manifest's dims "
                                   f"({', '.join(sorted(dims)) or 'none'}).")
    names = {t.name for t in [*manifest.inputs, *manifest.outputs]}
    for name, variant in manifest.variants.items():
        for tensor, dtype in variant.io.items():
            if tensor not in names or dtype not in DTYPES:
                raise ToolkitError(f"variants.{name}.io: {tensor!r} as {dtype!r} is not a tensor of the model in a dtype of {', '.join(DTYPES)}.")


def _tokens_in_vocabulary(manifest: Manifest) -> None:
    """The token ids the generation section names lie in the vocabulary the decoder's input_ids take."""
    ids = next((t for t in manifest.inputs if t.name == "input_ids"), None)
    if ids is None or ids.kind != "ids":
        raise ToolkitError("a bundle with a generation section must take input_ids of kind 'ids' (with their vocabulary size, high).")
    g = manifest.generation
    forced_eos = g.get("forced_eos_token_id")
    named = {"eos_token_id": [g["eos_token_id"]], "eos_token_ids": g.get("eos_token_ids") or [], "decoder_start": g.get("decoder_start") or [],
             "suppress_tokens": g.get("suppress_tokens") or [], "begin_suppress_tokens": g.get("begin_suppress_tokens") or [],
             "forced_bos_token_id": [g["forced_bos_token_id"]] if g.get("forced_bos_token_id") is not None else [],
             "forced_eos_token_id": forced_eos if isinstance(forced_eos, list) else [forced_eos] if forced_eos is not None else []}
    for key, tokens in named.items():
        outside = [t for t in tokens if not 0 <= t < ids.high]
        if outside:
            raise ToolkitError(f"field generation.{key}: token {outside[0]} is outside the vocabulary [0, {ids.high}).")


# --- the schema: each check takes (value, field path) and raises on the first problem -----------------


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _fail(where: str, expected: str, value: Any) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ToolkitError(f"field {where.lstrip('.') or 'the top level'} must be {expected}, got {_kind(value)} {shown}.")


def _typed(expected: str, *types: type) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            _fail(where, expected, value)

    return check


def _pattern(expected: str, accept: Callable[[Any], bool]) -> Check:
    def check(value: Any, where: str) -> None:
        if not accept(value):
            _fail(where, expected, value)

    return check


def _nullable(inner: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if value is not None:
            inner(value, where)

    return check


def _list(item: Check) -> Check:
    def check(value: Any, where: str) -> None:
        _typed("an array", list)(value, where)
        for i, element in enumerate(value):
            item(element, f"{where}[{i}]")

    return check


def _map(item: Check, *, keys: Check | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        _typed("an object", dict)(value, where)
        for key, element in value.items():
            if keys is not None:
                keys(key, f"{where} key")
            item(element, f"{where}.{key}")

    return check


def _object(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    optional = optional or {}

    def check(value: Any, where: str) -> None:
        _typed("an object", dict)(value, where)
        for key, field_check in required.items():
            if key not in value:
                raise ToolkitError(f"field {(where + '.' + key).lstrip('.')} is missing.")
            field_check(value[key], f"{where}.{key}")
        for key, field_check in optional.items():
            if key in value:
                field_check(value[key], f"{where}.{key}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise ToolkitError(f"field {where.lstrip('.') or 'the top level'} has unknown keys {', '.join(unknown)}.")

    return check


_STR = _typed("a string", str)
_INT = _typed("an integer", int)
_NUMBER = _typed("a number", int, float)
_DICT = _typed("an object", dict)
_NAME = _pattern("a safe name (letters, digits, '_', '.', '-'; not starting with '.' or '-')", is_safe_name)
_FILE = _pattern("a plain file name inside the bundle (no '/', no '..', not absolute)", is_safe_name)
_SHA256 = _pattern("a sha256 (64 lowercase hex digits)", lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None)
_BYTES = _pattern("a byte count (an integer >= 0)", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_KIND = _pattern(f"one of {', '.join(SOURCE_KINDS)}", lambda v: v in SOURCE_KINDS)
_FILE_ENTRY = _object({"file": _FILE, "sha256": _SHA256, "bytes": _BYTES})
_BOOL = _typed("true or false", bool)
_POSITIVE = _pattern("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_TOKEN = _typed("a token id (an integer)", int)
_TOKENS = _list(_TOKEN)
_CHECK_SIZES = _pattern("two distinct integers", lambda v: isinstance(v, list) and len(v) == 2 and v[0] != v[1]
                        and all(isinstance(s, int) and not isinstance(s, bool) for s in v))
_PARITY = _pattern('an object whose "passed" is true or false', lambda v: isinstance(v, dict) and isinstance(v.get("passed"), bool))
_BEST = _pattern('an object naming its "variant"', lambda v: isinstance(v, dict) and is_safe_name(v.get("variant")))
# What generation reads (toolkit.runtime.generate.layout, sampling; serve.generation): every key it knows, typed.
_GENERATION = _object(
    {"eos_token_id": _TOKEN, "context": _POSITIVE},
    {"tokenizer": _pattern("'bytes' or 'hf'", lambda v: v in ("bytes", "hf")), "eos_token_ids": _TOKENS, "encoder": _NAME, "static": _NAME,
     "source_context": _POSITIVE, "decoder_start": _TOKENS, "source": _pattern("'text' or 'features'", lambda v: v in ("text", "features")),
     "source_special_tokens": _BOOL, "suppress_tokens": _TOKENS, "begin_suppress_tokens": _TOKENS, "forced_bos_token_id": _nullable(_TOKEN),
     "forced_eos_token_id": _nullable(lambda v, where: (_TOKENS if isinstance(v, list) else _TOKEN)(v, where)),
     "chat_template": _nullable(_STR), "chat_tokens": _map(_STR)},
)
_TENSOR = _object({"name": _STR, "dtype": _STR, "shape": _list(_typed("an integer or a dim name", int, str))},
                  {"kind": _STR, "high": _NUMBER})
_MANIFEST = _object(
    {
        "format_version": _INT,
        "name": _NAME,
        "source": _object({"kind": _KIND}, {"model": _STR, "preset": _STR, "ref": _STR, "path": _STR, "part": _NAME,
                                            "pruned": _FILE, "pruned_sha256": _SHA256, "hub": _STR, "revision": _STR,
                                            "remote_code": _BOOL}),
        "task": _STR,
        "opset": _INT,
        "inputs": _list(_TENSOR),
        "outputs": _list(_TENSOR),
        "dims": _map(_object({"min": _INT, "max": _nullable(_INT), "export": _INT, "check": _CHECK_SIZES})),
        "variants": _map(_object({"file": _FILE, "sha256": _SHA256, "bytes": _BYTES, "recipe": _DICT},
                                 {"precision": _STR, "external_data": _list(_FILE_ENTRY), "parity": _nullable(_PARITY),
                                  "io": _map(_STR)}), keys=_NAME),
    },
    {
        "description": _STR,
        "fusion": _nullable(_DICT),
        "generation": _nullable(_GENERATION),
        "parts": _list(_NAME),
        "failed": _map(_STR),
        "assets": _map(_object({"sha256": _SHA256, "bytes": _BYTES}), keys=_FILE),
        "reference": _DICT,
        "best": _nullable(_BEST),
        "pruning": _nullable(_DICT),
        "versions": _map(_STR),
        "encryption": _nullable(_object({
            "scheme": _pattern("toolkit-seal-v1", lambda v: v == "toolkit-seal-v1"),
            "cipher": _pattern("AES-256-GCM", lambda v: v == "AES-256-GCM"),
            "chunk_bytes": _pattern("1048576", lambda v: v == 1 << 20 and not isinstance(v, bool)),
            "recipients": _pattern("a non-empty array", lambda v: isinstance(v, list) and len(v) > 0),
            "files": _map(_object({"sha256": _SHA256, "bytes": _BYTES}), keys=_FILE),
        })),
    },
)
_RECIPIENT = _object({"kind": _pattern("x25519, rsa-oaep-sha256 or key-file", lambda v: v in ("x25519", "rsa-oaep-sha256", "key-file")),
                      "key_id": _STR, "wrapped": _STR}, {"ephemeral": _STR, "nonce": _STR})
