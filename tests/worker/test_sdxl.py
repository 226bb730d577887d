"""SDXL through the service's worker on the real InProcessQueue: streamed steps equal to the engine's, shared
DF-RISE batches carrying each job's added conditioning, the audit record (family, both text encoders) and its
replay, and a job refused RESOURCE_EXHAUSTED at its claim when its calls would not fit."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
import torch

from difflens.cli import main
from difflens.engine.runner import unet_call
from difflens.jobs import Completed, Failed, JobSpec, OutputOptions, Queued, Started, Step
from difflens.worker.batching import BatchStats, UNetBatcher
from tests.worker.helpers import MODEL, assert_streamed_as_the_engine, png_image, solo, spec, wait_terminal

CAM_LAYERS = ("down_blocks.1.attentions.0", "up_blocks.0.resnets.0")  # SDXL's first block has no attention


def sdxl_spec(prompt: str, *, seed: int, **kw: Any) -> JobSpec:
    return spec(prompt, seed=seed, guidance=5.0, cam_layers=CAM_LAYERS, scheduler="euler", **kw)


@pytest.fixture
def sdxl_worker(serve_preloaded, tiny_sdxl):
    """start(queue, settings) -> a Worker serving the tiny SDXL model as MODEL; stopped at the end."""
    return lambda queue, s: serve_preloaded(tiny_sdxl, queue, s, "w-sdxl")


@pytest.fixture
def queue_and_settings(family_queue, tiny_sdxl_dir):
    return family_queue(tiny_sdxl_dir)


def test_an_sdxl_job_streams_the_engine_s_maps_and_its_record_replays(sdxl_worker, queue_and_settings, tiny_sdxl,
                                                                        tiny_sdxl_dir, tmp_path, capsys):
    queue, s = queue_and_settings
    job = sdxl_spec("a red circle", seed=1, methods=("rise", "cam", "attn"),
                    output=OutputOptions(map_dtype="float16", include_x0_previews=True))
    ref = solo(tiny_sdxl, job)
    job_id = queue.enqueue(job).id
    sdxl_worker(queue, s)
    events = wait_terminal(queue, job_id)

    done = assert_streamed_as_the_engine(events, ref, CAM_LAYERS)
    record = json.loads(done.audit_json)
    assert record["model"]["family"] == "sdxl" and record["resolved"]["family"] == "sdxl"
    assert {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors"} <= set(record["model"]["weights_sha256"])
    assert {"text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/tokenizer_config.json"} \
        <= set(record["model"]["config_sha256"])

    path = tmp_path / "audit.json"
    path.write_text(json.dumps(record))
    assert main(["replay", str(path), "--model", f"{MODEL}={tiny_sdxl_dir}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("image.", "step"))]
    assert len(rows) == 2 + sum(len(m) for m in record["hashes"]["maps"].values())
    assert all(line.rstrip().endswith("yes") for line in rows)


def test_two_sdxl_rise_jobs_share_unet_batches_and_match_solo_runs(sdxl_worker, queue_and_settings, tiny_sdxl):
    queue, s = queue_and_settings
    jobs = [sdxl_spec("a red circle", seed=3, masks=16, batch=8), sdxl_spec("a blue square", seed=4, masks=16,
                                                                            batch=8)]
    ids = [queue.enqueue(j).id for j in jobs]  # both queued before the worker starts: they overlap
    worker = sdxl_worker(queue, s)
    results = [wait_terminal(queue, i) for i in ids]
    assert worker.stats.shared_calls > 0 and worker.stats.max_samples == 32
    for job, events in zip(jobs, results, strict=True):
        assert isinstance(events[-1], Completed), events[-1]
        ref = solo(tiny_sdxl, job)
        np.testing.assert_array_equal(png_image(events[-1]), ref.image)
        for st, r in zip([e for e in events if isinstance(e, Step)], ref.steps, strict=True):
            for name in ("rise", "rise_raw"):  # each job's own pooled embeddings and time ids in the shared call
                np.testing.assert_allclose(st.maps[name], r.maps[name].numpy(), rtol=0, atol=1e-5)


def test_the_batcher_concatenates_each_request_s_added_conditioning(tiny_sdxl):
    unet, calls = tiny_sdxl.unet, []

    def fn(lat, t, emb, added=None):
        return unet_call(unet, lat, t, emb, added)

    batcher = UNetBatcher(fn, max_batch=64, on_batch=calls.append)
    g = torch.Generator().manual_seed(0)

    def request(n: int, width: int):
        return (torch.randn(n, 4, 16, 16, generator=g), torch.full((n,), 500), torch.randn(n, 77, 32, generator=g),
                {"text_embeds": torch.randn(n, 16, generator=g), "time_ids": torch.tensor([[32, width, 0, 0, 32,
                                                                                             width]] * n)})

    reqs = [request(3, 32), request(2, 32), request(4, 48)]
    results: list = [None] * 3
    inside = threading.Barrier(3)

    def go(k: int) -> None:
        with batcher.participant():
            inside.wait()
            results[k] = batcher.submit(*reqs[k])

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # the time ids differ per request but have one shape: all three share a call
    assert calls == [BatchStats(samples=9, jobs=3)]
    with torch.no_grad():
        for (lat, t, emb, added), (out, shared) in zip(reqs, results, strict=True):
            assert shared
            torch.testing.assert_close(out, unet_call(unet, lat, t, emb, added), rtol=0, atol=1e-5)


def test_a_job_that_would_not_fit_is_refused_at_its_claim_and_the_next_job_runs(sdxl_worker, queue_and_settings,
                                                                                tiny_sdxl, monkeypatch):
    from difflens.engine import memory

    per_sample = memory.MemoryEstimator(tiny_sdxl).per_sample
    room = int(4 * per_sample("forward", (4, 16, 16)))  # denoising fits, DF-CAM with gradients does not
    assert 2 * per_sample("cam", (4, 16, 16)) * memory.HEADROOM > room
    monkeypatch.setattr(memory, "free_bytes", lambda _device: room)
    queue, s = queue_and_settings
    sdxl_worker(queue, s)
    doomed = wait_terminal(queue, queue.enqueue(sdxl_spec("a red circle", seed=1, methods=("cam",))).id)
    after = wait_terminal(queue, queue.enqueue(sdxl_spec("a red circle", seed=1, methods=("rise",), batch=1)).id)
    assert [type(e) for e in doomed] == [Queued, Started, Failed]  # refused before any step ran
    failed = doomed[-1]
    assert isinstance(failed, Failed) and failed.code == "RESOURCE_EXHAUSTED"
    assert failed.message.startswith("DF-CAM needs about") and "no DF-CAM" in failed.message
    assert isinstance(after[-1], Completed), after[-1]
