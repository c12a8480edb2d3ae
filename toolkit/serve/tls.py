"""TLS for `toolkit serve`, on either backend: the server's certificate and key, and optionally a CA
whose certificates clients must present (mutual TLS). A server with TLS speaks only TLS on its port:
a plain HTTP request fails the handshake and gets no answer."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["TLS"]


@dataclass(frozen=True)
class TLS:
    cert: Path
    key: Path
    ca: Path | None = None  # client certificates must chain to it (mutual TLS)
    password: str | None = None  # the key's, if it has one

    def __repr__(self) -> str:
        return f"TLS(cert={str(self.cert)!r}, key={str(self.key)!r}, ca={str(self.ca) if self.ca else None!r})"

    @classmethod
    def of(cls, cert: Path | None, key: Path | None, ca: Path | None) -> TLS | None:
        """The TLS settings of the serve flags, checked now (a wrong file fails before the server
        starts, naming the flag); None without --tls-cert."""
        if cert is None and key is None:
            if ca is not None:
                raise ToolkitError("--tls-ca needs --tls-cert and --tls-key: client certificates are checked over TLS.")
            return None
        if cert is None or key is None:
            raise ToolkitError("give both --tls-cert and --tls-key (the server's certificate chain and its private key, PEM).")
        tls = cls(Path(cert), Path(key), Path(ca) if ca else None, os.environ.get("TOOLKIT_TLS_KEY_PASSWORD"))
        tls.context()
        return tls

    def context(self) -> ssl.SSLContext:
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not path.is_file():
                raise ToolkitError(f"{flag} {path}: no such file.")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key, self.password)
        except (ssl.SSLError, OSError) as exc:
            raise ToolkitError(f"--tls-cert {self.cert} with --tls-key {self.key}: {exc.strerror or exc} (PEM files, the key matching "
                               "the certificate; a key with a password needs TOOLKIT_TLS_KEY_PASSWORD).") from None
        if self.ca is not None:
            try:
                context.load_verify_locations(self.ca)
            except (ssl.SSLError, OSError) as exc:
                raise ToolkitError(f"--tls-ca {self.ca}: not a PEM certificate bundle ({exc}).") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def uvicorn(self) -> dict[str, Any]:
        """uvicorn.Config's TLS arguments."""
        extra = {"ssl_ca_certs": str(self.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED} if self.ca else {}
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key), "ssl_keyfile_password": self.password, **extra}
