"""TLS on the gRPC port, from PEM files read again when they change: a renewed certificate (cert-manager, a rotated
Kubernetes Secret, whose files are swapped through symlinks) needs no restart. With a client CA, mutual TLS: a
client without a certificate that chains to it gets no connection.

grpc asks `CertificateFiles.fetch` before each new connection's handshake; it stats the files (their resolved
paths) and reads them only when that changed. A new set that does not load (a certificate renewed before its key
is written, say) leaves the old one serving until the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import grpc

from difflens.auth.settings import TlsSettings
from difflens.errors import InvalidArgument

log = logging.getLogger(__name__)


class CertificateFiles:
    """The certificate, key and client CA of `tls`; InvalidArgument naming the flag when they cannot serve."""

    def __init__(self, tls: TlsSettings) -> None:
        self.tls = tls
        self._files = [p for p in (tls.cert, tls.key, tls.client_ca) if p is not None]
        self._signature = self._stat()
        self.initial = self._load()

    def _stat(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for path in self._files:
            real = os.path.realpath(path)
            try:
                st = os.stat(real)
                out.append((real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((real, None))
        return tuple(out)

    def _load(self) -> Any:
        """The files as grpc's certificate configuration, checked first: the key must be the certificate's and the
        CA must parse (grpc itself would only fail the handshakes). InvalidArgument naming the flag of the file
        that does not do."""
        cert, key = Path(str(self.tls.cert)), Path(str(self.tls.key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
            pair = (key.read_bytes(), cert.read_bytes())
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgument("--tls-cert", f"{cert} with the key {key}: not a certificate and its private key "
                                                f"in PEM ({e})") from None
        ca = None
        if self.tls.client_ca is not None:
            try:
                context.load_verify_locations(self.tls.client_ca)
                ca = Path(self.tls.client_ca).read_bytes()
            except (OSError, ssl.SSLError) as e:
                raise InvalidArgument("--tls-client-ca", f"{self.tls.client_ca}: not CA certificates in PEM "
                                                         f"({e})") from None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def fetch(self) -> Any:
        """grpc's certificate-configuration fetcher: the new configuration when the files changed, else None (keep
        serving the current one)."""
        signature = self._stat()
        if signature == self._signature:
            return None
        self._signature = signature  # a set that fails is tried again when the files next change, not per handshake
        try:
            config = self._load()
        except InvalidArgument as e:
            log.error("TLS: the changed certificate files cannot be used (%s); the previous ones stay in use", e)
            return None
        log.info("TLS: certificate files changed; new connections get the new certificate")
        return config


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    files = CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=tls.client_ca is not None)
