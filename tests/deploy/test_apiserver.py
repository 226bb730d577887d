"""The chart's objects stored by a real kube-apiserver 1.20 (tests/support/k8s_cluster.py), read back, and the
server's own refusals of bad ones.

Each CI values file is rendered for the server's version, as `helm install` against it would (the chart then picks
autoscaling/v2beta2, policy/v1beta1 and TCP probes: 1.20 has neither autoscaling/v2, policy/v1 nor gRPC probes),
and created object by object in a namespace of its own. The KEDA ScaledObject CRD is installed from the repository's
copy; KEDA's TriggerAuthentication and the Prometheus operator's kinds get schema-less stand-in CRDs, so that they
are stored (and `helm install` goes through) but not validated: that is the schema check's job (test_helm_chart.py,
kubernetes-validate at a current version). 1.20 drops the ScaledObject CRD's `x-kubernetes-validations` rule (CEL
came in 1.23), so min <= max replicas is not checked here; `scaleTargetRef` required and the minimums are structural,
and are.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import CHART, CI_VALUES, render
from tests.support.k8s_cluster import ApiError, Cluster, KubeApi, NotServed, k8s_cluster
from tests.support.k8s_tools import require

KEDA_CRD = Path(__file__).parent / "crds" / "keda.sh_scaledobjects.yaml"
# Kinds the chart renders whose CRDs the repository has no copy of: stand-ins that accept any object.
STAND_IN_CRDS = [("keda.sh/v1alpha1", "TriggerAuthentication"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                 ("monitoring.coreos.com/v1", "ServiceMonitor")]
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _namespace(api: KubeApi, name: str) -> str:
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture(scope="module")
def cluster():
    with k8s_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> KubeApi:
    return cluster.api


@pytest.fixture(scope="module")
def kube_version(api: KubeApi) -> str:
    """The server's version as helm's --kube-version takes it, e.g. 1.20.2."""
    return str(api.request("GET", "/version")["gitVersion"]).lstrip("v")


def _stand_in_crd(api_version: str, kind: str) -> Obj:
    group, version = api_version.split("/")
    plural = kind.lower() + "s"
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture(scope="module")
def crds(api: KubeApi) -> None:
    """KEDA's ScaledObject CRD as the repository has it (created as is: 1.20 takes apiextensions.k8s.io/v1), and
    the stand-ins."""
    made = [yaml.safe_load(KEDA_CRD.read_text())] + [_stand_in_crd(v, k) for v, k in STAND_IN_CRDS]
    for crd in made:
        api.create(crd)
    for crd in made:
        api.wait_established(crd)


class Scenario:
    """One values file's objects: as rendered, and as the server stored those it serves."""

    def __init__(self, name: str, rendered: list[Obj]) -> None:
        self.name = name
        self.rendered = rendered
        self.stored: dict[tuple[str, str], Obj] = {}
        self.unserved: list[Obj] = []

    def stored_of(self, kind: str) -> list[Obj]:
        return [o for (k, _), o in self.stored.items() if k == kind]


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def scenario(request, api: KubeApi, kube_version: str, crds: None) -> Scenario:
    name = request.param.name.removesuffix("-values.yaml")
    ns = _namespace(api, f"ci-{name}")
    found = Scenario(name, render([request.param], kube_version=kube_version))
    for obj in found.rendered:
        try:
            found.stored[_key(obj)] = api.create(obj, ns)
        except NotServed:
            found.unserved.append(obj)
    return found


# --- comparing what was sent with what was stored ------------------------------------------------------------------

_QUANTITY = re.compile(r"([+-]?[0-9.]+)([a-zA-Z]*)")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}
# Fields holding a resource.Quantity, which the server rewrites in canonical form (2048Mi -> 2Gi, 1 -> "1").
_QUANTITY_PARENTS = {"limits", "requests"}
_QUANTITY_KEYS = {"sizeLimit", "averageValue"}


def _quantity(value: object) -> Decimal | None:
    m = _QUANTITY.fullmatch(str(value))
    if m is None or m.group(2) not in _SUFFIX:
        return None
    return Decimal(m.group(1)) * _SUFFIX[m.group(2)]


def _empty(value: object) -> bool:
    # What the server leaves out when it writes an object back (omitempty): a test of the fields that must survive
    # with such a value (allowPrivilegeEscalation: false, ...) asserts them by name.
    return value is None or value in ({}, [], "", False, 0)


def differences(sent: object, stored: object, path: str = "") -> list[str]:
    """Where `stored` lacks or changed something `sent` has (fields the server added are fine): a field the
    server does not know is dropped, and shows up here."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"{path}: sent a map, stored {stored!r}"]
        out = []
        for k, v in sent.items():
            if k not in stored:
                if not _empty(v):
                    out.append(f"{path}.{k}: sent {v!r}, not stored")
                continue
            if (path.rsplit(".", 1)[-1] in _QUANTITY_PARENTS or k in _QUANTITY_KEYS) and not isinstance(v, dict):
                if _quantity(v) is None or _quantity(v) != _quantity(stored[k]):
                    out.append(f"{path}.{k}: sent {v!r}, stored {stored[k]!r}")
                continue
            out += differences(v, stored[k], f"{path}.{k}")
        return out
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(sent) != len(stored):
            return [f"{path}: sent {sent!r}, stored {stored!r}"]
        return [d for i, (a, b) in enumerate(zip(sent, stored, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]


def _as_sent(obj: Obj) -> Obj:
    """The object as the server is asked to keep it: a Secret's stringData is stored base64-encoded in data."""
    if obj["kind"] != "Secret" or "stringData" not in obj:
        return obj
    out = copy.deepcopy(obj)
    plain = out.pop("stringData")
    out.setdefault("data", {}).update({k: base64.b64encode(str(v).encode()).decode() for k, v in plain.items()})
    return out


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


def _containers(obj: Obj) -> list[Obj]:
    return [c for spec in _pod_specs(obj) for c in spec.get("initContainers", []) + spec["containers"]]


# --- the chart, applied and read back ------------------------------------------------------------------------------

def test_every_object_is_stored(scenario: Scenario) -> None:
    wrong = sorted({(o["apiVersion"], o["kind"]) for o in scenario.unserved})
    assert not wrong, f"{scenario.name}: apiVersion/kind that kube-apiserver 1.20 does not serve: {wrong}"
    assert len(scenario.stored) == len(scenario.rendered)
    assert scenario.stored_of("Deployment"), "no Deployment stored: nothing below would be checked"


def test_stored_objects_keep_every_field_sent(scenario: Scenario) -> None:
    """Labels, selectors, args, env, resources, probes, security contexts, ScaledObject specs: all that was sent
    comes back (a field 1.20 or the CRD's schema does not know would be dropped silently)."""
    problems = {}
    for obj in scenario.rendered:
        stored = scenario.stored.get(_key(obj))
        if stored is not None and (found := differences(_as_sent(obj), stored)):
            problems[" ".join(_key(obj))] = found
    assert not problems, json.dumps(problems, indent=1)


def test_gpu_limits_on_workers_only(scenario: Scenario) -> None:
    """Whole GPUs for each worker container (none in the CPU-only scenario; with a Triton sidecar, the sidecar's
    instead); none for the front, nor for the init containers that copy models: the scheduler would hold a GPU for
    them too."""
    workers = 0
    for dep in scenario.stored_of("Deployment"):
        is_worker = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
        spec = dep["spec"]["template"]["spec"]
        holder = "triton" if any(c["name"] == "triton" for c in spec["containers"]) else "worker"
        for c in spec.get("initContainers", []) + spec["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            where = f"{dep['metadata']['name']}/{c['name']}: {limits}"
            if is_worker and c["name"] == holder and c in spec["containers"] and scenario.name != "cpu-only":
                assert str(limits.get(GPU)).isdigit() and int(limits[GPU]) >= 1, where
                workers += 1
            else:
                assert GPU not in limits, where
        workers += is_worker and scenario.name == "cpu-only"
    assert workers, "no worker container stored"


def test_security_contexts_as_stored(scenario: Scenario) -> None:
    """Every container of every stored workload runs as non-root without privilege escalation or capabilities."""
    checked = 0
    for obj in scenario.stored.values():
        for spec in _pod_specs(obj):
            pod = spec.get("securityContext", {})
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c.get("securityContext", {})
                where = f"{obj['kind']} {obj['metadata']['name']}/{c['name']}"
                assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("privileged") in (None, False), where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                assert (sc.get("seccompProfile") or pod.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
                checked += 1
    assert checked >= 2


def test_selectors_find_their_pods(scenario: Scenario) -> None:
    """What the server accepts but a cluster would leave idle: a Service, PDB or NetworkPolicy selecting no pod
    template of the release, an autoscaler scaling a Deployment that is not there."""
    templates = [o["spec"]["template"]["metadata"]["labels"] for o in scenario.stored.values()
                 if o["kind"] in WORKLOADS]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in templates)

    for svc in scenario.stored_of("Service"):
        assert selects(svc["spec"]["selector"]), f"Service {svc['metadata']['name']} selects no pod template"
    for pdb in scenario.stored_of("PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for pol in scenario.stored_of("NetworkPolicy"):
        assert selects(pol["spec"]["podSelector"]["matchLabels"]), pol["metadata"]["name"]
    deployments = {d["metadata"]["name"] for d in scenario.stored_of("Deployment")}
    for scaler in scenario.stored_of("HorizontalPodAutoscaler") + scenario.stored_of("ScaledObject"):
        target = scaler["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, (scaler["metadata"]["name"], target)


# --- bad values refused by the server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refusals(api: KubeApi, kube_version: str, crds: None) -> tuple[KubeApi, str, dict[str, Obj]]:
    """A namespace for dry runs, and a worker Deployment and its ScaledObject as the KEDA scenario renders them;
    each refusal test first shows the server takes the unchanged object."""
    keda = next(p for p in CI_VALUES if p.name.startswith("keda"))
    objs = render([keda], kube_version=kube_version)
    worker = next(o for o in objs if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"])
    scaled = next(o for o in objs if o["kind"] == "ScaledObject")
    return api, _namespace(api, "refusals"), {"worker": worker, "scaled": scaled}


def _refused(refusals: tuple[KubeApi, str, dict[str, Obj]], which: str, change: Any) -> ApiError:
    api, ns, base = refusals
    api.create(base[which], ns, dry_run=True)  # the unchanged object is fine
    bad = copy.deepcopy(base[which])
    change(bad)
    with pytest.raises(ApiError) as refused:
        api.create(bad, ns, dry_run=True)
    return refused.value


def test_deployment_selector_not_matching_its_pods_is_refused(refusals) -> None:
    e = _refused(refusals, "worker", lambda d: d["spec"]["selector"]["matchLabels"].update({"difflens/model": "x"}))
    assert e.status == 422 and "`selector` does not match template `labels`" in e.message, e


def test_negative_replicas_are_refused(refusals) -> None:
    e = _refused(refusals, "worker", lambda d: d["spec"].update(replicas=-1))
    assert e.status == 422 and "spec.replicas" in e.message and "greater than or equal to 0" in e.message, e


def test_gpu_request_unlike_its_limit_is_refused(refusals) -> None:
    # Extended resources cannot be overcommitted: a request, when given, must equal the limit.
    def ask_two(d: Obj) -> None:
        d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][GPU] = "2"

    e = _refused(refusals, "worker", ask_two)
    assert e.status == 422 and GPU in e.message and "must be equal to" in e.message, e


def test_scaled_object_without_target_is_refused(refusals) -> None:
    e = _refused(refusals, "scaled", lambda s: s["spec"].pop("scaleTargetRef"))
    assert e.status == 422 and "spec.scaleTargetRef: Required value" in e.message, e


def test_scaled_object_negative_min_replicas_is_refused(refusals) -> None:
    e = _refused(refusals, "scaled", lambda s: s["spec"].update(minReplicaCount=-1))
    assert e.status == 422 and "spec.minReplicaCount" in e.message and "greater than or equal to 0" in e.message, e


# --- the operators' tools against the same server ----------------------------------------------------------------

def test_kubectl_1_20_applies_the_rendered_chart(cluster: Cluster, kube_version: str) -> None:
    """`helm template | kubectl apply --dry-run=server` with the server's own kubectl version, through the
    kubeconfig the fixture writes."""
    kubectl = require("kubectl-1.20")
    default = next(p for p in CI_VALUES if p.name.startswith("default"))
    objs = render([default], kube_version=kube_version)
    ns = _namespace(cluster.api, "kubectl")
    done = subprocess.run([kubectl, "--kubeconfig", str(cluster.kubeconfig), "apply", "--dry-run=server", "-n", ns,
                           "-f", "-"], input=yaml.safe_dump_all(objs), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    assert len(said) == len(objs) and all(line.endswith("created (server dry run)") for line in said), done.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_helm_installs_the_chart(cluster: Cluster, kube_version: str, crds: None, values: Path) -> None:
    """`helm install` as an operator runs it: helm 4 asks the server its version and applies server-side, which on
    1.20 refuses what a plain create takes (a quantity written as a number: kubernetes/kubernetes#94275)."""
    helm = require("helm")
    ns = _namespace(cluster.api, "helm-" + values.name.removesuffix("-values.yaml"))
    # No hooks: the ensure-groups Job would never finish without a controller-manager to run it (the Job object
    # itself is checked through the plain create above).
    done = subprocess.run([helm, "--kubeconfig", str(cluster.kubeconfig), "install", "difflens", str(CHART),
                           "--namespace", ns, "--values", str(values), "--no-hooks", "--timeout", "30s"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # What helm sent, not a fresh render: the chart makes a new Redis password on each render.
    manifest = subprocess.run([helm, "--kubeconfig", str(cluster.kubeconfig), "get", "manifest", "difflens",
                               "--namespace", ns], capture_output=True, text=True, timeout=60, check=True).stdout
    sent = [o for o in yaml.safe_load_all(manifest) if o]
    assert {o["kind"] for o in sent} >= {"Deployment", "Service", "ServiceAccount"}
    for obj in sent:
        stored = cluster.api.get(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], ns)
        assert not (d := differences(_as_sent(obj), stored)), (obj["kind"], obj["metadata"]["name"], d)
