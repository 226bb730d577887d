"""A real Kubernetes API for the deploy tests: etcd and kube-apiserver 1.20 of the tests' own on free 127.0.0.1
ports (`make tools` provides both), and a small client that speaks its REST API with a bearer token.

No controller-manager, scheduler or kubelet: objects are stored, defaulted and validated by the server exactly as
a cluster does, but nothing acts on them (a Deployment gets no pods, a namespace never finishes deleting).
Admission is the server's default set less ServiceAccount, which would refuse pods until a token controller made
the account's secret; authorization is AlwaysAllow.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s_tools import require

START_TIMEOUT_S = 60.0
# Each server's own proxy variables would send the apiserver's etcd traffic (and ours) through a proxy.
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "NO_PROXY"}


class ApiError(Exception):
    """The server refused a request: `status` is the HTTP code, `body` its Status object (or raw text)."""

    def __init__(self, status: int, body: dict[str, Any] | str, what: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message", "") if isinstance(body, dict) else body
        super().__init__(f"{what}: HTTP {status}: {message}")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else self.body


class NotServed(LookupError):
    """This server has no such apiVersion/kind (an API newer than 1.20, or a CRD not created yet)."""


@dataclass(frozen=True)
class Resource:
    path: str  # e.g. /apis/apps/v1 or /api/v1
    plural: str
    namespaced: bool


class KubeApi:
    """Plain HTTPS to the apiserver: JSON in and out, the Status object of every refusal kept (ApiError)."""

    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        self.server = server
        self._token = token
        context = ssl.create_default_context(cafile=str(ca_file))
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   urllib.request.HTTPSHandler(context=context))
        self._discovered: dict[str, dict[str, Resource] | None] = {}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, str] | None = None) -> dict[str, Any]:
        return json.loads(self.send(method, path, body, query) or b"{}")

    def send(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> bytes:
        """The reply's bytes as they came (/readyz answers plain text)."""
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Accept": "application/json",
            "Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=30) as reply:
                return bytes(reply.read())
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                said: dict[str, Any] | str = json.loads(raw)
            except ValueError:
                said = raw
            raise ApiError(e.code, said, f"{method} {path}") from None

    def resource(self, api_version: str, kind: str) -> Resource:
        """Where `kind` of `api_version` lives, from the server's discovery; NotServed when it has none."""
        if api_version not in self._discovered:
            base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            try:
                listing = self.request("GET", base)
                self._discovered[api_version] = {
                    r["kind"]: Resource(base, r["name"], r["namespaced"])
                    for r in listing["resources"] if "/" not in r["name"]}
            except ApiError as e:
                if e.status != 404:
                    raise
                self._discovered[api_version] = None
        kinds = self._discovered[api_version]
        if kinds is None or kind not in kinds:
            # Not remembered as absent: a CRD created later serves it.
            self._discovered.pop(api_version, None)
            raise NotServed(f"{kind} {api_version} is not served by this apiserver")
        return kinds[kind]

    def serves(self, api_version: str, kind: str) -> bool:
        try:
            self.resource(api_version, kind)
            return True
        except NotServed:
            return False

    def path(self, api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
        res = self.resource(api_version, kind)
        where = f"{res.path}/namespaces/{namespace}" if res.namespaced else res.path
        return f"{where}/{res.plural}" + (f"/{name}" if name else "")

    def create(self, obj: dict[str, Any], namespace: str | None = None, *, dry_run: bool = False) -> dict[str, Any]:
        """POSTs `obj` (into `namespace` when the kind is namespaced) and returns what the server stored."""
        ns = namespace or obj.get("metadata", {}).get("namespace")
        path = self.path(obj["apiVersion"], obj["kind"], ns)
        return self.request("POST", path, obj, {"dryRun": "All"} if dry_run else None)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.request("GET", self.path(api_version, kind, namespace, name))

    def wait_established(self, crd: dict[str, Any], timeout_s: float = 30.0) -> None:
        """Waits until a created CRD is Established and its first served version is in discovery."""
        name = crd["metadata"]["name"]
        group = crd["spec"]["group"]
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("served", True))
        kind = crd["spec"]["names"]["kind"]
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
            established = any(c["type"] == "Established" and c["status"] == "True"
                              for c in (got.get("status") or {}).get("conditions") or [])
            if established and self.serves(f"{group}/{version}", kind):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established after {timeout_s} s: {got.get('status')}")
            time.sleep(0.1)


@dataclass(frozen=True)
class Cluster:
    api: KubeApi
    kubeconfig: Path
    log_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(openssl: str, *args: str) -> None:
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)


def _write_certs(openssl: str, d: Path) -> None:
    """A CA, a serving cert it signs for 127.0.0.1, and the service-account signing key pair (all P-256: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(openssl, "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "2",
             "-subj", "/CN=difflens-test-ca")
    _openssl(openssl, "req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
             "-subj", "/CN=kube-apiserver")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
             str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"), "-days", "2",
             "-extfile", str(d / "server.ext"))
    _openssl(openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(d / "sa.key"))
    _openssl(openssl, "pkey", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}


def _start(stack: ExitStack, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    stack.callback(stop)
    return proc


def _wait_until(ready: Any, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            state = f"exited {proc.returncode}" if proc.returncode is not None else f"not ready in {START_TIMEOUT_S} s"
            raise RuntimeError(f"{what} {state}; the end of its log ({log}):\n{tail}")
        time.sleep(0.1)


def _etcd_healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/health", timeout=2) as reply:
            return bool(json.loads(reply.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _apiserver_ready(api: KubeApi) -> bool:
    try:
        return api.send("GET", "/readyz") == b"ok"
    except (ApiError, OSError):
        return False


def _write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    # JSON is YAML: kubectl reads it as it is.
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "difflens-test",
        "clusters": [{"name": "difflens-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "difflens-test", "user": {"token": token}}],
        "contexts": [{"name": "difflens-test", "context": {"cluster": "difflens-test", "user": "difflens-test"}}],
    }, indent=1))


@contextmanager
def k8s_cluster() -> Iterator[Cluster]:
    """etcd + kube-apiserver for the duration of the block; skips (naming `make tools`) when either is missing."""
    apiserver = require("kube-apiserver")
    etcd = require("etcd")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not on PATH (apt-get install openssl): the test apiserver's certificates need it")
    with ExitStack() as stack:
        d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="difflens-k8s-")))
        _write_certs(openssl, d)
        token = secrets.token_hex(16)
        (d / "tokens.csv").write_text(f'{token},difflens-test,difflens-test,"system:masters"\n')

        client_port, peer_port, secure_port = _free_port(), _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_proc = _start(stack, [
            etcd, "--name", "difflens-test", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"difflens-test={peer_url}", "--log-level", "warn",
        ], d / "etcd.log")
        _wait_until(lambda: _etcd_healthy(etcd_url), etcd_proc, "etcd", d / "etcd.log")

        server = f"https://127.0.0.1:{secure_port}"
        api_proc = _start(stack, [
            apiserver, "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(secure_port),
            "--tls-cert-file", str(d / "server.crt"), "--tls-private-key-file", str(d / "server.key"),
            "--cert-dir", str(d / "certs"),
            "--token-auth-file", str(d / "tokens.csv"), "--authorization-mode", "AlwaysAllow",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(d / "sa.pub"), "--service-account-signing-key-file", str(d / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/16",
            # The default reconciler would point the `kubernetes` Service at 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type", "none",
            "--disable-admission-plugins", "ServiceAccount",
            # As kubeadm sets it: a cluster that refuses nothing our chart might legitimately ask for.
            "--allow-privileged=true",
            "--profiling=false",
        ], d / "kube-apiserver.log")
        api = KubeApi(server, token, d / "ca.crt")
        _wait_until(lambda: _apiserver_ready(api), api_proc, "kube-apiserver", d / "kube-apiserver.log")

        _write_kubeconfig(d / "kubeconfig", server, d / "ca.crt", token)
        yield Cluster(api=api, kubeconfig=d / "kubeconfig", log_dir=d)
