from __future__ import annotations

import numpy as np
import pytest
import torch

from difflens.engine.options import GenerationParams, Sampling
from difflens.engine.sampler import generate, make_scheduler
from difflens.errors import InvalidArgument

SCHEDULERS = ["ddim", "ddpm", "dpmsolver++", "euler"]


def pipeline_image(model, name, prompt, seed, steps, guidance, negative=""):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(model, name), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               generator=g, output_type="np", height=32, width=32)
    return out.images[0]


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_loop_equals_stable_diffusion_pipeline(tiny_model, name, guidance):
    params = GenerationParams("a red circle on the left", negative_prompt="blue", seed=3, steps=6,
                              guidance_scale=guidance, scheduler=name)
    ours = generate(tiny_model, params).image
    ref = pipeline_image(tiny_model, name, params.prompt, 3, 6, guidance, negative="blue")
    assert ours.shape == ref.shape == (32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_uniform_list_passed_explicitly_equals_default_path(tiny_model, name):
    base = GenerationParams("a green square", seed=1, steps=7, guidance_scale=4.0, scheduler=name)
    default = generate(tiny_model, base)
    explicit = generate(tiny_model, GenerationParams(
        "a green square", seed=1, guidance_scale=4.0, scheduler=name,
        sampling=Sampling("explicit", timesteps=tuple(default.timesteps))))
    assert explicit.timesteps == default.timesteps
    assert np.array_equal(explicit.image, default.image)


def test_ddim_steps_exactly_between_arbitrary_timesteps(tiny_model):
    """The DDIM update uses alpha at the real next timestep, not t - T/n: check one step by hand."""
    from difflens.engine.sampler import ddim_step

    sched = make_scheduler(tiny_model, "ddim")
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    a_t, a_n = sched.alphas_cumprod[900].double(), sched.alphas_cumprod[123].double()
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    expected = a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps.double()
    got = ddim_step(sched, eps, 900, 123, x)
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["early", "late"])
def test_exponential_sampling_runs_the_exact_list(tiny_model, name, kind):
    from difflens.engine.schedule import exponential_timesteps

    g = generate(tiny_model, GenerationParams("a cat", steps=5, guidance_scale=3.0, scheduler=name,
                                              sampling=Sampling(kind, shift=20)))
    assert g.timesteps == exponential_timesteps(kind, 5, 20)
    assert np.isfinite(g.image).all()


def test_seed_is_deterministic_and_matters(tiny_model):
    p = GenerationParams("a dog", seed=5, steps=3, guidance_scale=3.0)
    a, b = generate(tiny_model, p).image, generate(tiny_model, p).image
    c = generate(tiny_model, GenerationParams("a dog", seed=6, steps=3, guidance_scale=3.0)).image
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("field,kwargs", [
    ("width", {"width": 40}),
    ("height", {"height": 8}),
    ("width", {"width": 100_000}),
])
def test_resolution_is_validated(tiny_model, field, kwargs):
    with pytest.raises(InvalidArgument) as e:
        generate(tiny_model, GenerationParams("x", steps=1, **kwargs))
    assert e.value.field == field
    assert "16" in e.value.message


def test_check_runs_before_each_step_and_can_stop(tiny_model):
    from difflens.errors import Cancelled

    seen = []

    def check(i):
        seen.append(i)
        if i == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        generate(tiny_model, GenerationParams("x", steps=5, guidance_scale=2.0), check=check)
    assert seen == [0, 1, 2]


def test_hook_sees_each_step(tiny_model):
    states = []
    g = generate(tiny_model, GenerationParams("x", steps=4, guidance_scale=2.0, scheduler="euler"),
                 on_step=states.append)
    assert [s.index for s in states] == [0, 1, 2, 3]
    assert [s.timestep for s in states] == g.timesteps
    assert torch.equal(states[-1].latent_next, g.latents)
    for s in states:
        assert s.latent_in.shape == s.eps.shape == s.x0.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_replayed_step_reproduces_the_real_one(tiny_model, name):
    """StepState.step / .scale replay the step on a snapshot: same result, and the run is unaffected. A
    stochastic scheduler's replay (DDPM) draws the real step's noise, for every row of a batch: the faithfulness
    curves compare perturbed rows with the unperturbed one by their input alone."""
    states = []
    params = GenerationParams("x", steps=4, guidance_scale=2.0, scheduler=name)
    g = generate(tiny_model, params, on_step=states.append)
    for s in states[:3]:
        assert torch.allclose(s.scale(s.sample), s.latent_in)
        replay = s.step(s.eps, s.sample)
        assert torch.allclose(replay, s.latent_next, atol=1e-6)
        rows = s.step(s.eps.expand(3, -1, -1, -1), s.sample.expand(3, -1, -1, -1))
        assert all(torch.allclose(r, s.latent_next[0], atol=1e-6) for r in rows)
        assert s.step(s.eps, s.sample).equal(replay)  # replay is repeatable
    assert np.array_equal(g.image, generate(tiny_model, params).image)


def trailing(model):
    """`model` with the shipped model's spacing: "trailing" (diffusers' np.arange(T, 0, -T/n) then - 1)."""
    import dataclasses

    from diffusers import DDIMScheduler

    return dataclasses.replace(model, scheduler=DDIMScheduler.from_config(model.scheduler.config,
                                                                           timestep_spacing="trailing"))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_trailing_spacing_runs_the_steps_asked_for(tiny_model, name):
    """For 61 steps diffusers' trailing spacing lists 62 timesteps, the last -1 (float rounding in np.arange): the
    sampler drops it, so the run makes 61 UNet calls at timesteps in [0, T), the same as that list given
    explicitly."""
    model = trailing(tiny_model)
    raw = make_scheduler(model, name)
    raw.set_timesteps(61)
    assert len(raw.timesteps) == 62 and int(raw.timesteps[-1]) == -1  # the artefact this guards against
    calls = []
    params = GenerationParams("x", seed=2, steps=61, guidance_scale=2.0, scheduler=name)
    g = generate(model, params, on_step=lambda s: calls.append(s.timestep))
    assert len(calls) == len(g.timesteps) == 61 and calls == g.timesteps
    assert calls == [int(t) for t in raw.timesteps[:61]] and min(calls) >= 0
    explicit = generate(model, GenerationParams("x", seed=2, guidance_scale=2.0, scheduler=name,
                                                sampling=Sampling("explicit", timesteps=tuple(calls))))
    assert np.array_equal(g.image, explicit.image)


@pytest.mark.parametrize("name,top", [("ddim", 999), ("ddpm", 999), ("euler", 999), ("dpmsolver++", 998)])
def test_step_counts_the_spacing_cannot_make_are_refused_naming_the_largest(tiny_model, name, top):
    """"leading" spacing with steps_offset 1 (SD's) reaches t = T at n = T (DDIM then failed with an IndexError),
    and DPM-Solver++ clips its list to fewer distinct timesteps: refused before anything runs."""
    with pytest.raises(InvalidArgument) as e:
        generate(tiny_model, GenerationParams("x", steps=1000, scheduler=name))
    assert e.value.field == "steps" and f"allowed [1, {top}]" in e.value.message
    scheduler = make_scheduler(tiny_model, name)
    scheduler.set_timesteps(top)
    assert len({int(t) for t in scheduler.timesteps}) == top and int(scheduler.timesteps.max()) < 1000


def test_x0_at_a_fractional_timestep_is_eulers_own(tiny_model):
    """Euler with "linspace" spacing (SD1.5 configs lack the key, so Euler defaults to it) runs the UNet at
    fractional timesteps (7 steps over 999: 832.5, ...). The x0 a step reports (previews, faithfulness) must be
    the one Euler itself predicts, x - sigma eps, not the one of the integer timestep below."""
    import dataclasses

    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    model = dataclasses.replace(tiny_model, scheduler=DDIMScheduler.from_config(tiny_model.scheduler.config,
                                                                                timestep_spacing="linspace"))
    states = []
    generate(model, GenerationParams("x", steps=7, guidance_scale=2.0, scheduler="euler"), on_step=states.append)
    euler = EulerDiscreteScheduler.from_config(model.scheduler.config)
    euler.set_timesteps(7)
    assert any(float(t) != int(t) for t in euler.timesteps)
    for i, s in enumerate(states):
        want = s.sample - euler.sigmas[i] * s.eps
        torch.testing.assert_close(s.x0, want, atol=1e-4, rtol=1e-4, msg=f"step {i} (t = {float(s.t)})")
