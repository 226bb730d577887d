"""Operating the front: health, reflection, the metrics scrape, replay of a served job's audit record, and
`difflens explain --server` writing what the local command writes."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from difflens.cli import main
from difflens.client import DifflensClient
from difflens.jobs import Completed
from tests.api.helpers import CAM_LAYERS, free_port, job, settings
from tests.support.promtool import MISSING, promtool_report
from tests.support.waiting import wait_until


def test_health_reports_serving_for_the_server_and_the_service(embedded):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(embedded.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "difflens.v1.Explainer"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_describes_the_contract(embedded):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(embedded.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"difflens.v1.Explainer", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} \
            <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        explainer = pool.FindServiceByName("difflens.v1.Explainer")
        assert {m.name for m in explainer.methods} == {"Explain", "Submit", "GetJob", "WatchJob", "CancelJob",
                                                      "ListModels", "DeleteJob"}
        request = pool.FindMessageTypeByName("difflens.v1.ExplainRequest")
        assert {"model", "prompt", "idempotency_key", "timeout_seconds"} <= {f.name for f in request.fields}


def test_metrics_scrape_parses_and_counts_what_happened(embedded, client):
    from prometheus_client.parser import text_string_to_metric_families

    from difflens.metrics import serve_metrics

    port = free_port()
    serve_metrics(port)
    with pytest.raises(grpc.RpcError):
        client.submit(job(steps=1, masks=100_000))
    assert isinstance(list(client.explain(job(steps=2), timeout=120))[-1], Completed)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("difflens_errors_total", (("type", "invalid_argument"),))] >= 1
    assert ("difflens_queue_depth", (("model", "tiny"),)) in samples
    assert samples[("difflens_live_workers", (("model", "tiny"),))] == 1
    assert samples[("difflens_jobs_total", (("status", "completed"),))] >= 1
    assert samples[("difflens_request_duration_seconds_count", (("model", "tiny"), ("status", "completed")))] >= 1
    assert any(name == "difflens_step_duration_seconds_count" and ("method", "rise") in labels
               for name, labels in samples)
    assert not any("job" in k for _, labels in samples for k, _ in labels)  # never a job id label
    report = promtool_report(text)
    if report is None:
        pytest.skip(f"{MISSING}; the parse checks above passed")
    assert report == ""


def test_the_promtool_check_can_fail():
    bad = "# HELP jobs Jobs.\n# TYPE jobs counter\njobs 1\n"
    report = promtool_report(bad)
    if report is None:
        pytest.skip(MISSING)
    assert '"_total" suffix' in report


def test_replay_of_a_served_jobs_audit_record_matches(client, tiny_dir, tmp_path, capsys):
    events = list(client.explain(job(steps=3, methods=("rise", "cam", "attn")), timeout=120))
    done = events[-1]
    assert isinstance(done, Completed)
    record = json.loads(done.audit_json)
    assert record["model"]["name"] == "tiny" and record["hashes"]["maps"]
    path = tmp_path / "audit.json"
    path.write_text(done.audit_json)
    assert main(["replay", str(path), "--model", f"tiny={tiny_dir}"]) == 0
    assert "items match" in capsys.readouterr().out


@pytest.fixture(scope="module")
def served_record(embedded, tmp_path_factory) -> Path:
    """The audit record of a served job (DF-RISE on every step of 3), written to a file."""
    from difflens.client import DifflensClient

    with DifflensClient(embedded.target, caller="tests") as c:
        done = list(c.explain(job(steps=3, methods=("rise",)), timeout=120))[-1]
    assert isinstance(done, Completed)
    path = tmp_path_factory.mktemp("served") / "audit.json"
    path.write_text(done.audit_json)
    return path


def _rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[3] for line in text.splitlines()
            if line.startswith(("image.", "step", "weights/"))}


def test_replay_on_the_server_runs_a_new_job_and_checks_its_weights_too(embedded, served_record, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["replay", str(served_record), "--server", embedded.target, "--out", str(out)]) == 0
    rows = _rows(capsys.readouterr().out)
    record = json.loads(served_record.read_text())
    assert {f"weights/{f}" for f in record["model"]["weights_sha256"]} < set(rows)
    assert len(rows) == len(record["model"]["weights_sha256"]) + 2 + 3 * 3  # image x2, rise/raw/mean per step
    assert set(rows.values()) == {"yes"}
    new_record = json.loads((out / "audit.json").read_text())
    assert new_record["job_id"] != record["job_id"] and new_record["request"]["idempotency_key"] != \
        record["request"]["idempotency_key"]
    assert json.loads((out / "replay.json").read_text())["server"] == embedded.target


def test_re_explaining_on_the_server_keeps_the_image(embedded, served_record, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["replay", str(served_record), "--server", embedded.target, "--out", str(out), "--methods", "cam",
            "--cam-layers", ",".join(CAM_LAYERS), "--explain-steps", "1"]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["image.rgb_uint8"] == rows["image.png"] == "yes" and not any(r.startswith("step") for r in rows)
    summary = json.loads((out / "replay.json").read_text())
    assert set(summary["new_maps"]) == {"step001/cam"} | {f"step001/cam/{layer}" for layer in CAM_LAYERS}
    with np.load(out / "explanation.npz") as z:
        assert z["explained_steps"].tolist() == [1] and z["step001/cam"].shape == (16, 16)


def test_replay_on_the_server_reports_other_weights(embedded, served_record, tmp_path, capsys):
    record = json.loads(served_record.read_text())
    name = sorted(record["model"]["weights_sha256"])[0]
    record["model"]["weights_sha256"][name] = "f" * 64
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(record))
    assert main(["replay", str(path), "--server", embedded.target]) == 1
    rows = _rows(capsys.readouterr().out)
    assert rows[f"weights/{name}"] == "NO" and rows["image.rgb_uint8"] == "yes"


@pytest.mark.parametrize(("flags", "message"), [
    (["--server", "{target}", "--model-dir", "x"], "--model-dir: not used with --server"),
    (["--server", "{target}", "--device", "cpu"], "--device: not used with --server"),
    (["--server", "nohost"], "--server: got 'nohost'; expected HOST:PORT"),
])
def test_replay_on_the_server_bad_flags_exit_2(embedded, served_record, capsys, flags, message):
    argv = ["replay", str(served_record), *[f.replace("{target}", embedded.target) for f in flags]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _explain_args(out: Path, prompt: str = "a red circle", attention_only: bool = False) -> list[str]:
    options = ["--methods", "attn"] if attention_only else ["--masks", "8", "--batch", "4", "--cam-layers",
                                                             ",".join(CAM_LAYERS)]
    return [prompt, "--out", str(out), "--steps", "3", "--guidance", "2", *options, "--explain-steps", "0,2"]


@pytest.mark.parametrize(("flags", "prompt"), [([], "a red circle"), (["--methods", "rise,cam"], "a red circle"),
                                              (None, "")],
                         ids=["all", "no-attention", "attention-of-no-words"])
def test_explain_server_writes_the_files_of_the_local_command(embedded, tiny_dir, tmp_path, capsys, flags, prompt):
    """Byte for byte, but for timings; without attention maps too (the npz's tokens then come from the record);
    attention on a prompt of no words (a step's maps are then (0, h, w): the served run wrote none, and fewer
    files)."""
    remote, local = tmp_path / "remote", tmp_path / "local"
    only = flags is None
    flags = flags or []
    assert main(["explain", "--server", embedded.target, "tiny", *_explain_args(remote, prompt, only), *flags]) == 0
    assert main(["explain", str(tiny_dir), *_explain_args(local, prompt, only), *flags]) == 0
    err = capsys.readouterr().err
    assert "denoising" in err and "no worker serves" not in err  # the progress bar; a worker was there
    names = {p.name for p in local.iterdir()}
    assert {p.name for p in remote.iterdir()} == names and "audit.json" in names
    for name in sorted(names - {"report.html", "explanation.npz", "audit.json"}):  # these carry ids and wall times
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    records = [json.loads((d / "audit.json").read_text()) for d in (remote, local)]
    assert records[0]["hashes"] == records[1]["hashes"]  # the same image and maps, served or not
    assert records[0]["model"]["weights_sha256"] == records[1]["model"]["weights_sha256"]
    with np.load(remote / "explanation.npz") as r, np.load(local / "explanation.npz") as l_:
        assert set(r.files) == set(l_.files)
        for key in l_.files:
            np.testing.assert_allclose(r[key], l_[key], atol=1e-6, err_msg=key) if r[key].dtype.kind == "f" \
                else np.testing.assert_array_equal(r[key], l_[key])
    assert "<html" in (remote / "report.html").read_text().lower()


@pytest.mark.parametrize(("server", "model", "flags", "message"), [
    ("nohost", "tiny", [], "--server: got 'nohost'; expected HOST:PORT"),
    ("127.0.0.1:1", "tiny", ["--backend", "eager"], "--backend: not used with --server"),
    ("{target}", "tiny", ["--masks", "100000"], "--masks: got 100000; allowed range [1, 8192]"),
    # too few: the engine-wide range was told ([1, 1000000]), not the deployment's
    ("{target}", "tiny", ["--masks", "0"], "--masks: got 0; allowed range [1, 8192]"),
    ("{target}", "tiny", ["--batch", "0"], "--batch: got 0; allowed range [1, 1024]"),
    ("{target}", "tiny", ["--steps", "0"], "--steps: got 0; allowed range [1, 200]"),
    ("{target}", "tiny", ["--cam-layers", "up_blocks.7.resnets.0"], "--cam-layers: unknown layer path(s)"),
    ("{target}", "nope", [], "model: unknown model 'nope'; available: tiny"),
    ("{target}", "tiny", ["--timeout", "0"], "--timeout: got 0; must be > 0 (seconds)"),
])
def test_explain_server_bad_input_exits_2_naming_the_flag(embedded, tmp_path, capsys, server, model, flags, message):
    out = tmp_path / "o"
    argv = ["explain", "--server", server.replace("{target}", embedded.target), model, "a red circle",
            "--out", str(out), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("completed", "shown"), [(True, 10), (False, 3)])
def test_the_remote_progress_bar_is_filled_only_for_a_completed_job(completed, shown, capsys):
    """Steps after the last explained one send no event: a completed job's bar is filled at the end, a failed
    job's bar stays where the job stopped (it used to read 10/10 above the error line)."""
    from difflens.commands.common import ProgressBar
    from difflens.jobs import Step

    progress = ProgressBar()
    for index in (0, 2):
        progress.on_event(Step(index=index, timestep=900 - 100 * index, num_steps=10))
    bar = progress.bar
    progress.close(completed=completed)
    assert bar.n == shown and progress.bar is None
    progress.close(completed=True)  # a second close (the error path closed it already) changes nothing
    assert bar.n == shown
    assert f"{shown}/10" in capsys.readouterr().err


def test_the_remote_progress_says_when_the_stream_broke_and_when_it_resumed(capsys):
    """A front restart used to show only as a stalled bar: now the CLI says the stream broke and when events flow
    again."""
    import grpc

    from difflens.commands.common import ProgressBar
    from difflens.jobs import Step

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    progress = ProgressBar()
    progress.on_event(Step(index=0, timestep=900, num_steps=10))
    progress.on_break("j1", Unavailable())
    progress.on_event(Step(index=1, timestep=800, num_steps=10))
    progress.on_event(Step(index=2, timestep=700, num_steps=10))
    progress.close(completed=True)
    err = capsys.readouterr().err
    assert "the stream broke (UNAVAILABLE); resuming job j1" in err
    assert err.count("resumed job j1") == 1


def test_explain_server_timeout_on_a_job_no_worker_took_says_it_never_started(tiny_dir, tmp_path, capsys):
    """No worker serves the model yet (a front alone): the CLI says so when the job is queued, and the deadline
    error must not claim the job stops at its next step."""
    from difflens.api.server import BackgroundServer

    out = tmp_path / "o"
    with BackgroundServer(settings(tiny_dir)) as srv:
        assert main(["explain", "--server", srv.target, "tiny", "a red circle", "--out", str(out),
                     "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "no worker serves model 'tiny' right now; the job waits until one starts" in err, err
    # Whichever comes first: the call's deadline (the CLI explains the job's) or the job failed in the queue at
    # the same deadline (the front's sampler), never "stops at its next step".
    assert "DEADLINE_EXCEEDED" in err and "next step" not in err, err
    assert ("it never started, and the queue fails it" in err
            or "the job's deadline passed while it waited in the queue" in err), err
    assert not out.exists()


def test_explain_server_timeout_is_the_jobs_deadline(embedded, tmp_path, capsys):
    """--timeout is the call's deadline; the server makes it the job's, so the job stops too, and nothing is
    written."""
    out = tmp_path / "o"
    argv = ["explain", "--server", embedded.target, "tiny", "a red circle", "--out", str(out), "--steps", "40",
            "--masks", "256", "--batch", "8", "--methods", "rise", "--timeout", "1.5"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "DEADLINE_EXCEEDED" in err and not out.exists()
    job_id = re.search(r"job ([0-9a-f]{32})", err).group(1)  # named whether the call or the job ended first
    with DifflensClient(embedded.target) as client:
        rec = wait_until(lambda: (r := client.get(job_id)).state in ("failed", "completed") and r, 120, 0.2,
                         "the job ended")
    assert rec.state == "failed" and "DEADLINE_EXCEEDED" in rec.error


def test_timeout_needs_server(tiny_dir, tmp_path, capsys):
    assert main(["explain", str(tiny_dir), "a red circle", "--out", str(tmp_path / "o"), "--timeout", "5"]) == 2
    assert "--timeout: only with --server" in capsys.readouterr().err


def test_models_lists_what_the_server_serves_with_its_live_workers(embedded, capsys):
    assert main(["models", "--server", embedded.target]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["model", "workers", "waiting", "steps", "guidance", "scheduler", "size"]
    assert set(row.split()) & {"ddim", "ddpm", "dpmsolver++", "euler"}  # as --scheduler spells it
    assert main(["models", "--server", embedded.target, "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)["models"]
    assert (info["name"], info["live_workers"], info["is_default"]) == ("tiny", 1, True)
    scheduler = info["default_scheduler"].removeprefix("SCHEDULER_").lower()
    assert row.split() == ["tiny", "(default)", "1", "0", str(info["default_steps"]),
                           f"{info['default_guidance_scale']:g}", scheduler, "32x32"]


@pytest.mark.parametrize(("server", "status", "message"), [
    ("nowhere", 2, "--server: got 'nowhere'; expected HOST:PORT"),
    ("127.0.0.1:{port}", 1, "difflens: error: server: UNAVAILABLE"),
])
def test_models_reports_a_bad_or_absent_server_in_one_line(server, status, message, capsys):
    assert main(["models", "--server", server.format(port=free_port())]) == status
    assert message in capsys.readouterr().err


def test_explain_server_map_dtype_float16_carries_the_maps_rounded(embedded, tiny_dir, tmp_path, capsys):
    """--map-dtype float16 (what the front's too-large-event error suggests) halves the wire; the files hold the
    same maps rounded to float16. In-process there is no wire: the flag is refused."""
    remote, local = tmp_path / "remote", tmp_path / "local"
    assert main(["explain", "--server", embedded.target, "tiny", *_explain_args(remote), "--map-dtype",
                 "float16"]) == 0
    assert main(["explain", str(tiny_dir), *_explain_args(local)]) == 0
    with np.load(remote / "explanation.npz") as r, np.load(local / "explanation.npz") as l_:
        maps = [k for k in l_.files if k.startswith("step")]
        assert maps
        for key in maps:  # relevance is a number on the wire, not a map: it stays as it was
            want = l_[key] if key.endswith("attn_relevance") else l_[key].astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(r[key], want, rtol=0, atol=1e-6, err_msg=key)
    assert (remote / "image.png").read_bytes() == (local / "image.png").read_bytes()
    capsys.readouterr()
    assert main(["explain", str(tiny_dir), *_explain_args(tmp_path / "x"), "--map-dtype", "float16"]) == 2
    assert "--map-dtype: only with --server" in capsys.readouterr().err
