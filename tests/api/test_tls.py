"""TLS and mutual TLS on the gRPC port (certificates made by openssl), the certificate renewed without a restart,
and the client and CLI connecting with a CA, a client certificate and an API key."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from difflens.api.server import BackgroundServer
from difflens.auth.keys import add_key
from difflens.auth.settings import AuthSettings, TlsSettings
from difflens.cli import main
from difflens.client import DifflensClient
from tests.api.helpers import settings
from tests.support.certs import issue, make_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "ca"), make_ca(d, "other-ca")
    return {"dir": d, "ca": ca, "other": other, "server": issue(ca, d, "server"),
            "client": issue(ca, d, "client", client=True), "stranger": issue(other, d, "stranger", client=True)}


def models_code(target: str, **kw) -> grpc.StatusCode:
    try:
        with DifflensClient(target, retries=0, **kw) as c:
            c.list_models(timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_tls_serves_only_clients_that_trust_its_ca(tiny_dir, pki):
    tls = TlsSettings(cert=str(pki["server"].cert), key=str(pki["server"].key))
    with BackgroundServer(settings(tiny_dir, tls=tls)) as srv:
        assert models_code(srv.target, tls_ca=str(pki["ca"].cert)) == grpc.StatusCode.OK
        assert models_code(srv.target) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert models_code(srv.target, tls_ca=str(pki["other"].cert)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_of_its_ca(tiny_dir, pki):
    tls = TlsSettings(cert=str(pki["server"].cert), key=str(pki["server"].key), client_ca=str(pki["ca"].cert))
    ca = str(pki["ca"].cert)
    with BackgroundServer(settings(tiny_dir, tls=tls)) as srv:
        assert models_code(srv.target, tls_ca=ca) == grpc.StatusCode.UNAVAILABLE
        stranger = pki["stranger"]
        assert models_code(srv.target, tls_ca=ca, tls_cert=str(stranger.cert),
                           tls_key=str(stranger.key)) == grpc.StatusCode.UNAVAILABLE
        assert models_code(srv.target, tls_ca=ca, tls_cert=str(pki["client"].cert),
                           tls_key=str(pki["client"].key)) == grpc.StatusCode.OK


def test_a_renewed_certificate_is_served_without_a_restart(tiny_dir, pki, tmp_path):
    """The files are swapped as the kubelet swaps a Secret's: a new folder, then the ..data symlink."""
    renewed = issue(pki["other"], tmp_path, "renewed")
    mount = tmp_path / "mount"
    mount.mkdir()

    def swap(pair, generation: int) -> None:
        folder = mount / f"..{generation}"
        folder.mkdir()
        (folder / "tls.crt").write_bytes(pair.cert.read_bytes())
        (folder / "tls.key").write_bytes(pair.key.read_bytes())
        (mount / "..data_tmp").symlink_to(folder.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (mount / name).is_symlink():
                (mount / name).symlink_to(f"..data/{name}")

    swap(pki["server"], 1)
    tls = TlsSettings(cert=str(mount / "tls.crt"), key=str(mount / "tls.key"))
    with BackgroundServer(settings(tiny_dir, tls=tls)) as srv:
        assert models_code(srv.target, tls_ca=str(pki["ca"].cert)) == grpc.StatusCode.OK
        swap(renewed, 2)
        assert models_code(srv.target, tls_ca=str(pki["other"].cert)) == grpc.StatusCode.OK  # a new connection
        assert models_code(srv.target, tls_ca=str(pki["ca"].cert)) == grpc.StatusCode.UNAVAILABLE
        (mount / "..3").mkdir()  # a half-written renewal: a certificate without its key
        (mount / "..3" / "tls.crt").write_bytes(pki["server"].cert.read_bytes())
        (mount / "..3" / "tls.key").write_bytes(b"not a key")
        (mount / "..data_tmp").symlink_to("..3")
        os.replace(mount / "..data_tmp", mount / "..data")
        assert models_code(srv.target, tls_ca=str(pki["other"].cert)) == grpc.StatusCode.OK  # the last good one


def test_the_cli_connects_with_tls_and_an_api_key(tiny_dir, pki, tmp_path, capsys, monkeypatch):
    keys = tmp_path / "keys.json"
    _, key = add_key(keys, "acme")
    tls = TlsSettings(cert=str(pki["server"].cert), key=str(pki["server"].key), client_ca=str(pki["ca"].cert))
    flags = ["--tls-ca", str(pki["ca"].cert), "--tls-cert", str(pki["client"].cert), "--tls-key",
             str(pki["client"].key)]
    with BackgroundServer(settings(tiny_dir, tls=tls, auth=AuthSettings(keys_file=str(keys)))) as srv:
        monkeypatch.delenv("DIFFLENS_API_KEY", raising=False)
        assert main(["models", "--server", srv.target, *flags]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["models", "--server", srv.target, "--api-key", key, *flags]) == 0
        assert "tiny (default)" in capsys.readouterr().out
        monkeypatch.setenv("DIFFLENS_API_KEY", key)
        assert main(["models", "--server", srv.target, *flags]) == 0
        time.sleep(0.01)
        assert main(["delete", "--server", srv.target, *flags, "0" * 32]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["--tls-cert", "{server.cert}", "--tls-key", "{client.key}"], "--tls-cert: "),  # not the certificate's key
    (["--tls-cert", "{server.cert}"], "--tls-key: TLS needs both"),
    (["--tls-cert", "{server.cert}", "--tls-key", "{server.key}", "--tls-client-ca", "{server.key}"],
     "--tls-client-ca: "),
])
def test_serve_refuses_tls_files_that_cannot_serve_naming_the_flag(argv, says, pki, tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("DIFFLENS_REDIS_URL", raising=False)
    args = [a.format(server=pki["server"], client=pki["client"]) for a in argv]
    assert main(["serve", "--embedded", "--port", "0", "--model", f"tiny={tiny_dir}", *args]) == 2
    assert says in capsys.readouterr().err


def test_client_tls_flags_are_refused_without_a_server_or_a_readable_file(tmp_path, capsys):
    assert main(["explain", str(tmp_path), "a prompt", "--out", str(tmp_path / "o"), "--api-key", "x"]) == 2
    assert "--api-key: only with --server" in capsys.readouterr().err
    assert main(["models", "--server", "127.0.0.1:1", "--tls-ca", str(tmp_path / "nope.pem")]) == 2
    assert "--tls-ca: " in capsys.readouterr().err
