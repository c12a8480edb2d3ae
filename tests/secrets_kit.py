"""Test helpers for the privacy and security tests: key pairs and certificates made here (never
checked in), and an audit hook that records every file this process opens for writing."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_recording: list[list[str]] = []
_installed = False


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _recording:
        return
    path, mode, flags = args
    if isinstance(path, int):
        return
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    # a directory opened to create a file in it (filelock's dir_fd), or a device (/dev/null), holds no data
    if writing and not os.path.isdir(path) and not os.fsdecode(path).startswith("/dev/"):
        for record in _recording:
            record.append(os.fsdecode(path))


@contextmanager
def files_written() -> Iterator[list[str]]:
    """The paths this process opens for writing meanwhile (Python's audit hook: every `open` and
    `os.open`, in every thread; onnxruntime and tokenizers write nothing of their own)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # for good: an audit hook cannot be removed, so it records only when asked
        _installed = True
    record: list[str] = []
    _recording.append(record)
    try:
        yield record
    finally:
        _recording.remove(record)


def key_pair(directory: Path, kind: str) -> tuple[Path, Path]:
    """(private key PEM, public key PEM or the key file itself) of `kind`: x25519, rsa or key-file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa, x25519

    if kind == "key-file":
        path = directory / "kek.bin"
        path.write_bytes(os.urandom(32).hex().encode() + b"\n")
        return path, path
    private = x25519.X25519PrivateKey.generate() if kind == "x25519" else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    secret, public = directory / f"{kind}.pem", directory / f"{kind}.pub"
    secret.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return secret, public


def signing_pair(directory: Path) -> tuple[Path, Path]:
    """An EC P-256 key pair for `toolkit sign`, made with openssl as the README says."""
    key, pub = directory / "sign.pem", directory / "sign.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key], check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    return key, pub


def certificates(directory: Path) -> dict[str, Path]:
    """A CA; a server certificate for 127.0.0.1 and localhost; a client certificate from that CA and
    one from another CA (a stranger's). PEM files: ca, server, server_key, client, client_key,
    stranger, stranger_key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        files[name] = directory / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[f"{name}_key"] = directory / f"{name}.key"
            files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, *,
              ca: bool = False, server: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    for ca_name, leaf in (("ca", ("server", "client")), ("stranger_ca", ("stranger",))):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"toolkit test {ca_name}")])
        write(ca_name, issue(f"toolkit test {ca_name}", ca_key, ca_subject, ca_key, ca=True))
        for name in leaf:
            key = ec.generate_private_key(ec.SECP256R1())
            write(name, issue(name, key, ca_subject, ca_key, server=name == "server"), key)
    return files
