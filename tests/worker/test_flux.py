"""FLUX through the service's worker on the real InProcessQueue: streamed steps equal to the engine's (one branch,
the guidance an input), every map on the latent grid, the audit record (family, both text encoders, T5's
tokenizer) and its replay; the memory estimate of its calls; the triton backend refuses it as it refuses SDXL;
the torch-free front describes it and checks its prompt against T5's limit."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from difflens.catalog import ModelCatalog
from difflens.cli import main
from difflens.config import Limits, Settings
from difflens.errors import InvalidArgument
from difflens.jobs import Completed, Failed, JobSpec, OutputOptions, Queued, Started, Step
from difflens.validation import validate
from tests.worker.helpers import MODEL, assert_streamed_as_the_engine, png_image, settings, solo, spec, wait_terminal

CAM_LAYERS = ("transformer_blocks.0", "single_transformer_blocks.1")


def flux_spec(prompt: str, *, seed: int, negative: str = "", **kw: Any) -> JobSpec:
    return spec(prompt, seed=seed, guidance=3.5, cam_layers=CAM_LAYERS, scheduler="euler", negative_prompt=negative,
                **kw)


@pytest.fixture
def flux_worker(serve_preloaded, tiny_flux):
    """start(queue, settings) -> a Worker serving the tiny FLUX model as MODEL; stopped at the end."""
    return lambda queue, s: serve_preloaded(tiny_flux, queue, s, "w-flux")


@pytest.fixture
def queue_and_settings(family_queue, tiny_flux_dir):
    return family_queue(tiny_flux_dir)


def test_a_flux_job_streams_the_engine_s_maps_and_its_record_replays(flux_worker, queue_and_settings, tiny_flux,
                                                                      tiny_flux_dir, tmp_path, capsys):
    queue, s = queue_and_settings
    job = flux_spec("a red circle", seed=1, methods=("rise", "cam", "attn"),
                    output=OutputOptions(map_dtype="float16", include_x0_previews=True))
    ref = solo(tiny_flux, job)
    job_id = queue.enqueue(job).id
    flux_worker(queue, s)
    events = wait_terminal(queue, job_id)

    done = assert_streamed_as_the_engine(events, ref, CAM_LAYERS)
    record = json.loads(done.audit_json)
    assert record["model"]["family"] == "flux" and record["resolved"]["family"] == "flux"
    assert {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "transformer/diffusion_pytorch_model.safetensors"} <= set(record["model"]["weights_sha256"])
    assert {"transformer/config.json", "tokenizer_2/tokenizer.json"} <= set(record["model"]["config_sha256"])

    path = tmp_path / "audit.json"
    path.write_text(json.dumps(record))
    assert main(["replay", str(path), "--model", f"{MODEL}={tiny_flux_dir}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("image.", "step"))]
    assert len(rows) == 2 + sum(len(m) for m in record["hashes"]["maps"].values())
    assert all(line.rstrip().endswith("yes") for line in rows)


def test_two_flux_rise_jobs_share_transformer_batches_and_match_solo_runs(flux_worker, queue_and_settings,
                                                                          tiny_flux):
    queue, s = queue_and_settings
    jobs = [flux_spec("a red circle", seed=3, masks=16, batch=8), flux_spec("a blue square", seed=4, masks=16,
                                                                            batch=8)]
    ids = [queue.enqueue(j).id for j in jobs]
    worker = flux_worker(queue, s)
    results = [wait_terminal(queue, i) for i in ids]
    assert worker.stats.shared_calls > 0 and worker.stats.max_samples == 16  # one branch: 8 masks per job
    for job, events in zip(jobs, results, strict=True):
        assert isinstance(events[-1], Completed), events[-1]
        ref = solo(tiny_flux, job)
        np.testing.assert_array_equal(png_image(events[-1]), ref.image)
        for st, r in zip([e for e in events if isinstance(e, Step)], ref.steps, strict=True):
            for name in ("rise", "rise_raw"):  # each job's own pooled text and guidance in the shared call
                np.testing.assert_allclose(st.maps[name], r.maps[name].numpy(), rtol=0, atol=1e-5)


def test_the_memory_estimate_traces_flux_s_calls_and_refuses_what_would_not_fit(flux_worker, queue_and_settings,
                                                                                tiny_flux, monkeypatch):
    from difflens.engine import memory

    per_sample = memory.MemoryEstimator(tiny_flux).per_sample
    forward, cam, attn = (per_sample(kind, (4, 16, 16)) for kind in ("forward", "cam", "attn"))
    assert 0 < forward < cam and forward < attn  # gradients and the attention recorders cost more than a forward
    room = int(2 * forward)  # denoising fits, DF-CAM with gradients does not
    assert cam * memory.HEADROOM > room
    monkeypatch.setattr(memory, "free_bytes", lambda _device: room)
    queue, s = queue_and_settings
    flux_worker(queue, s)
    doomed = wait_terminal(queue, queue.enqueue(flux_spec("a red circle", seed=1, methods=("cam",))).id)
    assert [type(e) for e in doomed] == [Queued, Started, Failed]
    failed = doomed[-1]
    assert isinstance(failed, Failed) and failed.code == "RESOURCE_EXHAUSTED"
    assert failed.message.startswith("DF-CAM needs about") and "1 sample(s)" in failed.message  # one branch


def test_the_triton_backend_refuses_a_flux_model(tiny_flux, tiny_flux_dir):
    from difflens.models import ModelRegistry

    with pytest.raises(InvalidArgument) as e:
        engine = Settings(unet_backend="triton", triton_url="127.0.0.1:1")  # refused before it is ever dialled
        ModelRegistry(settings(tiny_flux_dir, engine=engine), preloaded={MODEL: tiny_flux}).get(MODEL)
    assert e.value.field == "unet_backend" and "is flux; the triton backend serves SD-family UNets only" in str(e.value)


def test_the_front_describes_flux_and_checks_prompts_against_t5(tiny_flux_dir):
    catalog = ModelCatalog.from_settings(settings(tiny_flux_dir))
    entry = catalog.get(MODEL)
    assert entry.family.name == "flux" and entry.default_size == (32, 32) and entry.max_prompt_tokens == 511
    ok = flux_spec(" ".join(["red"] * 200), seed=1)  # past CLIP's 75, within T5's 511
    validate(ok, catalog, Limits())
    with pytest.raises(InvalidArgument) as e:
        validate(flux_spec(" ".join(["red"] * 600), seed=1), catalog, Limits())
    assert e.value.field == "prompt" and "511" in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        validate(flux_spec("a red circle", seed=1, negative="blue"), catalog, Limits())
    assert e.value.field == "negative_prompt"
