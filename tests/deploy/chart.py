"""The Helm chart (helm/difflens) as Kubernetes objects: `helm template` over values files, parsed.

The chart tests (test_helm_chart.py) and the API-server test import `render` and `CI_VALUES` from here. helm comes
from tests.support.k8s_tools: a test that renders without it skips, naming `make tools`.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.k8s_tools import require

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "difflens"
# The values files `helm lint` and the tests render: one scenario each (defaults, KEDA with two models, external
# Redis from an existing Secret, CPU-only, monitoring + NetworkPolicy, the chart's own Redis, a Triton sidecar).
CI_VALUES: list[Path] = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "difflens"  # named like the chart: objects are named `<release>-<component>[-<model>]`
NAMESPACE = "difflens"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


class RenderError(RuntimeError):
    """helm template refused the values: `stderr` says why (a schema error names the field)."""

    def __init__(self, stderr: str) -> None:
        self.stderr = stderr
        super().__init__(stderr.strip())


def template(values_files: list[Path], set_values: dict[str, Any] | None = None, *,
             kube_version: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `helm template` (release RELEASE in NAMESPACE); `set_values` maps dotted keys to any JSON value
    (`--set-json`), applied after the files. `kube_version` sets Capabilities.KubeVersion (e.g. "1.20.5": the chart
    then picks autoscaling/v2beta2, policy/v1beta1 and TCP probes on the front)."""
    cmd = [require("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values_files:
        cmd += ["--values", str(f)]
    for key, value in (set_values or {}).items():
        cmd += ["--set-json", f"{key}={json.dumps(value)}"]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def render(values_files: list[Path], set_values: dict | None = None, *,
           kube_version: str | None = None) -> list[dict]:
    """The chart's objects for these values, in helm's order; RenderError when helm refuses them."""
    done = template(values_files, set_values, kube_version=kube_version)
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def merged_values(values_files: list[Path]) -> dict:
    """The values the chart renders with: values.yaml, then each file over it (maps merge key by key, lists and
    scalars are replaced, as Helm merges them)."""
    out = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in values_files:
        out = _merge(out, yaml.safe_load(f.read_text()) or {})
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- reading the rendered objects ----------------------------------------------------------------------------

def kinds(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise LookupError(f"{kind}/{name}: {len(found)} rendered")
    return found[0]


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    for o in objects:
        if o["kind"] in WORKLOADS:
            tpl = o["spec"]["template"]
            yield f"{o['kind']}/{o['metadata']['name']}", tpl["metadata"], tpl["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def workers(objects: list[dict]) -> dict[str, dict]:
    """model name -> its worker Deployment."""
    return {d["metadata"]["labels"]["difflens/model"]: d for d in kinds(objects, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}


def front(objects: list[dict]) -> dict:
    return one(objects, "Deployment", f"{RELEASE}-front")


def env(container: dict) -> dict[str, Any]:
    """name -> value, or ('secret', name, key) for a secretKeyRef."""
    out: dict[str, Any] = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = ("secret", ref["name"], ref["key"]) if ref else e.get("value")
    return out
