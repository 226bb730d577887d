"""Certificates for the TLS tests, made by the `openssl` command in a temporary folder: a CA, and server or client
certificates it signs (servers for 127.0.0.1 and localhost)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("the openssl command is not installed")
    subprocess.run([exe, *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Pair:
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", pair.key, "-out", pair.cert,
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def issue(ca: Pair, folder: Path, name: str, *, client: bool = False) -> Pair:
    """A certificate of `ca` for a server on 127.0.0.1 / localhost, or (client=True) for a client named `name`."""
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text("extendedKeyUsage=clientAuth\n" if client else
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", pair.key, "-out", csr)
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-days", "2",
             "-extfile", ext, "-out", pair.cert)
    return pair
