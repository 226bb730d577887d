"""Flow matching in the sampler (SD3, FLUX): FlowMatchEulerDiscreteScheduler's Euler step on the denoiser's
velocity, timesteps sigma x T, x0 = x_t - sigma v for the previews, exponential and explicit lists as unshifted
sigmas. Checked on the tiny SD UNet with a flow-matching scheduler config, against the integration written out
here from the scheduler's sigmas."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from difflens.engine import families
from difflens.engine.loading import load_model
from difflens.engine.options import GenerationParams, Sampling
from difflens.engine.runner import CFGConditioning
from difflens.engine.sampler import generate
from difflens.engine.schedule import exponential_timesteps
from difflens.errors import InvalidArgument, ModelLoadError

SHIFT = 3.0


@pytest.fixture(scope="module")
def flow_model(tiny_dir, tmp_path_factory):
    """The tiny SD model with SD3's scheduler (flow matching, shift 3) in place of its DDIM one."""
    folder = tmp_path_factory.mktemp("models") / "tiny-flow"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT}))
    return load_model(folder)


def shifted(sigma: float) -> float:
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


def euler_by_hand(model, params, sigmas):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i T), from the same seeded noise; sigmas end at 0."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(params.seed)
    x = randn_tensor((1, 4, 16, 16), generator=generator, dtype=torch.float32)
    prompt = families.of(model).encode(model, params.prompt, params.negative_prompt, (32, 32))
    cond = CFGConditioning(prompt.embeds, params.guidance_scale, prompt.added)
    runner = families.runner(model)
    velocities = []
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:], strict=False):
            v = runner.guided(x, torch.tensor(s * 1000.0), cond)
            velocities.append(v)
            x = x + (s_next - s) * v
    return x, velocities


def test_the_loop_integrates_the_velocity_with_euler_steps_and_previews_x0(flow_model):
    params = GenerationParams("a red circle", seed=5, steps=4, guidance_scale=4.0, scheduler="euler")
    states = []
    gen = generate(flow_model, params, on_step=states.append)
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    ref.set_timesteps(4)
    sigmas = [float(s) for s in ref.sigmas]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0  # the pipeline's own schedule: pure noise to clean
    latents, velocities = euler_by_hand(flow_model, params, sigmas)
    torch.testing.assert_close(gen.latents, latents, atol=1e-5, rtol=1e-5)
    assert gen.timesteps == [round(s * 1000) for s in sigmas[:-1]]
    for state, s, v in zip(states, sigmas[:-1], velocities, strict=True):
        torch.testing.assert_close(state.eps, v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.x0, state.latent_in - s * state.eps, atol=1e-6, rtol=0)
        assert torch.equal(state.latent_in, state.sample)  # a flow model's input is x_t unscaled
        # the replayed step reproduces the real one (RISE's x_prev target, the faithfulness curves)
        torch.testing.assert_close(state.step(state.eps, state.sample), state.latent_next, atol=0, rtol=0)


@pytest.mark.parametrize("sampling", [Sampling("explicit", timesteps=(999, 600, 250, 40)), Sampling("late", 20.0)])
def test_integer_timestep_lists_are_unshifted_sigmas_that_the_scheduler_shifts(flow_model, sampling):
    params = GenerationParams("a red circle", seed=1, steps=4, guidance_scale=4.0, scheduler="euler",
                              sampling=sampling)
    gen = generate(flow_model, params)
    asked = list(sampling.timesteps or exponential_timesteps("late", 4, 20.0))
    sigmas = [shifted((t + 1) / 1000) for t in asked] + [0.0]
    assert gen.timesteps == [round(s * 1000) for s in sigmas[:-1]]
    latents, _ = euler_by_hand(flow_model, params, sigmas)
    torch.testing.assert_close(gen.latents, latents, atol=1e-5, rtol=1e-5)


def test_a_flow_model_takes_the_euler_scheduler_alone(flow_model):
    with pytest.raises(InvalidArgument) as e:
        generate(flow_model, GenerationParams("a", steps=2, scheduler="ddim"))
    assert e.value.field == "scheduler"
    assert "allowed: euler" in e.value.message


def test_a_flow_model_defaults_to_euler_and_refuses_a_defaults_file_naming_another(flow_model, tmp_path):
    assert not (flow_model.path / "difflens.json").exists()
    assert flow_model.defaults.scheduler == "euler"  # SD's default, ddim, is not one it takes
    gen = generate(flow_model, GenerationParams("a red circle", steps=2))
    assert gen.params.scheduler == "euler"
    folder = tmp_path / "m"
    shutil.copytree(flow_model.path, folder)
    (folder / "difflens.json").write_text(json.dumps({"scheduler": "ddim"}))
    with pytest.raises(ModelLoadError) as e:
        load_model(folder)
    assert str(e.value) == (f"{folder.resolve() / 'difflens.json'}: malformed defaults file: scheduler: got 'ddim'; "
                            "this model's scheduler allows: euler")
