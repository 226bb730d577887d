"""audit.run_record, the one builder of a run's audit record for a worker's job and a local `difflens explain`:
the same record from the same run, but for what queueing and sharing UNet calls add."""

from __future__ import annotations

from difflens import audit
from difflens.render.outputs import image_png
from tests.worker.helpers import solo, spec


def test_a_local_run_and_a_served_job_differ_only_in_queueing_and_shared_calls(tiny_model, tiny_dir):
    job = spec("a red circle", seed=3, steps=2, masks=4, batch=4)
    exp = solo(tiny_model, job)
    common = {"job_id": "j1", "worker": "w", "attempt": 1, "model_name": "tiny", "folder": str(tiny_dir),
              "weights": {"unet/model.safetensors": "ab"}, "configs": {"unet/config.json": "cd"}, "spec": job,
              "exp": exp, "png": image_png(exp.image), "runtime": audit.runtime_of("cpu", "float32", "eager", "eager"),
              "started": 100.0, "denoise_s": {0: 0.5, 1: 0.25}, "finished": 103.5}
    local = audit.run_record(**common)
    served = audit.run_record(**common, enqueued_at=98.0, rise_exact={0: False, 1: True})
    assert {k: local["timings"][k] for k in ("queue_wait_s", "run_s", "total_s")} == \
        {"queue_wait_s": 0.0, "run_s": 3.5, "total_s": 3.5}
    assert {k: served["timings"][k] for k in ("queue_wait_s", "run_s", "total_s")} == \
        {"queue_wait_s": 2.0, "run_s": 3.5, "total_s": 5.5}
    assert [s["denoise_s"] for s in local["timings"]["steps"]] == [0.5, 0.25]
    assert [s["timestep"] for s in local["timings"]["steps"]] == [int(t) for t in exp.timesteps]
    assert local["timings"]["steps"] == served["timings"]["steps"]
    assert local["rise_exact"] == {"0": True, "1": True}  # a local run's DF-RISE calls hold only its samples
    assert served["rise_exact"] == {"0": False, "1": True}
    rest = {k for k in local if k not in ("timings", "rise_exact")}
    assert {k: local[k] for k in rest} == {k: served[k] for k in rest}
    assert local["hashes"]["image"]["png"] == audit.image_hashes(exp.image, image_png(exp.image))["png"]


def test_the_runtime_says_when_a_workers_calls_were_cut_for_memory():
    assert "unet_batch_after_oom" not in audit.runtime_of("cpu", "float32", "eager", "eager")
    assert audit.runtime_of("cpu", "float32", "eager", "eager", oom_batch=8)["unet_batch_after_oom"] == 8
