"""The Worker on the real InProcessQueue and the tiny model: events, results equal to the engine's, cancel,
deadline, cross-job DF-RISE batching, the exclusive hooked explainers, reclaim, errors, stop."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time

import numpy as np
from PIL import Image

from difflens import metrics
from difflens.jobs import Completed, Failed, OutputOptions, Queued, Started, Step
from tests.support.waiting import wait_until
from tests.worker.helpers import MODEL, settings, solo, spec, wait_for, wait_terminal

MODELS = (MODEL,)


def _steps(events):
    return [e for e in events if isinstance(e, Step)]


def _image(event: Completed) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.image_png)).convert("RGB"))


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_explainer_streams_in_order_with_engine_results(make_worker, memory_queue, worker_settings,
                                                              tiny_model):
    job = spec("a red circle", seed=1, methods=("rise", "cam", "attn"),
               output=OutputOptions(map_dtype="float16", include_x0_previews=True))
    ref = solo(tiny_model, job)
    bucket = metrics.t_bucket(ref.timesteps[0])
    before = {"denoise": _sample("difflens_step_duration_seconds_count", model=MODEL, method="denoise",
                                 t_bucket=bucket),
              "done": _sample("difflens_jobs_total", status="completed"),
              "masks": _sample("difflens_rise_masks_total", model=MODEL)}
    job_id = memory_queue.enqueue(job).id
    make_worker(worker_settings, memory_queue, name="w-all")
    events = wait_terminal(memory_queue, job_id)

    assert [type(e) for e in events] == [Queued, Started, Step, Step, Step, Completed]
    assert events[1] == Started(worker="w-all", attempt=1)
    steps = _steps(events)
    assert [s.index for s in steps] == [0, 1, 2] and [s.timestep for s in steps] == ref.timesteps
    for s, r in zip(steps, ref.steps, strict=True):
        assert s.num_steps == 3 and s.latency_s > 0
        layers = ("down_blocks.0.attentions.0", "up_blocks.1.resnets.0")
        assert set(s.maps) == {"rise", "rise_raw", "rise_mean", "cam", *(f"cam/{p}" for p in layers)}
        for name, m in s.maps.items():
            assert m.shape == (16, 16) and m.dtype == np.float16
            # solo request (8 samples <= max_batch 64) and exclusive CAM/attention: the engine's exact numbers
            np.testing.assert_array_equal(m, r.maps[name].numpy().astype(np.float16), err_msg=name)
        assert [t.token for t in s.tokens] == ["a", "red", "circle"]
        for j, t in enumerate(s.tokens):
            assert t.map.shape == (16, 16) and t.map.dtype == np.float16 and 0.0 <= t.relevance <= 1.0
            np.testing.assert_array_equal(t.map, r.maps["attn"][j].numpy().astype(np.float16))
        assert s.x0_preview is not None and s.x0_preview.shape == (3, 32, 32)
        assert s.x0_preview.dtype == np.float16 and 0.0 <= s.x0_preview.min() <= s.x0_preview.max() <= 1.0
    done = events[-1]
    assert isinstance(done, Completed)
    np.testing.assert_array_equal(_image(done), ref.image)  # bit-identical to `difflens explain`
    record = json.loads(done.audit_json)
    assert record["job_id"] == job_id and record["model"]["name"] == MODEL
    assert "unet/diffusion_pytorch_model.safetensors" in record["model"]["weights_sha256"]
    assert record["request"] == json.loads(job.to_json()) and record["seed"] == 1
    assert [s["index"] for s in record["timings"]["steps"]] == [0, 1, 2]
    assert record["rise_exact"] == {"0": True, "1": True, "2": True}
    assert _sample("difflens_step_duration_seconds_count", model=MODEL, method="denoise", t_bucket=bucket) \
        == before["denoise"] + 1
    assert _sample("difflens_jobs_total", status="completed") == before["done"] + 1
    assert _sample("difflens_rise_masks_total", model=MODEL) == before["masks"] + 3 * 8


def test_two_rise_jobs_share_unet_batches_and_match_solo_runs(make_worker, memory_queue, worker_settings,
                                                              tiny_model):
    jobs = [spec("a red circle", seed=3, steps=3, masks=16, batch=8),
            spec("a blue square", seed=4, steps=3, masks=16, batch=8)]
    le16 = _sample("difflens_unet_batch_size_bucket", model=MODEL, le="16.0")
    calls = _sample("difflens_unet_batch_size_count", model=MODEL)
    ids = [memory_queue.enqueue(j).id for j in jobs]  # both queued before the worker starts: they overlap
    worker = make_worker(worker_settings, memory_queue, name="w-batch")
    results = [wait_terminal(memory_queue, i) for i in ids]

    # One job's request is 16 samples (8 masks x 2 CFG branches): bigger calls held samples of both jobs.
    assert worker.stats.shared_calls > 0 and worker.stats.max_samples == 32
    assert (_sample("difflens_unet_batch_size_count", model=MODEL) - calls) \
        > (_sample("difflens_unet_batch_size_bucket", model=MODEL, le="16.0") - le16)
    shared_steps = 0
    for job, events in zip(jobs, results, strict=True):
        ref = solo(tiny_model, job)
        np.testing.assert_array_equal(_image(events[-1]), ref.image)  # denoising never shares a batch
        for s, r in zip(_steps(events), ref.steps, strict=True):
            for name in ("rise", "rise_raw"):
                np.testing.assert_allclose(s.maps[name], r.maps[name].numpy(), rtol=0, atol=1e-5)
        shared_steps += list(json.loads(events[-1].audit_json)["rise_exact"].values()).count(False)
    assert shared_steps > 0  # the record says which steps' maps came from shared calls


def test_rise_jobs_of_different_sizes_complete_side_by_side(make_worker, memory_queue, worker_settings, tiny_model):
    """Their masked latents cannot share a UNet call: each size runs its own, and both jobs finish with the maps
    they have alone (before, the worker failed one INTERNAL and hung the other for good)."""
    jobs = [spec("a red circle", seed=3, steps=3, masks=16, batch=8),
            spec("a blue square", seed=4, steps=3, masks=16, batch=8, width=64, height=32)]
    ids = [memory_queue.enqueue(j).id for j in jobs]
    make_worker(worker_settings, memory_queue, name="w-sizes")
    for job, events in zip(jobs, (wait_terminal(memory_queue, i, timeout=60) for i in ids), strict=True):
        assert isinstance(events[-1], Completed), events[-1]
        ref = solo(tiny_model, job)
        for s, r in zip(_steps(events), ref.steps, strict=True):
            np.testing.assert_allclose(s.maps["rise"], r.maps["rise"].numpy(), rtol=0, atol=1e-5)


def test_hooked_explainers_run_alone_beside_a_rise_job(make_worker, memory_queue, worker_settings, tiny_model):
    """DF-CAM hooks and attention processors sit on the shared UNet: a concurrent DF-RISE job must neither see
    them nor disturb what they capture."""
    unet = tiny_model.unet
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    jobs = [spec("a red circle", seed=5, steps=3, methods=("cam", "attn")),
            spec("a green star", seed=6, steps=3, masks=16, batch=8)]
    ids = [memory_queue.enqueue(j).id for j in jobs]
    make_worker(worker_settings, memory_queue)
    results = [wait_terminal(memory_queue, i) for i in ids]
    assert all(isinstance(r[-1], Completed) for r in results)
    ref = solo(tiny_model, jobs[0])
    for s, r in zip(_steps(results[0]), ref.steps, strict=True):
        for name, m in s.maps.items():
            np.testing.assert_array_equal(m, r.maps[name].numpy(), err_msg=name)
        np.testing.assert_array_equal(np.stack([t.map for t in s.tokens]), r.maps["attn"].numpy())
    ref_rise = solo(tiny_model, jobs[1])
    for s, r in zip(_steps(results[1]), ref_rise.steps, strict=True):
        np.testing.assert_allclose(s.maps["rise"], r.maps["rise"].numpy(), rtol=0, atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert not any(m._forward_hooks for m in unet.modules())


def test_cancel_stops_within_one_step(make_worker, memory_queue, worker_settings):
    job_id = memory_queue.enqueue(spec(steps=40, masks=4)).id
    make_worker(worker_settings, memory_queue)
    wait_for(memory_queue, job_id, Step)
    memory_queue.cancel(job_id)
    seen = len(_steps([e for _, e in memory_queue.events(job_id)]))
    events = wait_terminal(memory_queue, job_id)
    assert events[-1] == Failed("CANCELLED", "cancelled by the caller")
    assert len(_steps(events)) <= seen + 1 < 40


def test_deadline_stops_a_running_job(make_worker, memory_queue, worker_settings):
    make_worker(worker_settings, memory_queue)  # idle and claiming before the job exists
    time.sleep(0.5)
    job_id = memory_queue.enqueue(spec(steps=200, masks=4, deadline=time.time() + 2.0)).id
    events = wait_terminal(memory_queue, job_id)
    assert any(isinstance(e, Started) for e in events), "the worker, not the claim, must have stopped it"
    assert isinstance(events[-1], Failed) and events[-1].code == "DEADLINE_EXCEEDED"
    assert len(_steps(events)) < 200


def test_reclaimed_job_does_not_republish_steps(make_worker, tiny_dir):
    from difflens.queue.memory import InProcessQueue

    s = settings(tiny_dir, visibility_timeout_s=1.0)
    queue = InProcessQueue(s)
    job_id = queue.enqueue(spec(steps=4, masks=4)).id
    ghost = queue.claim("ghost", MODELS, block_s=1.0)
    assert ghost is not None and ghost.job_id == job_id
    fake = np.zeros((16, 16), np.float32)
    assert queue.publish(ghost, Started("ghost", 1))
    for i in (0, 1):  # the first worker got two steps out, then died (no more heartbeats)
        assert queue.publish(ghost, Step(index=i, timestep=0, num_steps=4, maps={"rise": fake}))
    make_worker(s, queue, name="heir")
    events = wait_terminal(queue, job_id)
    assert [type(e) for e in events] == [Queued, Started, Step, Step, Started, Step, Step, Completed]
    assert events[4] == Started("heir", attempt=2)
    assert [e.index for e in _steps(events)] == [0, 1, 2, 3]
    assert json.loads(events[-1].audit_json)["attempt"] == 2
    assert not queue.publish(ghost, Step(index=2, timestep=0, num_steps=4))  # the ghost lost the job


def test_a_worker_that_takes_its_own_job_back_heartbeats_the_new_delivery(make_worker, tiny_dir, monkeypatch):
    """Its heartbeats failed for longer than the visibility timeout (a queue outage), so its own reclaim took the
    job back as delivery 2. The first delivery's thread, on its way out, dropped the new delivery from the jobs
    the worker heartbeats: it was reclaimed again and again and dead-lettered, the worker alive all along."""
    from difflens.queue.memory import InProcessQueue
    from difflens.worker import job as job_module

    s = settings(tiny_dir, visibility_timeout_s=1.0, max_deliveries=3)
    queue = InProcessQueue(s)
    check = job_module.JobRun._check

    def slow_check(self, index):  # a big model's step: the job outlasts the outage
        time.sleep(0.1)
        check(self, index)

    monkeypatch.setattr(job_module.JobRun, "_check", slow_check)
    heartbeat, outage_end = queue.heartbeat, time.monotonic() + 1.6

    def failing_heartbeat(claim):
        if time.monotonic() < outage_end:
            raise ConnectionError("the queue is unreachable (test)")
        return heartbeat(claim)

    queue.heartbeat = failing_heartbeat
    # Progress events: the first delivery's next publish finds its claim lost and the thread ends at once
    job_id = queue.enqueue(spec(steps=40, methods=(), output=OutputOptions(progress_events=True))).id
    make_worker(s, queue)
    events = wait_terminal(queue, job_id)
    assert isinstance(events[-1], Completed), events[-1]
    assert [e.attempt for e in events if isinstance(e, Started)] == [1, 2]
    assert json.loads(events[-1].audit_json)["attempt"] == 2


def test_a_bad_job_fails_with_invalid_argument_naming_the_field(make_worker, memory_queue, worker_settings):
    job_id = memory_queue.enqueue(spec(width=20)).id
    make_worker(worker_settings, memory_queue)
    events = wait_terminal(memory_queue, job_id)
    assert isinstance(events[-1], Failed) and events[-1].code == "INVALID_ARGUMENT"
    assert "width: got 20; must be a multiple of 16" in events[-1].message


def test_a_worker_leaves_the_jobs_of_models_it_does_not_serve(make_worker, memory_queue, worker_settings):
    """It used to take them and fail them INVALID_ARGUMENT; they wait for a worker that has the model."""
    theirs = memory_queue.enqueue(dataclasses.replace(spec(), model="nope")).id
    ours = memory_queue.enqueue(spec(steps=2)).id
    make_worker(worker_settings, memory_queue)
    assert isinstance(wait_terminal(memory_queue, ours)[-1], Completed)
    assert memory_queue.get(theirs).state == "queued" and memory_queue.depth("nope") == 1


def test_stop_finishes_held_jobs_and_takes_no_more(make_worker, tiny_dir):
    from difflens.queue.memory import InProcessQueue

    s = settings(tiny_dir, worker_max_jobs=1)
    queue = InProcessQueue(s)
    first, second = (queue.enqueue(spec(steps=30, masks=4, seed=k)).id for k in (0, 1))
    worker = make_worker(s, queue)
    wait_for(queue, first, Started)
    worker.stop(timeout=120)
    assert worker._thread is not None and not worker._thread.is_alive()
    assert isinstance(queue.events(first)[-1][1], Completed)
    assert queue.get(second).state == "queued"


def test_stop_hands_back_a_job_still_running_after_the_drain_grace(make_worker, tiny_dir):
    """An orchestrator's stop: the job goes to another worker at once (the visibility timeout is 30 s here), as the
    same attempt, and no step is published twice."""
    from difflens.queue.memory import InProcessQueue

    s = settings(tiny_dir, worker_max_jobs=1, drain_grace_s=0.3, visibility_timeout_s=30.0)
    queue = InProcessQueue(s)
    job_id = queue.enqueue(spec(steps=40, masks=16)).id
    leaving = make_worker(s, queue, name="leaving")
    wait_for(queue, job_id, Step)
    t0 = time.monotonic()
    leaving.stop(timeout=60)
    assert leaving._thread is not None and not leaving._thread.is_alive()
    assert time.monotonic() - t0 < 15  # the grace and the step in progress, not the job's remaining 35+ steps
    assert queue.get(job_id).state == "queued" and queue.depth(MODEL) == 1 and not leaving.held()
    make_worker(s, queue, name="heir")
    events = wait_terminal(queue, job_id)
    assert [e for e in events if isinstance(e, Started)] == [Started("leaving", 1), Started("heir", 1)]
    assert [e.index for e in _steps(events)] == list(range(40))
    assert isinstance(events[-1], Completed) and sum(isinstance(e, Completed | Failed) for e in events) == 1


def test_a_job_cancelled_as_its_worker_stops_ends_cancelled_not_handed_on(tiny_dir, tiny_model):
    """Both are up at a step boundary: the cancel wins, so the job ends CANCELLED there instead of going back to a
    queue where, with no other worker of its model, nothing would ever end it."""
    import threading as th

    import pytest

    from difflens.errors import Cancelled
    from difflens.models import ModelRegistry
    from difflens.queue.memory import InProcessQueue
    from difflens.worker.batching import JobRunner, UNetBatcher
    from difflens.worker.job import JobRun

    s = settings(tiny_dir, visibility_timeout_s=30.0)
    queue = InProcessQueue(s)
    job_id = queue.enqueue(spec(steps=4)).id
    claim = queue.claim("w", MODELS, block_s=1, start=True)
    assert claim is not None
    entry = ModelRegistry(s, preloaded={MODEL: tiny_model}).get(MODEL)
    run = JobRun(claim, queue, entry, JobRunner(entry.runner, entry.lock, UNetBatcher(entry.runner.raw, 8)), s,
                 handing_back=th.Event())
    queue.cancel(job_id)
    assert run.handing_back is not None
    run.handing_back.set()
    with pytest.raises(Cancelled):
        run._check(1)


def test_an_heir_rides_out_a_blip_while_it_reads_the_steps_already_sent(make_worker, tiny_dir):
    """A reclaimed or handed-back job's new worker first reads what was published; a failed read there killed the
    job thread, and the job waited out the visibility timeout to be re-run as another delivery."""
    from difflens.queue.memory import InProcessQueue

    class Blip(InProcessQueue):
        failures = 1

        def events(self, job_id, after=-1, block_s=0.0):
            if self.failures and threading.current_thread().name.startswith("job-heir"):
                self.failures -= 1
                raise ConnectionError("the queue's backend blinked")
            return super().events(job_id, after, block_s)

    s = settings(tiny_dir, worker_max_jobs=1, drain_grace_s=0.0, visibility_timeout_s=30.0)
    queue = Blip(s)
    job_id = queue.enqueue(spec(steps=12, masks=8)).id
    leaving = make_worker(s, queue, name="leaving")
    wait_for(queue, job_id, Step)
    leaving.stop(timeout=60)
    make_worker(s, queue, name="heir")
    events = wait_terminal(queue, job_id, timeout=60)
    assert queue.failures == 0 and isinstance(events[-1], Completed)
    assert [e for e in events if isinstance(e, Started)] == [Started("leaving", 1), Started("heir", 1)]
    assert [e.index for e in _steps(events)] == list(range(12))


class _SteeredQueue:
    """Builds an InProcessQueue whose Step publishes can be held at a gate, lose the claim, or fail once; every
    other call is the real queue's."""

    @staticmethod
    def make(s, *, gate_step=None, lose_step=None, fail_step=None):
        import threading

        from difflens.queue.base import Published
        from difflens.queue.memory import InProcessQueue

        class Steered(InProcessQueue):
            def __init__(self):
                super().__init__(s)
                self.gate, self.threads, self.lost_tokens = threading.Event(), set(), set()

            def publish(self, claim, event):
                if isinstance(event, Step):
                    self.threads.add(threading.current_thread().name)
                    if event.index == gate_step:
                        assert self.gate.wait(30), "the gate was never opened"
                    if claim.token in self.lost_tokens or (event.index == lose_step and claim.delivery == 1):
                        self.lost_tokens.add(claim.token)  # as if reclaimed: this claim owns nothing any more
                        return Published.LOST
                    if event.index == fail_step and claim.delivery == 1:
                        raise ConnectionError("the queue's backend went away")
                return super().publish(claim, event)

            def heartbeat(self, claim):
                return claim.token not in self.lost_tokens and super().heartbeat(claim)

            def finish(self, claim, event):
                return claim.token not in self.lost_tokens and super().finish(claim, event)

        return Steered()


def test_denoising_goes_on_while_a_step_event_is_being_published(make_worker, worker_settings):
    """Step 0's publish is held until the job's DF-RISE has run for step 1: a worker that waited on each publish
    would never get there (the gate times out)."""
    queue = _SteeredQueue.make(worker_settings, gate_step=0)
    job_id = queue.enqueue(spec(steps=3, masks=4, batch=4)).id  # one DF-RISE UNet call per step
    worker = make_worker(worker_settings, queue)
    wait_until(lambda: worker.stats.calls >= 2, 120, 0.01, "step 1 explained while step 0's event waited")
    queue.gate.set()
    events = wait_terminal(queue, job_id)
    assert [type(e) for e in events] == [Queued, Started, Step, Step, Step, Completed]
    assert [e.index for e in _steps(events)] == [0, 1, 2]
    assert all(name.startswith("publish-") for name in queue.threads), queue.threads


def test_a_publish_that_finds_the_claim_lost_stops_the_job_and_another_delivery_finishes_it(tiny_dir,
                                                                                              make_worker):
    s = settings(tiny_dir, visibility_timeout_s=1.0)
    queue = _SteeredQueue.make(s, lose_step=1)
    job_id = queue.enqueue(spec(steps=4, masks=4)).id
    make_worker(s, queue)
    events = wait_terminal(queue, job_id)
    # The first delivery got step 0 out; step 1 found the claim lost, and the job stopped before step 2's
    # event: the second delivery publishes steps 1-3 and the only terminal event.
    assert [type(e) for e in events] == [Queued, Started, Step, Started, Step, Step, Step, Completed]
    assert [e.index for e in _steps(events)] == [0, 1, 2, 3]
    assert json.loads(events[-1].audit_json)["attempt"] == 2


def test_a_failed_step_publish_fails_the_job_with_no_later_step_events(make_worker, worker_settings):
    queue = _SteeredQueue.make(worker_settings, fail_step=1)
    job_id = queue.enqueue(spec(steps=5, masks=4)).id
    make_worker(worker_settings, queue)
    events = wait_terminal(queue, job_id)
    assert [type(e) for e in events] == [Queued, Started, Step, Failed]
    assert events[-1].code == "INTERNAL"


def test_a_job_handed_out_ahead_publishes_nothing_until_its_claim_holds_and_stops_if_it_does_not(tiny_dir,
                                                                                                   make_worker):
    """JobQueue.claim_ahead: the worker starts on the job while the claim is settled. Here the settling is held
    until the job has explained two steps, and then says the claim did not hold (as Redis's claim script does for
    a job cancelled in between, which it also finishes): no Step may have gone out, and the job stops."""
    import threading

    from difflens.queue.memory import InProcessQueue

    s = settings(tiny_dir)

    class Ahead(InProcessQueue):
        gate = threading.Event()

        def claim_ahead(self, worker, models, block_s=1.0):
            got = super().claim_ahead(worker, models, block_s)
            if got is None:
                return None
            claim, _ = got

            def confirm():
                assert self.gate.wait(30), "the gate was never opened"
                super(Ahead, self).finish(claim, Failed("CANCELLED", "cancelled by the caller"))
                return False

            return claim, confirm

    queue = Ahead(s)
    waits = _queue_waits()
    job_id = queue.enqueue(spec(steps=6, masks=4, batch=4)).id
    worker = make_worker(s, queue)
    wait_until(lambda: worker.stats.calls >= 2, 120, 0.01, "the job started before its claim was settled")
    assert [type(e) for _, e in queue.events(job_id)] == [Queued, Started]  # two steps explained, none out
    queue.gate.set()
    events = wait_terminal(queue, job_id)
    time.sleep(0.5)  # the job thread sees the verdict at its next step and must stop without a word
    assert [type(e) for _, e in queue.events(job_id)] == [Queued, Started, Failed]
    assert worker.stats.calls < 6, "the job ran to its end"
    assert events[-1] == Failed("CANCELLED", "cancelled by the caller")
    assert _queue_waits() == waits  # it never left the queue for this worker: no queue wait was observed


def _queue_waits() -> float:
    return metrics.REGISTRY.get_sample_value("difflens_queue_wait_seconds_count", {"model": MODEL}) or 0.0
