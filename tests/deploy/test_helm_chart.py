"""The Helm chart (helm/difflens): `helm lint --strict` with each CI values file, every rendered built-in object
valid for Kubernetes 1.33 (kubernetes-validate --strict), each ScaledObject valid against KEDA's own CRD, bad values
refused by the schema, and what the objects must say: hardened pods, probes, GPUs on workers only, selectors that
select, KEDA on the stream and group the worker code reads, a grace period that outlasts a worker's drain.

Each CI values file is rendered once per module (helm template takes ~0.2 s).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from difflens.cli import build_parser
from difflens.queue.redis_work import GROUP, work_stream
from tests.deploy.chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    RenderError,
    containers,
    env,
    front,
    kinds,
    merged_values,
    one,
    pod_specs,
    render,
    template,
    workers,
)
from tests.support.k8s_tools import require

KUBERNETES = "1.33"
KEDA_CRD = Path(__file__).parent / "crds" / "keda.sh_scaledobjects.yaml"
ALERTS = CHART / "files" / "alerts.yaml"
DEPLOY_ALERTS = CHART.parents[1] / "deploy" / "prometheus" / "alerts.yaml"
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
GPU = "nvidia.com/gpu"
FULLNAME = RELEASE  # a release named like the chart: its objects are named `<release>-<component>`
SCENARIOS = {"default", "keda-two-models", "external-redis", "cpu-only", "monitoring", "own-redis", "triton"}


def scenario(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


# --- rendering, once -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict]]:
    require("helm")
    return {scenario(f): render([f]) for f in CI_VALUES}


@pytest.fixture(params=CI_VALUES, ids=scenario)
def case(request, renders) -> tuple[str, list[dict], dict]:
    """(scenario, its objects, the values it renders with)."""
    name = scenario(request.param)
    return name, renders[name], merged_values([request.param])


def model_args(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--model"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def model_names(values: dict) -> list[str]:
    return [m["name"] for m in values["models"]]


# --- helm lint, and the CI values themselves -------------------------------------------------------------------

def test_ci_values_cover_the_scenarios():
    assert {scenario(f) for f in CI_VALUES} == SCENARIOS


@pytest.mark.parametrize("values_file", CI_VALUES, ids=scenario)
def test_helm_lint_strict(values_file):
    done = subprocess.run([require("helm"), "lint", "--strict", str(CHART), "--values", str(values_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_every_object_carries_the_recommended_labels(case):
    _, objects, _ = case
    for o in objects:
        labels = o["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "part-of"):
            assert labels.get(f"app.kubernetes.io/{key}"), f"{o['kind']}/{o['metadata']['name']}: {key}"
        assert labels["helm.sh/chart"].startswith("difflens-")
        assert labels["app.kubernetes.io/instance"] == RELEASE
    for where, meta, _ in pod_specs(objects):
        assert meta["labels"].get("app.kubernetes.io/component"), where


# --- validation against Kubernetes' and KEDA's schemas ----------------------------------------------------------

def test_builtin_objects_are_valid_kubernetes(case):
    _, objects, _ = case
    builtin = [o for o in objects if not o["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert builtin
    for o in builtin:
        try:
            kubernetes_validate.validate(o, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_the_kubernetes_check_can_fail(renders):
    deployment = front(renders["default"])
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def closed(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, as the API server's strict field validation refuses them
    (the schema itself leaves them open: the server prunes them)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return closed(version["schema"]["openAPIV3Schema"])


def test_scaledobjects_are_valid_against_the_keda_crd(case, scaledobject_schema):
    _, objects, _ = case
    validator = jsonschema.Draft7Validator(scaledobject_schema)
    for so in kinds(objects, "ScaledObject"):
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(so)]
        assert not errors, f"{so['metadata']['name']}: {errors}"
        spec = so["spec"]  # the CRD's CEL rule
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


def test_the_crd_check_can_fail(scaledobject_schema):
    bad = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "redis-streams", "metadata": {}}],
                    "maxReplicas": 3}}
    assert any("maxReplicas" in e.message for e in jsonschema.Draft7Validator(scaledobject_schema).iter_errors(bad))


def test_custom_objects_have_their_required_fields(case):
    _, objects, _ = case
    custom = [o for o in objects if o["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert {o["kind"] for o in custom} <= {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
    assert all(o["metadata"]["name"] for o in custom)
    for ta in kinds(objects, "TriggerAuthentication"):
        assert ta["apiVersion"] == "keda.sh/v1alpha1"
        assert ta["spec"]["secretTargetRef"]
        for ref in ta["spec"]["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"} and all(ref.values())
    for sm in kinds(objects, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["spec"]["selector"]["matchLabels"] and sm["spec"]["endpoints"]
        assert all(e["port"] for e in sm["spec"]["endpoints"])
    for pr in kinds(objects, "PrometheusRule"):
        assert pr["apiVersion"] == "monitoring.coreos.com/v1"
        for group in pr["spec"]["groups"]:
            assert group["name"] and group["rules"]
            assert all(r["alert"] and r["expr"] for r in group["rules"])


# --- bad values: refused at helm template time, naming the field -------------------------------------------------

@pytest.mark.parametrize(("set_values", "named"), [
    ({"front.replicas": "two"}, "/front/replicas"),
    ({"worker.gpuCount": 2}, "gpuCount"),
    ({"models": [{"name": "SD_15", "hostPath": {"path": "/m"}}]}, "/models/0/name"),
    ({"models": [{"name": "sd"}]}, "/models/0"),
    ({"models": [{"name": "sd", "hostPath": {"path": "/m"}, "pvc": {"claimName": "m"}}]}, "/models/0"),
    ({"models": []}, "/models"),
    ({"redis.deploy.image": {"repository": "redis", "tag": "6.2"}}, "/redis/deploy/image/tag"),
    ({"worker.dtype": "float8"}, "/worker/dtype"),
    ({"triton.url": "grpc://triton:8001"}, "/triton/url"),
    ({"models": [{"name": "sd", "hostPath": {"path": "/m"}, "tritonModel": "sd 15"}]}, "/models/0/tritonModel"),
    ({"triton.callTimeoutSeconds": 0}, "/triton/callTimeoutSeconds"),
], ids=["wrong-type", "unknown-key", "bad-model-name", "missing-volume", "two-volumes", "no-models", "redis-6",
        "bad-dtype", "triton-url-scheme", "bad-triton-model", "zero-call-timeout"])
def test_schema_refuses_bad_values(set_values, named):
    done = template([], set_values)
    assert done.returncode != 0
    assert "schema" in done.stderr and named in done.stderr, done.stderr


@pytest.mark.parametrize(("set_values", "said"), [
    ({"worker.terminationGracePeriodSeconds": 90}, "must exceed drainGraceSeconds + maxStepSeconds = 90"),
    ({"front.terminationGracePeriodSeconds": 30}, "front.terminationGracePeriodSeconds 30 must exceed"),
    ({"worker.replicas": {"min": 5, "max": 2}}, "min (5) is above max (2)"),
    ({"gpu.enabled": False, "worker.device": "cuda"}, "device cuda without a GPU"),
    ({"front.resources": {"limits": {GPU: 1}}}, "the front never uses a GPU"),
    ({"worker.resources": {"limits": {GPU: 1}}}, "leave nvidia.com/gpu out"),
    ({"keda.enabled": True}, "set redis.external.host"),
    ({"models": [{"name": "a", "hostPath": {"path": "/a"}}, {"name": "a", "hostPath": {"path": "/b"}}]},
     "the name a is given twice"),
    ({"models": [{"name": "a", "image": {"repository": "models/a", "path": "/m"}}]}, "give a tag or a digest"),
    ({"triton.url": "triton:8001", "triton.sidecar.enabled": True}, "are alternatives; set one"),
    ({"triton.sidecar.enabled": True}, "triton.sidecar.modelRepository: the volume holding"),
    ({"triton.sidecar.enabled": True, "triton.sidecar.modelRepository": {"emptyDir": {}}, "worker.device": "cuda"},
     "the pod's GPUs are the Triton container's"),
], ids=["worker-grace", "front-grace", "min-above-max", "cuda-on-cpu", "gpu-front", "gpu-by-hand", "keda-no-host",
        "duplicate-model", "untagged-model-image", "triton-url-and-sidecar", "sidecar-no-repository",
        "sidecar-cuda-worker"])
def test_template_refuses_inconsistent_values(set_values, said):
    with pytest.raises(RenderError) as refused:
        render([], set_values)
    assert said in refused.value.stderr


# --- pods: hardened, probed, right-sized ----------------------------------------------------------------------------

def test_every_pod_and_container_is_hardened(case):
    _, objects, _ = case
    for where, _, spec in pod_specs(objects):
        assert spec["automountServiceAccountToken"] is False, where
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in containers(spec):
            sc = c["securityContext"]
            what = f"{where} {c['name']}"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
    sa = kinds(objects, "ServiceAccount")
    assert all(a["automountServiceAccountToken"] is False for a in sa)


def test_front_probes_are_native_grpc_health_and_liveness_is_the_process(case):
    """Readiness follows the queue (NOT_SERVING while Redis is unreachable); liveness must not, or a Redis outage
    would restart every front."""
    _, objects, _ = case
    c = front(objects)["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "difflens.v1.Explainer"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "metrics": 9090}


def test_front_service_names_its_ports(case):
    _, objects, _ = case
    svc = one(objects, "Service", f"{FULLNAME}-front")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["appProtocol"] == "grpc" and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == 9090


def test_worker_probes_read_the_metrics_port(case):
    _, objects, values = case
    for model, d in workers(objects).items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
        assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        startup = c["startupProbe"]
        allowance = values["worker"]["probes"]["startup"]
        assert startup["failureThreshold"] * startup["periodSeconds"] == \
            allowance["failureThreshold"] * allowance["periodSeconds"] >= 300, model


def test_default_model_load_allowance_is_ten_minutes(renders):
    for d in workers(renders["default"]).values():
        startup = d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] == 600


def gpu_asked(container: dict) -> bool:
    res = container.get("resources", {})
    return any(GPU in res.get(part, {}) for part in ("limits", "requests"))


def test_gpus_go_to_workers_only(case):
    name, objects, values = case
    for where, _, spec in pod_specs(objects):
        if "worker" not in where:
            assert not any(gpu_asked(c) for c in containers(spec)), where
    cpu_only = not values["gpu"]["enabled"]
    sidecar = values["triton"]["sidecar"]["enabled"]  # the pod's GPUs are then the Triton container's
    for model, d in workers(objects).items():
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        entry = next(m for m in values["models"] if m["name"] == model)
        gpus = 0 if cpu_only else entry.get("gpus", values["gpu"]["count"])
        holder = spec["containers"][1] if sidecar else c
        assert [x["name"] for x in spec["containers"]] == (["worker", "triton"] if sidecar else ["worker"])
        assert int(holder["resources"].get("limits", {}).get(GPU, 0)) == gpus, f"{name} {model}"
        assert not any(gpu_asked(i) for i in spec.get("initContainers", [])), model
        tolerations = spec.get("tolerations", [])
        if sidecar:
            assert env(c)["DIFFLENS_DEVICE"] == "cpu" and not gpu_asked(c), model
        if gpus:
            assert sidecar or env(c)["DIFFLENS_DEVICE"] == "cuda"
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert env(c)["DIFFLENS_DEVICE"] == "cpu" and env(c)["DIFFLENS_DTYPE"] == "float32"
            assert not any(t.get("key") == GPU for t in tolerations), model
            assert "runtimeClassName" not in spec, model


def test_quantities_are_strings(case):
    """Server-side apply (helm 4's default) refuses a number where a Quantity belongs: "expected string"."""
    _, objects, _ = case
    for where, _, spec in pod_specs(objects):
        for c in containers(spec):
            for part, quantities in c.get("resources", {}).items():
                assert all(isinstance(q, str) for q in quantities.values()), f"{where} {c['name']} {part}"


def test_cpu_only_mode_asks_for_no_gpu_at_all(renders):
    objects = renders["cpu-only"]
    assert workers(objects)
    for where, _, spec in pod_specs(objects):
        assert not any(gpu_asked(c) for c in containers(spec)), where
        assert "runtimeClassName" not in spec, where  # gpu.runtimeClassName is set in that file, and ignored


def test_gpu_workers_get_the_gpu_runtime_class_and_nodes(renders):
    for d in workers(renders["keda-two-models"]).values():
        spec = d["spec"]["template"]["spec"]
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert "runtimeClassName" not in front(renders["keda-two-models"])["spec"]["template"]["spec"]


# --- commands: one model per worker, every model on the front ---------------------------------------------------------

def test_each_worker_serves_its_own_model_only(case):
    _, objects, values = case
    deployments = workers(objects)
    assert sorted(deployments) == sorted(model_names(values))
    for model, d in deployments.items():
        spec = d["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        assert args[0] == "worker"
        assert model_args(args) == [f"{model}=/models/{model}"]
        assert args[args.index("--metrics-port") + 1] == "9090" and args[args.index("--metrics-host") + 1] == "0.0.0.0"
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"].startswith("/models/")]
        assert [(m["mountPath"], m["readOnly"]) for m in mounts] == [(f"/models/{model}", True)]


def test_front_serves_every_model(case):
    _, objects, values = case
    spec = front(objects)["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"][:9] == ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090",
                             "--metrics-host", "0.0.0.0"]
    assert model_args(c["args"]) == [f"{m}=/models/{m}" for m in model_names(values)]
    mounts = {m["mountPath"]: m["readOnly"] for m in c["volumeMounts"] if m["mountPath"].startswith("/models/")}
    assert mounts == {f"/models/{m}": True for m in model_names(values)}


def test_fronts_read_the_api_keys_from_the_secret_and_workers_never_see_them(case):
    _, objects, values = case
    spec = front(objects)["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[args.index("--auth-keys") + 1] == "/etc/difflens/auth/keys.json" and "--no-auth" not in args
    # the folder, never a subPath: the kubelet's swap of a changed Secret reaches only a mounted folder
    assert {"name": "auth-keys", "mountPath": "/etc/difflens/auth", "readOnly": True} in \
        spec["containers"][0]["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "auth-keys"]
    assert volume["secret"]["secretName"] == values["auth"]["existingSecret"] == "difflens-auth"
    assert volume["secret"]["items"] == [{"key": "keys.json", "path": "keys.json"}]
    for where, _, pod in pod_specs(objects):
        if where != f"Deployment/{RELEASE}-front":
            assert all(v.get("secret", {}).get("secretName") != "difflens-auth" for v in pod.get("volumes", [])), where


def test_a_chart_without_api_keys_says_so_with_no_auth():
    spec = front(render([], {"auth": {"enabled": False}}))["spec"]["template"]["spec"]
    assert "--no-auth" in spec["containers"][0]["args"] and "--auth-keys" not in spec["containers"][0]["args"]
    assert all(v["name"] != "auth-keys" for v in spec["volumes"])
    done = template([], {"auth.existingSecret": "Not_A_Secret_Name"})
    assert done.returncode != 0 and "/auth/existingSecret" in done.stderr


def test_commands_parse_with_the_cli(case):
    _, objects, _ = case
    parser = build_parser()
    for where, _, spec in pod_specs(objects):
        c = spec["containers"][0]
        if "redis" in where:
            continue
        args = parser.parse_args(c["args"])  # an unknown flag exits: SystemExit fails the test
        assert args.command == c["args"][0], where
        if args.command in ("serve", "worker"):
            assert (args.metrics_port, args.metrics_host) == (9090, "0.0.0.0"), where


def test_pods_take_redis_from_one_secret(case):
    _, objects, values = case
    expected = {"DIFFLENS_QUEUE": values["queueName"]}
    for where, _, spec in pod_specs(objects):
        if "redis" in where:
            continue
        e = env(spec["containers"][0])
        for key in ("DIFFLENS_REDIS_URL", "DIFFLENS_REDIS_PASSWORD", "DIFFLENS_QUEUE"):
            expected.setdefault(key, e.get(key))
            assert e.get(key) == expected[key], f"{where} {key}"
    assert expected["DIFFLENS_REDIS_URL"][0] == "secret"
    secret_name = expected["DIFFLENS_REDIS_URL"][1]
    secrets = kinds(objects, "Secret")
    if values["redis"]["deploy"]["enabled"] or values["redis"]["external"]["url"]:
        data = one(objects, "Secret", secret_name)["data"]
        assert expected["DIFFLENS_REDIS_URL"][2] in data
        if expected["DIFFLENS_REDIS_PASSWORD"]:
            assert expected["DIFFLENS_REDIS_PASSWORD"][2] in data
    else:
        assert secret_name == values["redis"]["external"]["existingSecret"] and not secrets


def test_external_secret_keys_are_the_ones_named(renders):
    e = env(front(renders["external-redis"])["spec"]["template"]["spec"]["containers"][0])
    assert e["DIFFLENS_REDIS_URL"] == ("secret", "elasticache-auth", "url")
    assert e["DIFFLENS_REDIS_PASSWORD"] == ("secret", "elasticache-auth", "auth-token")


def test_model_images_copy_configs_to_the_front_and_everything_to_workers(renders):
    objects = renders["external-redis"]  # an image model with a repository of its own
    f_init = front(objects)["spec"]["template"]["spec"]["initContainers"]
    w_init = workers(objects)["sdxl"]["spec"]["template"]["spec"]["initContainers"]
    assert [i["image"] for i in f_init] == [i["image"] for i in w_init] == ["registry.example.com/models/sdxl:1.0"]
    assert "-name '*.json' -o -name '*.txt'" in f_init[0]["args"][0]
    assert "cp -R -L . " in w_init[0]["args"][0]
    own = renders["default"]  # no repository: the pod's own image, which ships the shapes model
    assert front(own)["spec"]["template"]["spec"]["initContainers"][0]["image"].startswith("difflens-front:")
    assert workers(own)["default"]["spec"]["template"]["spec"]["initContainers"][0]["image"].startswith(
        "difflens-worker:")


def run_copy(init: dict, source: Path, dest: Path) -> None:
    e = {v["name"]: v["value"] for v in init["env"]}
    assert e["MODEL_DST"].startswith("/models/")
    done = subprocess.run(init["command"] + init["args"], env={"PATH": "/usr/bin:/bin", "MODEL_SRC": str(source),
                                                                 "MODEL_DST": str(dest)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_model_copy_scripts_run(tmp_path, renders):
    objects = renders["default"]
    src = tmp_path / "model"
    for rel, data in (("model_index.json", "{}"), ("unet/config.json", "{}"), ("tokenizer/merges.txt", "a b"),
                      ("unet/diffusion_pytorch_model.safetensors", "weights"), ("text_encoder/model.bin", "w")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(data)
    (src / "tokenizer" / "vocab.json").symlink_to(src / "model_index.json")  # a Hugging Face cache's links

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    front_copy, worker_copy = tmp_path / "front", tmp_path / "worker"
    front_copy.mkdir(), worker_copy.mkdir()
    run_copy(front(objects)["spec"]["template"]["spec"]["initContainers"][0], src, front_copy)
    run_copy(workers(objects)["default"]["spec"]["template"]["spec"]["initContainers"][0], src, worker_copy)
    assert files(front_copy) == {"model_index.json", "unet/config.json", "tokenizer/merges.txt",
                                 "tokenizer/vocab.json"}
    assert files(worker_copy) == files(src)
    assert not (worker_copy / "tokenizer" / "vocab.json").is_symlink()


# --- scaling, draining ------------------------------------------------------------------------------------------

def test_termination_grace_outlasts_drain_and_one_step(case):
    _, objects, values = case
    w = values["worker"]
    for model, d in workers(objects).items():
        entry = next(m for m in values["models"] if m["name"] == model)
        step = entry.get("maxStepSeconds", w["maxStepSeconds"])
        spec = d["spec"]["template"]["spec"]
        drain = float(env(spec["containers"][0])["DIFFLENS_DRAIN_GRACE_S"])
        assert drain == entry.get("drainGraceSeconds", w["drainGraceSeconds"])
        assert spec["terminationGracePeriodSeconds"] > drain + step, model
    spec = front(objects)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > float(env(spec["containers"][0])["DIFFLENS_DRAIN_GRACE_S"])


def test_a_longer_grace_period_is_taken():
    (d,) = workers(render([], {"worker.terminationGracePeriodSeconds": 600})).values()
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


def test_scaledobjects_scale_each_model_on_its_own_stream(case):
    _, objects, values = case
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in kinds(objects, "ScaledObject")}
    if not values["keda"]["enabled"]:
        assert not scaled
        return
    deployments = workers(objects)
    assert sorted(scaled) == sorted(d["metadata"]["name"] for d in deployments.values())
    auths = {a["metadata"]["name"]: a for a in kinds(objects, "TriggerAuthentication")}
    password = env(front(objects)["spec"]["template"]["spec"]["containers"][0])["DIFFLENS_REDIS_PASSWORD"]
    for model, d in deployments.items():
        so = scaled[d["metadata"]["name"]]
        spec = so["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": d["metadata"]["name"]}
        assert "replicas" not in d["spec"], "KEDA owns the replica count"
        entry = next(m for m in values["models"] if m["name"] == model)
        bounds = {**values["worker"]["replicas"], **entry.get("replicas", {})}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (bounds["min"], bounds["max"])
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"] > 0
        lag, pending = spec["triggers"]
        for trigger in (lag, pending):
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams"
            assert meta["stream"] == work_stream(values["queueName"], model)
            assert meta["consumerGroup"] == GROUP
            host, port = meta["address"].rsplit(":", 1)
            assert host and port.isdigit()
            if password:
                auth = auths[trigger["authenticationRef"]["name"]]
                assert auth["spec"]["secretTargetRef"] == [
                    {"parameter": "password", "name": password[1], "key": password[2]}]
        assert lag["metadata"]["activationLagCount"] == "0" and int(lag["metadata"]["lagCount"]) >= 1
        assert "pendingEntriesCount" not in lag["metadata"]
        assert int(pending["metadata"]["pendingEntriesCount"]) >= 1 and "lagCount" not in pending["metadata"]


def test_keda_reads_redis_where_the_values_say(renders):
    (lag, _), (lag_own, _) = (next(iter(kinds(renders[n], "ScaledObject")))["spec"]["triggers"]
                              for n in ("keda-two-models", "own-redis"))
    assert lag["metadata"]["address"] == "redis.data.svc.cluster.local:6380"
    assert (lag["metadata"]["databaseIndex"], lag["metadata"]["enableTLS"]) == ("2", "false")
    assert lag_own["metadata"]["address"] == f"{FULLNAME}-redis.{NAMESPACE}.svc:6379"  # from KEDA's namespace too
    (tls, _) = next(iter(kinds(renders["monitoring"], "ScaledObject")))["spec"]["triggers"]
    assert tls["metadata"]["address"] == "redis.internal.example.com:6380"  # from the rediss:// url
    assert tls["metadata"]["enableTLS"] == "true"


def test_without_keda_workers_have_a_fixed_count_or_a_cpu_hpa(renders):
    for d in workers(renders["default"]).values():
        assert d["spec"]["replicas"] == 1
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in kinds(renders["cpu-only"], "HorizontalPodAutoscaler")}
    for d in workers(renders["cpu-only"]).values():
        hpa = hpas[d["metadata"]["name"]]
        assert "replicas" not in d["spec"]
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] == 3
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_front_has_an_hpa_and_a_pdb(case):
    _, objects, values = case
    f = values["front"]
    hpa = [h for h in kinds(objects, "HorizontalPodAutoscaler") if h["metadata"]["name"] == f"{FULLNAME}-front"]
    assert len(hpa) == int(f["autoscaling"]["enabled"])
    assert ("replicas" in front(objects)["spec"]) != f["autoscaling"]["enabled"]
    (pdb,) = kinds(objects, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], front(objects)["spec"]["template"]["metadata"]["labels"])


def test_consumer_groups_hook_job(case):
    _, objects, values = case
    jobs = kinds(objects, "Job")
    if not values["keda"]["enabled"]:
        assert not jobs
        return
    (job,) = jobs
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert sorted(hooks) == ["post-install", "post-upgrade"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    f = front(objects)["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f["image"]
    assert c["args"][0] == "ensure-groups"
    assert model_args(c["args"]) == model_args(f["args"])
    for key in ("DIFFLENS_REDIS_URL", "DIFFLENS_REDIS_PASSWORD", "DIFFLENS_QUEUE"):
        assert env(c).get(key) == env(f).get(key)


def test_the_hook_job_can_be_left_out():
    objects = render([], {"keda": {"enabled": True, "createConsumerGroups": False}, "redis.external.host": "r"})
    assert kinds(objects, "ScaledObject") and not kinds(objects, "Job")


# --- selectors, network, monitoring ---------------------------------------------------------------------------------

def test_selectors_select_the_pods_they_mean(case):
    _, objects, _ = case
    pods = {where: meta["labels"] for where, meta, _ in pod_specs(objects)}
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            assert matches(o["spec"]["selector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"])
    for workload in workers(objects).values():  # no worker's selector takes another model's pods
        chosen = [w for w, labels in pods.items() if matches(workload["spec"]["selector"]["matchLabels"], labels)]
        assert chosen == [f"Deployment/{workload['metadata']['name']}"]
    for svc in kinds(objects, "Service"):
        chosen = {w for w, labels in pods.items() if matches(svc["spec"]["selector"], labels)}
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert chosen and all(pods[w]["app.kubernetes.io/component"] == component for w in chosen), svc
    for np in kinds(objects, "NetworkPolicy"):
        assert any(matches(np["spec"]["podSelector"]["matchLabels"], labels) for labels in pods.values()), np
    names = {o["metadata"]["name"] for o in kinds(objects, "Deployment")}
    for scaler in kinds(objects, "HorizontalPodAutoscaler") + kinds(objects, "ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] in names


def policy(objects: list[dict], component: str) -> dict:
    return one(objects, "NetworkPolicy", f"{FULLNAME}-{component}")["spec"]


def test_network_policies(renders):
    objects = renders["monitoring"]
    values = yaml.safe_load((CHART / "ci" / "monitoring-values.yaml").read_text())["networkPolicy"]
    grpc, metrics = policy(objects, "front")["ingress"]
    assert grpc["ports"] == [{"port": "grpc", "protocol": "TCP"}] and grpc["from"] == values["clients"]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}] and metrics["from"] == values["metricsScrapers"]
    assert policy(objects, "worker")["ingress"] == [metrics]
    assert policy(objects, "ensure-groups")["ingress"] == []
    for component in ("front", "worker", "ensure-groups"):
        spec = policy(objects, component)
        assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
        dns, redis = spec["egress"][:2]
        assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
        assert redis == {"ports": [{"port": 6380, "protocol": "TCP"}], "to": values["externalRedis"]}


def test_only_difflens_and_keda_reach_the_charts_redis(renders):
    objects = renders["own-redis"]
    spec = policy(objects, "redis")
    assert spec["egress"] == []
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    allowed = [p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in rule["from"]
               if "namespaceSelector" not in p]
    assert sorted(allowed) == ["ensure-groups", "front", "worker"]
    keda = [p for p in rule["from"] if "namespaceSelector" in p]
    assert keda and keda[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "keda-operator"
    redis_pod = one(objects, "StatefulSet", f"{FULLNAME}-redis")["spec"]["template"]["metadata"]["labels"]
    for component in ("front", "worker", "ensure-groups"):
        (to,) = policy(objects, component)["egress"][1]["to"]
        assert matches(to["podSelector"]["matchLabels"], redis_pod)


def test_the_charts_redis(renders):
    objects = renders["own-redis"]
    sts = one(objects, "StatefulSet", f"{FULLNAME}-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("redis:7.")
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes"
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    secret = one(objects, "Secret", f"{FULLNAME}-redis")
    assert env(c)["REDIS_PASSWORD"] == ("secret", secret["metadata"]["name"], "redis-password")
    assert set(secret["data"]) == {"redis-url", "redis-password"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"


def test_service_monitors_scrape_front_and_workers(renders):
    objects = renders["monitoring"]
    services = kinds(objects, "Service")
    for component in ("front", "worker"):
        sm = one(objects, "ServiceMonitor", f"{FULLNAME}-{component}")
        (svc,) = [s for s in services if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def worker_settings_of(container: dict):
    """The engine Settings a worker container's environment makes, as `difflens worker` builds them at start-up."""
    from difflens.config import Settings

    return Settings.from_env({k: v for k, v in env(container).items() if k.startswith("DIFFLENS_")
                              and k in ("DIFFLENS_DEVICE", "DIFFLENS_DTYPE", "DIFFLENS_UNET_BACKEND",
                                        "DIFFLENS_TRITON_URL", "DIFFLENS_TRITON_MODEL", "DIFFLENS_TRITON_WAIT_S",
                                        "DIFFLENS_TRITON_CALL_TIMEOUT_S")})


def test_triton_sidecar_serves_each_worker_pod_on_localhost(renders):
    objects = renders["triton"]
    values = merged_values([CHART / "ci" / "triton-values.yaml"])
    sidecar = values["triton"]["sidecar"]
    for model, d in workers(objects).items():
        spec = d["spec"]["template"]["spec"]
        worker, triton = spec["containers"]
        settings = worker_settings_of(worker)
        assert (settings.unet_backend, settings.triton_url, settings.device) == ("triton", "127.0.0.1:8001", "cpu")
        assert (settings.triton_wait_s, settings.triton_call_timeout_s) == (values["triton"]["waitSeconds"],
                                                                            values["triton"]["callTimeoutSeconds"])
        assert settings.triton_model(model) == {"sd15": "sd15-unet-fp16", "shapes": "shapes"}[model]
        assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
        assert triton["args"][:5] == ["tritonserver", "--model-repository=/triton/models", "--grpc-port=8001",
                                      "--http-port=8000", "--metrics-port=8002"]
        assert triton["args"][5:] == sidecar["extraArgs"]
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == \
            {"triton-grpc": 8001, "triton-http": 8000, "triton-metrics": 8002}
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "triton-http"}
        assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "triton-http"}
        mount = next(m for m in triton["volumeMounts"] if m["name"] == "triton-models")
        assert mount == {"name": "triton-models", "mountPath": "/triton/models", "readOnly": True}
        volume = next(v for v in spec["volumes"] if v["name"] == "triton-models")
        assert volume["persistentVolumeClaim"] == sidecar["modelRepository"]["persistentVolumeClaim"]
    # Prometheus scrapes the sidecars' nv_inference_* through the workers' headless Service
    sm = one(objects, "ServiceMonitor", f"{FULLNAME}-worker")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics", "triton-metrics"]
    svc = one(objects, "Service", f"{FULLNAME}-worker")
    assert {"name": "triton-metrics", "port": 8002, "targetPort": "triton-metrics", "protocol": "TCP",
            "appProtocol": "http"} in svc["spec"]["ports"]
    (metrics,) = policy(objects, "worker")["ingress"]
    assert {"port": "triton-metrics", "protocol": "TCP"} in metrics["ports"]


def test_an_external_triton_keeps_the_workers_gpus_and_opens_its_port():
    objects = render([CHART / "ci" / "monitoring-values.yaml"],
                     {"triton.url": "triton.inference.svc:8001",
                      "models": [{"name": "sd15", "hostPath": {"path": "/m/sd15"}, "tritonModel": "sd15-trt"},
                                 {"name": "sdxl", "hostPath": {"path": "/m/sdxl"}}]})
    for model, d in workers(objects).items():
        spec = d["spec"]["template"]["spec"]
        (worker,) = spec["containers"]
        settings = worker_settings_of(worker)
        assert (settings.unet_backend, settings.triton_url, settings.device) == \
            ("triton", "triton.inference.svc:8001", "cuda")
        assert settings.triton_model(model) == {"sd15": "sd15-trt", "sdxl": "sdxl"}[model]
        assert worker["resources"]["limits"][GPU] == "1"
    assert {"ports": [{"port": 8001, "protocol": "TCP"}]} in policy(objects, "worker")["egress"]
    assert {"ports": [{"port": 8001, "protocol": "TCP"}]} not in policy(objects, "front")["egress"]
    sm = one(objects, "ServiceMonitor", f"{FULLNAME}-worker")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]  # an external server is scraped on its own


def test_prometheus_rule_carries_the_alert_file(renders):
    (rule,) = kinds(renders["monitoring"], "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_deploy_alerts_are_the_charts_alerts():
    """One rules file: Helm reads only files inside the chart, so helm/difflens/files/alerts.yaml is the source and
    the compose stack's deploy/prometheus/alerts.yaml (promtool's unit tests run on it) is a link to it."""
    assert DEPLOY_ALERTS.is_symlink() and DEPLOY_ALERTS.resolve() == ALERTS.resolve()


# --- older clusters, values documentation ------------------------------------------------------------------------

def test_kubernetes_1_20_gets_the_apis_it_serves():
    objects = render([CHART / "ci" / "own-redis-values.yaml"], kube_version="1.20.5")
    assert {o["apiVersion"] for o in kinds(objects, "HorizontalPodAutoscaler")} == {"autoscaling/v2beta2"}
    assert {o["apiVersion"] for o in kinds(objects, "PodDisruptionBudget")} == {"policy/v1beta1"}
    c = front(objects)["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):
        assert "grpc" not in c[probe] and c[probe]["tcpSocket"] == {"port": "grpc"}


def documented_keys(text: str) -> Iterator[tuple[str, bool]]:
    """(dotted key, whether a `# --` comment documents it or a parent) for each key of values.yaml."""
    stack: list[tuple[int, str, bool]] = []
    pending = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = any(doc for _, _, doc in stack)
        stack.append((indent, key, pending or inherited))
        yield ".".join(k for _, k, _ in stack), pending or inherited
        pending = False


def test_every_value_is_documented():
    text = (CHART / "values.yaml").read_text()
    top = set(yaml.safe_load(text))
    keys = dict(documented_keys(text))
    assert top <= set(keys)
    undocumented = [k for k, doc in keys.items() if not doc and "." in k and not any(
        other.startswith(k + ".") for other in keys)]
    assert not undocumented


def test_values_yaml_passes_its_own_schema():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))
