"""The activation-memory estimate (engine/memory.py): a trace on the meta device counts what the real call
allocates, scales with the batch, and a job whose calls would not fit is refused before it runs."""

from __future__ import annotations

import pytest
import torch

from difflens.engine import families
from difflens.engine.memory import (
    LiveBytes,
    MemoryEstimator,
    _cgroup_room,
    _meminfo_available,
    check_fits,
    plan_calls,
)
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, RiseOptions
from difflens.errors import ResourceExhausted


def real_peak(model, batch: int) -> int:
    """LiveBytes of the real model's call on the CPU: what the meta trace stands for."""
    (seq, dim), shapes = families.of(model).conditioning_shapes(model)
    x, e = torch.randn(batch, 4, 16, 16), torch.randn(batch, seq, dim)
    added = {k: torch.randn(batch, *s) for k, s in shapes.items()} or None
    count = LiveBytes()
    with torch.no_grad(), count:
        families.of(model).call(model.unet, x, 999, e, added)
    return count.peak


@pytest.mark.parametrize("which", ["tiny_model", "tiny_sdxl"])
def test_the_meta_trace_counts_what_the_real_call_allocates_and_scales_with_the_batch(which, request):
    model = request.getfixturevalue(which)
    one = MemoryEstimator(model).per_sample("forward", (4, 16, 16))
    assert one > 0
    assert abs(real_peak(model, 1) - one) <= 0.1 * one  # CPU kernels may pick other paths than meta's
    assert 1.7 * one <= real_peak(model, 2) <= 2.3 * one


def test_df_cam_keeps_more_than_a_forward_and_the_estimate_is_cached(tiny_sdxl):
    est = MemoryEstimator(tiny_sdxl)
    forward, cam = est.per_sample("forward", (4, 16, 16)), est.per_sample("cam", (4, 16, 16))
    assert cam > 2 * forward  # activations saved for the backward pass, and the captured gradients
    assert MemoryEstimator(tiny_sdxl).per_sample("cam", (4, 16, 16)) == cam  # another estimator, same trace
    assert est.per_sample("forward", (4, 32, 16)) > forward


def test_the_calls_a_job_makes():
    options = ExplainOptions(rise=RiseOptions(num_masks=64, batch_size=32), cam=CamOptions(),
                             attention=AttentionOptions())
    calls = [(c.what, c.kind, c.least, c.planned) for c in plan_calls(options, cfg=True, max_batch=48)]
    assert calls == [("denoising", "forward", 2, 2), ("DF-RISE", "forward", 1, 48), ("DF-CAM", "cam", 2, 2),
                     ("attention maps", "attn", 1, 1)]
    assert [c.planned for c in plan_calls(options, cfg=False, max_batch=None)] == [1, 32, 1, 1]


def test_a_job_that_would_not_fit_is_refused_naming_the_call(tiny_sdxl):
    est, latent = MemoryEstimator(tiny_sdxl), (4, 16, 16)
    forward, cam = est.per_sample("forward", latent), est.per_sample("cam", latent)
    options = ExplainOptions(rise=RiseOptions(num_masks=32, batch_size=16), cam=CamOptions())
    room = 3 * forward  # denoising's 2 samples fit; DF-CAM's 2 with gradients and 32 DF-RISE samples do not
    with pytest.raises(ResourceExhausted) as e:
        check_fits(est, options, latent, True, "cpu", free=lambda _d: room)
    assert str(e.value).startswith("DF-RISE needs about") and "32 sample(s)" in str(e.value)
    assert "a smaller DF-RISE batch" in str(e.value)
    # on CUDA an out-of-memory DF-RISE batch is halved at run time: only DF-CAM's uncuttable call is refused
    with pytest.raises(ResourceExhausted, match="^DF-CAM needs about .* no DF-CAM"):
        check_fits(est, options, latent, True, "cuda", free=lambda _d: room)
    check_fits(est, ExplainOptions(rise=RiseOptions(batch_size=16)), latent, True, "cuda", free=lambda _d: room)
    check_fits(est, options, latent, True, "cpu", free=lambda _d: int(40 * cam))
    check_fits(est, options, latent, True, "cpu", free=lambda _d: None)  # unknown: no check


def test_host_memory_is_read_from_meminfo_and_the_cgroup(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert _meminfo_available(tmp_path / "meminfo") == 2048 * 1024
    assert _meminfo_available(tmp_path / "nope") is None
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(tmp_path) is None
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("400\n")
    assert _cgroup_room(tmp_path) == 600
