"""Signing bundles with the OpenSSF `model-signing` library (the `sign` extra), offline: an
elliptic-curve key pair in PEM files, no network, no transparency log.

The signature, `model.sig` in the bundle directory, is a Sigstore bundle over every file of the
bundle, parts included, the manifest among them; only the signature itself, the writers' lock files
and writers' staging entries are left out. `sign` first verifies the bundle's own sha256 records, so
a bundle that is already damaged is never signed; `verify` checks the signature (which hashes every
file), then opens the bundle (validation).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from toolkit.bundle.manifest import MANIFEST_NAME
from toolkit.bundle.store import Bundle
from toolkit.bundle.validate import LOCK_NAME, SIGNATURE_NAME, is_transient
from toolkit.errors import CheckFailed, ToolkitError

__all__ = ["sign", "verify"]


def sign(path: str | os.PathLike[str], key: str | os.PathLike[str], *, password: str | None = None) -> Path:
    """Signs the bundle at `path` with the EC private key in the PEM file `key`; → the signature's path."""
    hashing, signing, _ = _model_signing()
    bundle = Bundle.open(path)
    bundle.verify_files()
    root = bundle.path.resolve()
    with bundle.lock():
        ignored = [root / SIGNATURE_NAME, *_ignored(root)]
        config = hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)
        try:
            signing.Config().use_elliptic_key_signer(private_key=_existing(key, "--key"), password=password) \
                .set_hashing_config(config).sign(root, root / SIGNATURE_NAME)
        except (ValueError, TypeError) as exc:  # the key is not an EC private key, or its password is wrong
            raise ToolkitError(f"cannot sign {path} with key {key}: {exc}") from None
    return root / SIGNATURE_NAME


def verify(path: str | os.PathLike[str], public_key: str | os.PathLike[str]) -> Bundle:
    """Checks that the bundle at `path` is signed by `public_key` (PEM) and that no file changed since;
    → the bundle, opened. A CheckFailed names what failed: no signature, another key, which file changed
    (a ToolkitError: no such key file, not a bundle)."""
    _, _, verifying = _model_signing()
    public_key = _existing(public_key, "--pub")
    root = Path(path).resolve()
    if not (root / MANIFEST_NAME).is_file():
        Bundle.open(root)  # says what is there instead of a bundle
    signature = root / SIGNATURE_NAME
    if not signature.is_file():
        raise CheckFailed(f"bundle {path} is not signed (no {SIGNATURE_NAME}); sign it with `toolkit sign {path} --key KEY`.")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(root, signature)
    except ValueError as exc:  # model-signing reports every failure as ValueError (json's errors are ValueErrors)
        raise CheckFailed(f"bundle {path} fails signature verification: {_explain(str(exc))}") from None
    return Bundle.open(root)  # every file is as signed, and was checked against its sha256 before signing


def _ignored(directory: Path) -> list[Path]:
    """The lock file and writers' staging entries here and in every subdirectory: never read, never signed."""
    found = [directory / LOCK_NAME]
    for entry in directory.iterdir():
        if is_transient(entry.name):
            found.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            found += _ignored(entry)
    return found


def _explain(message: str) -> str:
    """model-signing's mismatch report, as which files changed, appeared or went missing."""
    # the report is the repr of a list of strings: quotes inside may come escaped
    changed = re.findall(r"Hash mismatch for \\*'([^'\\]+)\\*'", message)
    added = re.search(r"Extra files found in model \\*'[^']*\\*': ([^'\"\\\]]+)", message)
    missing = re.search(r"Missing files in model \\*'[^']*\\*': ([^'\"\\\]]+)", message)
    said = [f"{file} changed since it was signed" for file in changed]
    said += [f"not signed (added since): {added.group(1)}"] if added else []
    said += [f"missing since it was signed: {missing.group(1)}"] if missing else []
    if said:
        return "; ".join(said) + "."
    if "Key mismatch" in message:
        return "it was signed with another key than this public key."
    return message


def _existing(path: str | os.PathLike[str], option: str) -> Path:
    if not Path(path).is_file():
        raise ToolkitError(f"{option} {path}: no such file.")
    return Path(path)


def _model_signing() -> tuple[Any, Any, Any]:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise ToolkitError(f"signing needs the sign extra ({exc.name} is missing): pip install 'toolkit[sign]'.") from None
    return hashing, signing, verifying
