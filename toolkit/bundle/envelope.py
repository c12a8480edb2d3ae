"""Envelope encryption's keys: a bundle's files are sealed under one random data key (AES-256), and
that data key is kept in the manifest only wrapped, once per recipient:

- an X25519 public key (PEM): an ephemeral X25519 exchange, HKDF-SHA256, AES-256-GCM (age's and
  HPKE's construction);
- an RSA public key (PEM, 2048 bits or more): RSA-OAEP with SHA-256;
- a key file: 32 random bytes (raw, hex or base64) that a KMS or a secret store holds; the data key
  is wrapped with AES-256-GCM under it.

Whoever holds one matching private key or key file unwraps the data key; nobody else can. Every
recipient has a `key_id` (the first 16 hex digits of the sha256 of its public key, or of the key
file's key), so an error can say which keys a bundle was sealed for without saying anything secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["DATA_KEY_BYTES", "UnlockKey", "new_data_key", "unwrap", "wrap_for"]

DATA_KEY_BYTES = 32
_INFO = b"toolkit bundle data key v1"
_WRAP_AAD = b"toolkit-data-key"


def new_data_key() -> bytes:
    return os.urandom(DATA_KEY_BYTES)


def wrap_for(recipient: str | os.PathLike[str], data_key: bytes) -> dict[str, Any]:
    """The recipient entry that `recipient` (a public key PEM or a key file) can unwrap `data_key` from."""
    from cryptography.hazmat.primitives.asymmetric import rsa, x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    path = Path(recipient)
    raw = _read(path, "--recipient")
    if raw.lstrip().startswith(b"-----BEGIN"):
        public = _public_key(raw, path)
        if isinstance(public, x25519.X25519PublicKey):
            ephemeral = x25519.X25519PrivateKey.generate()
            mine = _raw_public(ephemeral.public_key())
            kek = _derive(ephemeral.exchange(public), mine, _raw_public(public))
            return {"kind": "x25519", "key_id": _key_id(_raw_public(public)), "ephemeral": _b64(mine),
                    "wrapped": _b64(AESGCM(kek).encrypt(bytes(12), data_key, _WRAP_AAD))}
        if isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise ToolkitError(f"--recipient {path}: an RSA key of {public.key_size} bits is too weak; use 2048 bits or more.")
            return {"kind": "rsa-oaep-sha256", "key_id": _key_id(_der_public(public)), "wrapped": _b64(public.encrypt(data_key, _oaep()))}
        raise ToolkitError(f"--recipient {path}: a {type(public).__name__} cannot receive a bundle; give an X25519 or RSA public key "
                           "(`openssl genpkey -algorithm X25519 -out key.pem && openssl pkey -in key.pem -pubout -out key.pub`), or a key file.")
    kek = _key_file(raw, path)
    nonce = os.urandom(12)
    return {"kind": "key-file", "key_id": _key_id(kek), "nonce": _b64(nonce), "wrapped": _b64(AESGCM(kek).encrypt(nonce, data_key, _WRAP_AAD))}


@dataclass(frozen=True)
class UnlockKey:
    """What opens a sealed bundle: a private key (X25519 or RSA, PEM) or a key file."""

    path: Path
    password: str | None = None

    def __repr__(self) -> str:  # never the key itself, wherever it is printed
        return f"UnlockKey({str(self.path)!r})"

    @classmethod
    def of(cls, key: UnlockKey | str | os.PathLike[str] | None) -> UnlockKey | None:
        if key is None or isinstance(key, UnlockKey):
            return key
        return cls(Path(key), os.environ.get("TOOLKIT_KEY_PASSWORD"))


def unwrap(recipients: list[dict[str, Any]], key: UnlockKey, where: str) -> bytes:
    """The data key, from the recipient entry that `key` matches; a ToolkitError when none does."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric import rsa, x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = _read(key.path, "--key")
    private: Any = None
    if raw.lstrip().startswith(b"-----BEGIN"):
        private = _private_key(raw, key)
        public = private.public_key()
        ids = {"x25519": _key_id(_raw_public(public))} if isinstance(private, x25519.X25519PrivateKey) else \
              {"rsa-oaep-sha256": _key_id(_der_public(public))} if isinstance(private, rsa.RSAPrivateKey) else {}
        if not ids:
            raise ToolkitError(f"--key {key.path}: a {type(private).__name__} opens no bundle; give the X25519 or RSA private key it was sealed for.")
    else:
        kek = _key_file(raw, key.path)
        ids = {"key-file": _key_id(kek)}
    entry = next((r for r in recipients if ids.get(r.get("kind")) == r.get("key_id")), None)
    if entry is None:
        sealed_for = ", ".join(f"{r.get('kind')} {r.get('key_id')}" for r in recipients)
        mine = next(iter(ids.items()))
        raise ToolkitError(f"{where} is not sealed for key {key.path} ({mine[0]} {mine[1]}); it is sealed for: {sealed_for}.")
    try:
        wrapped = base64.b64decode(entry["wrapped"], validate=True)
        if entry["kind"] == "x25519":
            ephemeral = base64.b64decode(entry["ephemeral"], validate=True)
            shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(ephemeral))
            data_key = AESGCM(_derive(shared, ephemeral, _raw_public(private.public_key()))).decrypt(bytes(12), wrapped, _WRAP_AAD)
        elif entry["kind"] == "rsa-oaep-sha256":
            data_key = private.decrypt(wrapped, _oaep())
        else:
            data_key = AESGCM(kek).decrypt(base64.b64decode(entry["nonce"], validate=True), wrapped, _WRAP_AAD)
    except (InvalidTag, ValueError, KeyError, binascii.Error):
        raise ToolkitError(f"{where}: the data key wrapped for {entry['kind']} {entry['key_id']} does not open with {key.path}; "
                           "the manifest's encryption section was altered.") from None
    if len(data_key) != DATA_KEY_BYTES:
        raise ToolkitError(f"{where}: the wrapped data key is {len(data_key)} bytes, not {DATA_KEY_BYTES}; the manifest was altered.")
    return data_key


def _read(path: Path, option: str) -> bytes:
    if not path.is_file():
        raise ToolkitError(f"{option} {path}: no such file.")
    if path.stat().st_size > 1 << 20:
        raise ToolkitError(f"{option} {path}: {path.stat().st_size:,} bytes is no key file or PEM key.")
    return path.read_bytes()


def _public_key(raw: bytes, path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(raw)
    except ValueError:
        pass
    try:
        serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise ToolkitError(f"--recipient {path}: not a PEM public key.") from None
    raise ToolkitError(f"--recipient {path} is a private key; give its public half (`openssl pkey -in {path} -pubout`), "
                       "which is all that sealing needs.")


def _private_key(raw: bytes, key: UnlockKey) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(raw, password=key.password.encode() if key.password else None)
    except TypeError:
        raise ToolkitError(f"--key {key.path} is protected by a password: set TOOLKIT_KEY_PASSWORD.") from None
    except ValueError:
        raise ToolkitError(f"--key {key.path}: not a PEM private key, or its password is wrong (a public key cannot open a bundle).") from None


def _key_file(raw: bytes, path: Path) -> bytes:
    """A key file's 32 bytes: raw, 64 hex digits or base64 (surrounding whitespace ignored)."""
    if len(raw) == DATA_KEY_BYTES:
        return raw
    text = raw.strip()
    for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
        try:
            key = decode(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            continue
        if len(key) == DATA_KEY_BYTES:
            return key
    raise ToolkitError(f"{path} is neither a PEM key nor a key file of {DATA_KEY_BYTES} bytes (raw, hex or base64; "
                       f"make one with `openssl rand -out {path.name} {DATA_KEY_BYTES}`).")


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def _oaep() -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _raw_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _der_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
