"""The deploy files hold together without Docker: the Dockerfiles' structure (stages, pinned bases, non-root user,
what the final image carries), their and compose's commands against the real CLI parser, the compose stack's
wiring (Redis persistence, scrape targets, Grafana provisioning) and the dashboard's PromQL against metrics.py."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from difflens.cli import build_parser
from tests.support.promtool import MISSING, declared_series, promql_problems, promtool_run

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FRONT = DEPLOY / "docker" / "front.Dockerfile"
WORKER = DEPLOY / "docker" / "worker.Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "difflens.json"
SHIPPED_IN_IMAGE = "/opt/difflens/models/shapes"
# an exact release in the tag (3.11.14-slim-bookworm, v3.5.0, 7.4.2), or a digest
PINNED_TAG = re.compile(r"^[^@\s]+:[^:/@\s]*\d+\.\d+\.\d+[^:/@\s]*$|@sha256:[0-9a-f]{64}$")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "cmake", "grpcio-tools", "grpc_tools", "protoc",
               "python3-dev", "pip install")
ENGINE_PACKAGES = ("torch", "diffusers", "transformers")


# --- a small Dockerfile reader -------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def text(self) -> str:
        return "\n".join(f"{kw} {rest}" for kw, rest in self.instructions)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: `\\` continues a line, comment lines (in a continuation too) go."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"a continuation runs off the end: {pending!r}"
    return out


def stages(path: Path) -> list[Stage]:
    """The build stages; ARGs declared before the first FROM are substituted into FROM lines (their defaults)."""
    found: list[Stage] = []
    global_args: dict[str, str] = {}
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), rest)
            words = [w for w in base.split() if not w.startswith("--platform")]
            found.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif not found and keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            assert found, f"{path.name}: {keyword} before the first FROM"
            found[-1].instructions.append((keyword, rest))
    return found


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {rest}"
    return value


def copy_sources(rest: str) -> tuple[str | None, list[str]]:
    """(--from stage or None, the sources) of a COPY."""
    words = shlex.split(rest)
    source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
    paths = [w for w in words if not w.startswith("--")]
    return source_stage, paths[:-1]


def parse_command(argv: list[str], subcommand: str):
    """argv through the package's own parser (a renamed or removed flag exits: SystemExit fails the test)."""
    args = build_parser().parse_args(argv)
    assert args.command == subcommand, argv
    return args


def check_service_args(args, monkeypatch) -> None:
    """The settings a `serve` / `worker` command line makes, validated as the command validates them at start-up
    (a bad port or model spec raises InvalidArgument)."""
    monkeypatch.setenv("DIFFLENS_REDIS_URL", "redis://redis:6379/0")
    if args.command == "serve":
        from difflens.commands.serve import serve_settings

        settings = serve_settings(args)
    else:
        from difflens.commands.worker import worker_settings

        settings = worker_settings(args)
    assert settings.metrics_port is not None, "no --metrics-port: nothing to scrape, no /readyz to probe"
    assert settings.metrics_host == "0.0.0.0", "metrics on 127.0.0.1 cannot be scraped from another container"
    assert dict(settings.models) == {"default": SHIPPED_IN_IMAGE}, "the image's own copy of the shipped model"


# --- Dockerfiles ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [FRONT, WORKER], ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_from_pinned_images(dockerfile):
    found = stages(dockerfile)
    assert len(found) >= 2, "a build stage and a final stage"
    names = {s.name for s in found if s.name}
    for stage in found:
        assert stage.base in names or PINNED_TAG.search(stage.base), f"FROM {stage.base}: pin an exact tag"
        assert ":latest" not in stage.base
    # the venv is built on the final stage's own image: its python symlinks must resolve there
    assert found[0].base == found[-1].base


@pytest.mark.parametrize("dockerfile", [FRONT, WORKER], ids=lambda p: p.name)
def test_final_stage_runs_difflens_as_a_numeric_non_root_user(dockerfile):
    final = stages(dockerfile)[-1]
    users = final.args("USER")
    assert users, "no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: runAsNonRoot needs a numeric, non-zero uid"
    assert exec_form(final.args("ENTRYPOINT")[-1]) == ["difflens"]


@pytest.mark.parametrize("dockerfile", [FRONT, WORKER], ids=lambda p: p.name)
def test_final_stage_carries_no_build_tools(dockerfile):
    found = stages(dockerfile)
    final = found[-1]
    text = final.text().lower()
    assert not [t for t in BUILD_TOOLS if t in text], "build tools belong in the build stage"
    copied = [copy_sources(rest) for rest in final.args("COPY")]
    from_stages = {src for stage, sources in copied if stage is not None for src in sources}
    # only the venv: the stub generator's own venv (grpcio-tools), the sources and pip's cache stay behind
    assert from_stages == {"/opt/venv"}
    # and the venv it copies never got grpcio-tools: the stub generator is installed with another venv's pip
    steps = [step.strip() for stage in found[:-1] for run in stage.args("RUN") for step in run.split("&&")]
    tools = [step for step in steps if "pip install" in step and "grpcio-tools" in step]
    assert tools and all(not step.startswith("/opt/venv/") for step in tools), tools


def test_front_image_has_no_torch():
    found = stages(FRONT)
    for stage in found:
        text = stage.text().lower()
        assert not [p for p in ENGINE_PACKAGES if p in text], f"stage {stage.name}: the front runs without torch"
        assert "requirements.txt " not in " ".join(r for r in stage.args("RUN") if "-r requirements.txt" in r)
    installs = " ".join(found[0].args("RUN"))
    assert "pip install -r requirements-front.txt" in installs
    front_pins = (REPO / "requirements-front.txt").read_text().lower()
    assert "-r " not in front_pins and not [p for p in ENGINE_PACKAGES if re.search(rf"^{p}\b", front_pins, re.M)]


def test_worker_image_takes_torch_at_requirements_pin_from_the_pytorch_index():
    pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    build = stages(WORKER)[0]
    installs = " ".join(build.args("RUN"))
    assert f'--index-url "$TORCH_INDEX" torch=={pin}' in installs
    default_index = dict(a.partition("=")[::2] for a in build.args("ARG"))["TORCH_INDEX"]
    assert default_index == "https://download.pytorch.org/whl/cpu"
    # requirements.txt goes in whole but for the stub generator
    assert "grep -vE '^grpcio-tools==' requirements.txt > requirements-run.txt" in installs
    assert "-r requirements-run.txt" in installs


@pytest.mark.parametrize(("dockerfile", "subcommand"), [(FRONT, "serve"), (WORKER, "worker")],
                         ids=["front", "worker"])
def test_image_cmd_parses_with_the_cli(dockerfile, subcommand, monkeypatch):
    final = stages(dockerfile)[-1]
    args = parse_command(exec_form(final.args("CMD")[-1]), subcommand)
    check_service_args(args, monkeypatch)
    exposed = {int(p.split("/")[0]) for rest in final.args("EXPOSE") for p in rest.split()}
    assert args.metrics_port in exposed
    if subcommand == "serve":
        assert args.host == "0.0.0.0" and args.port in exposed
    copied = {sources[0]: rest.split()[-1] for rest in final.args("COPY")
              for stage, sources in [copy_sources(rest)] if stage is None}
    assert copied.get("models/shapes") == SHIPPED_IN_IMAGE


@pytest.mark.parametrize("dockerfile", [FRONT, WORKER], ids=lambda p: p.name)
def test_dockerfile_sources_exist_and_are_in_the_build_context(dockerfile):
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for stage in stages(dockerfile):
        for rest in stage.args("COPY"):
            source_stage, sources = copy_sources(rest)
            if source_stage is not None:
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                hit = [p for p in ignored if fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/")]
                assert not hit, f"COPY {source}: .dockerignore leaves it out of the context ({hit})"


def test_dockerignore_keeps_local_builds_out_of_the_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "out", "service/difflens/_gen"} <= ignored


def test_the_stubs_come_from_one_script_here_and_in_the_images(tmp_path):
    """deploy/docker/gen-stubs.sh makes the gRPC stubs for `make proto` and for both image builds; what it writes
    imports the contract from the package's own _gen folder (the rewrite of protoc's `from difflens.v1`)."""
    recipe = (REPO / "Makefile").read_text().split("$(GEN): ", 1)[1].split("\n\n", 1)[0]
    assert "deploy/docker/gen-stubs.sh $(PY) $(GEN_DIR)" in recipe
    out = tmp_path / "_gen"
    subprocess.run([str(DEPLOY / "docker" / "gen-stubs.sh"), sys.executable, str(out)], cwd=REPO, check=True,
                   timeout=120)
    grpc_module = (out / "difflens" / "v1" / "difflens_pb2_grpc.py").read_text()
    assert "from difflens._gen.difflens.v1 import difflens_pb2" in grpc_module
    assert "\nfrom difflens.v1 import" not in grpc_module
    assert all((out / p / "__init__.py").exists() for p in ("", "difflens", "difflens/v1"))
    for dockerfile in (FRONT, WORKER):
        runs = " ".join(stages(dockerfile)[0].args("RUN"))
        assert "gen-stubs /opt/protoc/bin/python service/difflens/_gen" in runs


# --- compose -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def service_args(compose, name: str, subcommand: str):
    return parse_command(compose["services"][name]["command"], subcommand)


def test_compose_has_the_whole_stack(compose):
    assert {"redis", "front", "worker", "prometheus", "grafana"} <= set(compose["services"])


@pytest.mark.parametrize(("service", "dockerfile"), [("front", FRONT), ("worker", WORKER)])
def test_compose_builds_front_and_worker_from_the_dockerfiles(compose, service, dockerfile):
    build = compose["services"][service]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO, "the Dockerfiles COPY paths of the repository root"
    assert (context / build["dockerfile"]).resolve() == dockerfile


@pytest.mark.parametrize(("service", "subcommand"), [("front", "serve"), ("worker", "worker")])
def test_compose_commands_parse_with_the_cli(compose, service, subcommand, monkeypatch):
    args = service_args(compose, service, subcommand)
    check_service_args(args, monkeypatch)
    spec = compose["services"][service]
    redis = urlsplit(spec["environment"]["DIFFLENS_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert redis.hostname in compose["services"]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    # the healthcheck asks /readyz on the port the command serves it on
    probe = " ".join(spec["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.metrics_port}/readyz" in probe


def test_compose_front_publishes_its_grpc_port(compose):
    args = service_args(compose, "front", "serve")
    published = {str(p).rsplit(":", 1)[-1] for p in compose["services"]["front"]["ports"]}
    assert str(args.port) in published


def test_compose_redis_persists_jobs(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])


def test_compose_images_are_pinned(compose):
    for name, spec in compose["services"].items():
        if "build" not in spec:
            assert PINNED_TAG.search(spec["image"]), f"{name}: image {spec['image']} is not pinned"


def mounts(spec) -> dict[Path, str]:
    """A compose service's bind mounts: the host path (resolved from deploy/) -> the path in the container."""
    out = {}
    for volume in spec.get("volumes", []):
        host, container = str(volume).split(":")[:2]
        if host.startswith("."):
            out[(DEPLOY / host).resolve()] = container
    return out


def test_prometheus_scrapes_what_front_and_worker_serve(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            targets |= {(n, int(dns["port"])) for n in dns["names"]}
    expected = {(name, service_args(compose, name, sub).metrics_port) for name, sub in
                (("front", "serve"), ("worker", "worker"))}
    assert expected <= targets
    # a Triton server on the machine that runs compose (`difflens triton-serve`): Prometheus reaches it by name
    assert ("host.docker.internal", 8002) in targets
    assert "host.docker.internal:host-gateway" in compose["services"]["prometheus"]["extra_hosts"]
    targets.discard(("host.docker.internal", 8002))
    assert {host for host, _ in targets} <= set(compose["services"]), "a target that is no compose service"


def test_prometheus_loads_the_alert_rules(compose):
    config_path = DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    mounted = mounts(compose["services"]["prometheus"])
    config_in_container = Path(mounted[config_path])
    for rule_file in config["rule_files"]:
        in_container = config_in_container.parent / rule_file
        host = next((h for h, c in mounted.items() if Path(c) == in_container), None)
        rules = (DEPLOY / "prometheus" / "alerts.yaml").resolve()  # a link to the chart's file
        assert host is not None and host.resolve() == rules, f"rule file {rule_file}: not the mounted alerts.yaml"
    checked = promtool_run("check", "config", config_path)
    if checked is None:
        pytest.skip(MISSING)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounted = mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounted[provisioning] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "difflens.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounted[DASHBOARD.parent]]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlsplit(sources[0]["url"])
    assert sources[0]["type"] == "prometheus"
    assert url.hostname == "prometheus" and url.port == 9090
    assert any(str(p).endswith(":9090") for p in compose["services"]["prometheus"]["ports"])


# --- dashboard -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row's own
    return [p for p in out if p["type"] != "row"]


def test_dashboard_takes_its_datasource_and_models_as_variables(dashboard):
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["definition"] == "label_values(difflens_queue_depth, model)"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"
            name, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
            assert label in declared_series()[name], variable["definition"]
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_dashboard_queries_name_only_declared_metrics_and_labels(dashboard):
    problems = {f'{p["title"]} / {t["refId"]}': promql_problems(t["expr"], t.get("legendFormat", ""))
                for p in panels(dashboard) for t in p["targets"]}
    assert {k: v for k, v in problems.items() if v} == {}


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """Each query, its Grafana variables given values, as a recording rule that promtool parses."""
    given = {"$__rate_interval": "5m", "$model": ".*", "$method": ".*"}
    rules = []
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in given.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable this test does not know: {expr}"
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    checked_file = tmp_path / "dashboard-rules.yaml"
    checked_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool_run("check", "rules", checked_file)
    if checked is None:
        pytest.skip(MISSING)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_charts_every_declared_metric(dashboard):
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    used = set(re.findall(r"difflens_\w+", exprs))
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in declared_series()}
    assert families - {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used} == set()


def test_dashboard_has_a_latency_heatmap_by_timestep_bucket(dashboard):
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    by_t = [t for p in heatmaps for t in p["targets"]
            if "difflens_step_duration_seconds_bucket" in t["expr"] and re.search(r"by \(t_bucket\b", t["expr"])
            and t["legendFormat"] == "{{t_bucket}}"]
    assert by_t, "no heatmap of step latency with a row per t_bucket"


def test_dashboard_panels_fit_the_grid(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]


def test_the_promql_check_can_fail():
    assert promql_problems("rate(difflens_job_total[5m])")  # misspelt metric
    assert promql_problems('sum by (model) (rate(difflens_jobs_total{status="failed"}[5m]))')  # jobs has no model
    assert promql_problems('difflens_errors_total{model="x"}')
    assert promql_problems("sum by (model) (difflens_queue_depth)")  # every front reports the same queue
    assert promql_problems("max by (model) (difflens_queue_depth)", "{{status}}")
    assert promql_problems("max by (model) (difflens_queue_depth)") == []
    assert promql_problems("rate(nv_inference_requests_success[5m])")  # misspelt Triton series
    assert promql_problems("rate(nv_inference_request_total[5m])")  # no such Triton series
    assert promql_problems("sum by (reason) (rate(nv_inference_request_success[5m]))")  # failures alone have it
    assert promql_problems("sum by (model, reason) (rate(nv_inference_request_failure[5m]))") == []


def test_dashboard_charts_the_triton_servers_requests_duration_queue_and_batch_size(dashboard):
    """Beside difflens's own: what a Triton-hosted UNet's server reports on its metrics port."""
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    for series in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_request_duration_us",
                   "nv_inference_queue_duration_us", "nv_inference_count", "nv_inference_exec_count"):
        assert series in exprs, series
    assert re.search(r"rate\(nv_inference_count\[[^]]+\]\)\) / sum by \(model\) \(rate\(nv_inference_exec_count", exprs)
