"""The engine's UNet runner out of device memory (injected at its raw() call, tests/support/oom.py): a guided call
is made again in halves, and calls of that shape stay halved; one latent that does not fit raises the error."""

from __future__ import annotations

import pytest
import torch

from difflens.engine.explain import run_explanation
from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions
from difflens.engine.runner import CFGConditioning, UNetRunner
from tests.support.oom import OutOfMemoryRunner


def _inputs(b: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 16, 16, generator=g), CFGConditioning(torch.randn(2, 77, 32, generator=g), 2.0)


def test_a_guided_call_out_of_memory_is_made_again_in_halves_and_stays_halved(tiny_model):
    latents, cond = _inputs(8)
    runner = OutOfMemoryRunner(tiny_model.unet, limit=5)  # 2 latents with CFG (4 samples) fit, 3 do not
    with torch.no_grad():
        out = runner.guided(latents, 500, cond)
        ref = UNetRunner(tiny_model.unet).guided(latents, 500, cond)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert runner.sizes == [16, 8, 4, 4, 4, 4]  # 8 latents, then 4, then 2 a call (both CFG branches each)
    assert runner.fits == {(4, 16, 16): 2}
    runner.sizes.clear()
    with torch.no_grad():
        runner.guided(latents, 500, cond)
    assert runner.sizes == [4, 4, 4, 4]  # no failed call again


def test_one_latent_that_does_not_fit_raises_the_error(tiny_model):
    latents, cond = _inputs(4)
    runner = OutOfMemoryRunner(tiny_model.unet, limit=1)  # even one latent's two CFG branches do not fit
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        runner.guided(latents, 500, cond)
    assert runner.sizes == [8, 4, 2]


def test_a_runner_that_leaves_it_to_its_caller_does_not_halve(tiny_model):
    latents, cond = _inputs(4)
    runner = OutOfMemoryRunner(tiny_model.unet, limit=4)
    runner.halve_on_oom = False  # a worker's job runner: its shared DF-RISE batches halve themselves
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        runner.guided(latents, 500, cond)
    assert runner.sizes == [8]


def test_a_local_explain_out_of_memory_finishes_with_the_same_image_and_maps(tiny_model):
    """`difflens explain` in-process: DF-RISE's batches of 8 masks (16 samples with CFG) do not fit, 2 masks do; the
    image is bit-identical (denoising is one latent a call) and the maps equal up to float rounding."""
    params = GenerationParams("a red circle", steps=2, guidance_scale=2.0, seed=0)
    options = ExplainOptions(rise=RiseOptions(num_masks=16, batch_size=8))
    runner = OutOfMemoryRunner(tiny_model.unet, limit=5)
    got = run_explanation(tiny_model, params, options, runner=runner)
    ref = run_explanation(tiny_model, params, options, runner=UNetRunner(tiny_model.unet))
    assert max(runner.sizes) == 16 and runner.fits == {(4, 16, 16): 2}
    assert (got.image == ref.image).all()
    for a, b in zip(got.steps, ref.steps, strict=True):
        torch.testing.assert_close(a.maps["rise"], b.maps["rise"], rtol=0, atol=1e-5)
