"""UNetBatcher and JobRunner on the tiny UNet, without a queue: shared calls, splitting, errors, the model lock."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from difflens.engine.runner import UNetRunner
from difflens.models import RWLock
from difflens.worker.batching import BatchStats, JobRunner, UNetBatcher
from tests.support.oom import OutOfMemoryRunner


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 77, 32, generator=g)


def _direct(unet, lat, t, emb):
    with torch.no_grad():
        return unet(lat, t, encoder_hidden_states=emb, return_dict=False)[0]


def _run_together(batcher: UNetBatcher, requests: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Each request from its own thread, all inside participant() at once, as concurrent DF-RISE steps are."""
    results: list = [None] * len(requests)
    inside = threading.Barrier(len(requests))

    def go(k: int) -> None:
        with batcher.participant():
            inside.wait()
            results[k] = batcher.submit(*requests[k])

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_requests_share_one_call_and_match_unbatched(tiny_model):
    unet = tiny_model.unet
    base = UNetRunner(unet)
    calls: list[BatchStats] = []
    batcher = UNetBatcher(base.raw, max_batch=64, on_batch=calls.append)
    # Different jobs are at different timesteps: per-sample timesteps travel as one (N,) tensor.
    reqs = [(*_inputs(6, k), torch.full((6,), t)) for k, t in ((0, 801), (1, 301), (2, 1))]
    reqs = [(lat, t, emb) for lat, emb, t in reqs]
    results = _run_together(batcher, reqs)
    assert calls == [BatchStats(samples=18, jobs=3)]
    for (lat, t, emb), (out, shared) in zip(reqs, results, strict=True):
        assert shared
        torch.testing.assert_close(out, _direct(unet, lat, t, emb), rtol=0, atol=1e-5)


def test_requests_of_different_shapes_run_in_separate_calls(tiny_model):
    """Jobs of different image sizes in DF-RISE at once (a worker with --max-jobs > 1): each shape gets its own
    call and every job its own result. Concatenating them failed in the leader only, and left the other job
    waiting for ever with the model's DF-RISE participation held."""
    unet = tiny_model.unet
    calls: list[BatchStats] = []
    batcher = UNetBatcher(UNetRunner(unet).raw, max_batch=64, on_batch=calls.append)
    g = torch.Generator().manual_seed(5)
    reqs = [(torch.randn(n, 4, h, w, generator=g), torch.full((n,), t), torch.randn(n, 77, 32, generator=g))
            for n, h, w, t in ((4, 16, 16, 801), (3, 8, 24, 301), (2, 16, 16, 1))]
    results = _run_together(batcher, reqs)
    assert sorted((c.samples, c.jobs) for c in calls) == [(3, 1), (6, 2)]
    for (lat, t, emb), result in zip(reqs, results, strict=True):
        assert result is not None
        torch.testing.assert_close(result[0], _direct(unet, lat, t, emb), rtol=0, atol=1e-5)


def test_a_request_larger_than_max_batch_is_split(tiny_model):
    unet = tiny_model.unet
    calls: list[BatchStats] = []
    batcher = UNetBatcher(UNetRunner(unet).raw, max_batch=4, on_batch=calls.append)
    lat, emb = _inputs(10, 3)
    t = torch.full((10,), 500)
    [(out, shared)] = _run_together(batcher, [(lat, t, emb)])
    assert [c.samples for c in calls] == [4, 4, 2] and shared
    torch.testing.assert_close(out, _direct(unet, lat, t, emb), rtol=0, atol=1e-5)


def test_a_lone_request_is_the_unbatched_call_exactly(tiny_model):
    unet = tiny_model.unet
    batcher = UNetBatcher(UNetRunner(unet).raw, max_batch=64)
    lat, emb = _inputs(8, 4)
    t = torch.full((8,), 250)
    [(out, shared)] = _run_together(batcher, [(lat, t, emb)])
    assert not shared
    assert torch.equal(out, _direct(unet, lat, torch.tensor(250), emb))


def test_an_error_reaches_every_job_in_the_call():
    def broken(lat, t, emb):
        raise RuntimeError("out of memory")

    batcher = UNetBatcher(broken, max_batch=64)
    errors: list[BaseException] = []

    def go(k: int) -> None:
        with batcher.participant():
            try:
                batcher.submit(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 3, 5))
            except RuntimeError as e:
                errors.append(e)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [str(e) for e in errors] == ["out of memory", "out of memory"]


def test_a_shared_call_out_of_memory_is_run_again_in_halves_and_the_shape_stays_halved(tiny_model):
    """Three jobs' 6 samples each: the call of 16 runs out of memory, then one of 8; calls of 4 fit. Every job gets
    its exact result, and the next calls of that shape are made at 4 without failing first."""
    unet = tiny_model.unet
    runner = OutOfMemoryRunner(unet, limit=5)
    calls: list[BatchStats] = []
    batcher = UNetBatcher(runner.raw, max_batch=16, on_batch=calls.append)
    reqs = [(lat, torch.full((6,), t), emb) for (lat, emb), t in ((_inputs(6, k), t) for k, t in ((0, 801), (1, 301),
                                                                                                 (2, 1)))]
    results = _run_together(batcher, reqs)
    assert runner.sizes[:2] == [16, 8] and max(runner.sizes[2:]) == 4
    assert sum(c.samples for c in calls) == 18 and max(c.samples for c in calls) == 4
    for (lat, t, emb), (out, shared) in zip(reqs, results, strict=True):
        assert shared
        torch.testing.assert_close(out, _direct(unet, lat, t, emb), rtol=0, atol=1e-5)
    assert batcher.limit(*_inputs(1, 0)) == 4 and batcher.limit(torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)) == 16
    runner.sizes.clear()
    _run_together(batcher, reqs[:1])
    assert runner.sizes == [4, 2]


def test_a_request_that_does_not_fit_alone_gets_the_error_and_others_go_on(tiny_model):
    """One shape runs out of memory at every size: its request is halved down to single samples, then gets the
    out-of-memory error in its own thread; a request of another shape at the same time gets its result."""
    runner = OutOfMemoryRunner(tiny_model.unet, limit=64, fails=lambda lat, t: lat.shape[-1] == 8)
    batcher = UNetBatcher(runner.raw, max_batch=8)
    g = torch.Generator().manual_seed(1)
    fits = (torch.randn(4, 4, 16, 16, generator=g), torch.full((4,), 500), torch.randn(4, 77, 32, generator=g))
    doomed = (torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 500), torch.randn(4, 77, 32, generator=g))
    got: dict[str, object] = {}

    def go(name: str, req) -> None:
        with batcher.participant():
            try:
                got[name] = batcher.submit(*req)[0]
            except torch.OutOfMemoryError as e:
                got[name] = e

    threads = [threading.Thread(target=go, args=a) for a in (("doomed", doomed), ("fits", fits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(got["doomed"], torch.OutOfMemoryError)
    assert isinstance(got["fits"], torch.Tensor)
    torch.testing.assert_close(got["fits"], _direct(tiny_model.unet, *fits), rtol=0, atol=1e-5)
    assert batcher.limit(doomed[0], doomed[2]) == 1


def test_compiled_backends_pad_calls_to_power_of_two_buckets():
    shapes: list[int] = []

    def fn(lat, t, emb):
        shapes.append(lat.shape[0])
        return lat * 2

    batcher = UNetBatcher(fn, max_batch=16, pad_to_bucket=True)
    lat = torch.randn(5, 1, 2, 2)
    [(out, _)] = _run_together(batcher, [(lat, torch.zeros(5), torch.zeros(5, 1, 1))])
    assert shapes == [8] and torch.equal(out, lat * 2)


def test_hooked_explainers_exclude_every_other_unet_call(tiny_model):
    """JobRunner.guard('cam') holds the model lock exclusively: another job's denoising call waits for it."""
    lock = RWLock()
    base = UNetRunner(tiny_model.unet)
    a = JobRunner(base, lock, UNetBatcher(base.raw, 64))
    b = JobRunner(base, lock, UNetBatcher(base.raw, 64))
    lat, emb = _inputs(2, 5)
    order: list[str] = []
    with a.guard("cam"):
        t = threading.Thread(target=lambda: (b.raw(lat, 100, emb), order.append("b-denoise")))
        t.start()
        time.sleep(0.3)
        order.append("a-cam-done")
    t.join(30)
    assert order == ["a-cam-done", "b-denoise"]
    assert b.denoise_s > 0


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    lock = RWLock()
    log: list[str] = []
    with lock.shared():
        def writer() -> None:
            with lock.exclusive():
                log.append("writer")

        w = threading.Thread(target=writer)
        w.start()
        time.sleep(0.1)

        def reader() -> None:
            with lock.shared():
                log.append("late reader")

        r = threading.Thread(target=reader)
        r.start()
        time.sleep(0.1)
        assert log == []  # the writer waits for us; the late reader waits behind the writer
    w.join(5)
    r.join(5)
    assert log == ["writer", "late reader"]


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_positive(max_batch):
    with pytest.raises(ValueError, match="max_batch"):
        UNetBatcher(lambda *a: a[0], max_batch=max_batch)
