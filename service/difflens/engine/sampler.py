"""The denoising loop: CFG, seeded, any of four schedulers, any strictly decreasing timestep list.

It follows diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL: the family's prompt encoding and
added conditioning, engine/families.py) step for step (same noise draw, same batch layout, same scheduler
calls) so that, for the uniform schedule, its image equals the pipeline's - with two deliberate differences, both
where diffusers' list or update is wrong: DDIM steps to the actual next timestep of the list (diffusers assumes
a stride of T // n, which "trailing" spacing breaks when n does not divide T), and "trailing" spacing's spurious
last timestep -1 (some n, see schedule.uniform_timesteps) is dropped. A per-step hook sees everything an
explainer or progress reporter needs; explainers must not (and cannot, through StepState) alter the trajectory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from difflens.engine import families
from difflens.engine.loading import Model
from difflens.engine.options import GenerationParams
from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.engine.schedule import (
    check_timesteps,
    exponential_timesteps,
    flow_sigmas,
    new_scheduler,
    uniform_timesteps,
)
from difflens.engine.validate import resolve_generation
from difflens.errors import InvalidArgument


@dataclass(frozen=True)
class StepState:
    """What the per-step hook sees at step `index` (the UNet call at timestep t_index).

    latent_in: (1, C, h, w) the UNet's input at this step (after the scheduler's input scaling).
    eps: (1, C, h, w) guided noise prediction; x0: (1, C, h, w) predicted clean latent;
    latent_next: (1, C, h, w) the scheduler's x_{t_next}. `t` is the exact timestep value given to the UNet.
    sample: (1, C, h, w) the scheduler-space latent x_t (equals latent_in except for sigma-scaled schedulers
    such as Euler). `step(eps, sample)` replays this step's scheduler update on other inputs, (B, C, h, w)
    each, without touching the running scheduler (faithfulness curves); `scale(sample)` is the input scaling;
    `to_x0(latent_in, eps)` the x0 prediction at this timestep.
    """

    index: int
    num_steps: int
    timestep: int
    t: torch.Tensor
    latent_in: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor
    latent_next: torch.Tensor
    cond: CFGConditioning
    runner: UNetRunner
    sample: torch.Tensor | None = None
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    to_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


StepHook = Callable[[StepState], None]


@dataclass
class Generation:
    """image: (H, W, 3) float32 in [0, 1]; latents: (1, C, h, w) the final latent."""

    image: np.ndarray
    latents: torch.Tensor
    timesteps: list[int]
    params: GenerationParams
    token_ids: list[int]


def make_scheduler(model: Model, name: str):
    return new_scheduler(model.scheduler_config, name)


def is_flow_scheduler(scheduler) -> bool:
    """Whether `scheduler` integrates a flow-matching velocity (SD3, FLUX): its timesteps are sigma x T, its input
    unscaled, its noise unscaled."""
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def encode_prompt(model: Model, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, list[int]]:
    """Embeddings (2, L, D) = [negative; prompt] as the family's pipeline computes them, and the prompt's token
    ids. Embeddings only: a family's added conditioning (SDXL) comes from families.of(model).encode."""
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    encoded = families.of(model).encode(model, prompt, negative_prompt, (side, side))
    return encoded.embeds, encoded.token_ids


def plan_timesteps(model: Model, scheduler, params: GenerationParams) -> list[int]:
    """The timestep list this generation visits; sets it on `scheduler` (except DDIM, stepped here)."""
    s = params.sampling
    n = int(params.steps or 0)
    T = model.num_train_timesteps
    if is_flow_scheduler(scheduler):
        return _plan_flow(model, scheduler, params)
    if s.kind == "uniform":
        ts, corrected = uniform_timesteps(scheduler, n, T, device=model.device)
        if not corrected:
            return ts
    elif s.kind in ("early", "late"):
        ts = exponential_timesteps(s.kind, n, s.shift, T)
    else:
        ts = check_timesteps(s.timesteps or (), T)
    if params.scheduler == "ddim":
        scheduler.set_timesteps(len(ts), device=model.device)  # initialises its state; timesteps replaced below
        scheduler.timesteps = torch.tensor(ts, dtype=torch.int64, device=model.device)
    else:
        scheduler.set_timesteps(timesteps=ts, device=model.device)
    return ts


def _plan_flow(model: Model, scheduler, params: GenerationParams) -> list[int]:
    """A flow-matching schedule: the uniform one with the family's set_timesteps arguments (mu, its own sigmas),
    or an exponential / explicit integer list as unshifted sigmas (schedule.flow_sigmas) shifted by the scheduler.
    Returns the timesteps the denoiser runs at (sigma x T, fractional) rounded to integers, for reports."""
    s = params.sampling
    n = int(params.steps or 0)
    T = model.num_train_timesteps
    size = (int(params.height or 0), int(params.width or 0))
    kwargs = families.of(model).timestep_kwargs(model, size, n)
    if s.kind == "uniform":
        scheduler.set_timesteps(None if "sigmas" in kwargs else n, device=model.device, **kwargs)
    else:
        ts = exponential_timesteps(s.kind, n, s.shift, T) if s.kind in ("early", "late") \
            else check_timesteps(s.timesteps or (), T)
        kwargs["sigmas"] = flow_sigmas(ts, T)
        scheduler.set_timesteps(device=model.device, **kwargs)
    return [round(float(t)) for t in scheduler.timesteps]


def ddim_step(scheduler, eps: torch.Tensor, t: int, t_next: int | None, sample: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) update from t to the actual next timestep t_next (None: the end).

    diffusers' DDIMScheduler.step assumes a uniform stride; this uses the schedule's alphas at t_next, with
    the same arithmetic as diffusers so that, on the uniform list, results are bit-identical to it.
    """
    cfg = scheduler.config
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[t_next] if t_next is not None else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    if cfg.prediction_type == "epsilon":
        x0 = (sample - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        pred_eps = eps
    elif cfg.prediction_type == "sample":
        x0 = eps
        pred_eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
    elif cfg.prediction_type == "v_prediction":
        x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * eps
        pred_eps = (alpha_prod_t**0.5) * eps + (beta_prod_t**0.5) * sample
    else:
        raise InvalidArgument("scheduler.prediction_type", f"got {cfg.prediction_type!r}")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std_dev_t = 0.0 * alpha_prod_t  # eta = 0, kept as a tensor exactly as diffusers has it
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_eps
    return alpha_prod_t_prev ** (0.5) * x0 + direction


def alpha_bar_at(scheduler, timestep: float) -> torch.Tensor:
    """alphas_cumprod at `timestep`; between two integers (Euler's "linspace" spacing runs the UNet at fractional
    timesteps) from sigma = sqrt((1 - a) / a) interpolated linearly, as that scheduler places its steps, so the
    UNet input it scales by 1 / sqrt(sigma^2 + 1) is exactly sqrt(a) x0 + sqrt(1 - a) eps."""
    ac = scheduler.alphas_cumprod
    lo = int(timestep)
    w = float(timestep) - lo
    if w == 0.0 or lo + 1 >= len(ac):
        return ac[lo]
    s = ((1 - ac[lo:lo + 2]) / ac[lo:lo + 2]).sqrt()
    sigma = s[0] * (1 - w) + s[1] * w
    return 1 / (1 + sigma * sigma)


def predict_x0(scheduler, latent_in: torch.Tensor, eps: torch.Tensor, timestep: float) -> torch.Tensor:
    """x0 from the (variance-preserving) UNet input and its output at `timestep` (the one the UNet ran at, which
    may be fractional). A flow model's output is the velocity v = noise - x0 at x_t = (1 - sigma) x0 + sigma
    noise, sigma = timestep / T: x0 = x_t - sigma v."""
    if is_flow_scheduler(scheduler):
        return latent_in - (float(timestep) / int(scheduler.config.num_train_timesteps)) * eps
    a = alpha_bar_at(scheduler, timestep).to(latent_in.dtype)
    pt = scheduler.config.prediction_type
    if pt == "v_prediction":
        return a.sqrt() * latent_in - (1 - a).sqrt() * eps
    if pt == "sample":
        return eps
    return (latent_in - (1 - a).sqrt() * eps) / a.sqrt()


def _replay(scheduler, is_ddim: bool, t: torch.Tensor, t_next: int | None, rng_state: torch.Tensor | None):
    """(step, scale) closures over a snapshot of the scheduler taken before step t. `rng_state`: the generation's
    generator state just before this step (stochastic schedulers): every replayed row draws the noise the real
    step drew, so the unperturbed row reproduces x_{t_next} and perturbed rows differ from it by their input
    only."""
    if is_ddim:
        return (lambda eps, sample: ddim_step(scheduler, eps, int(t), t_next, sample)), (lambda x: x)

    def step(eps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        s = copy.deepcopy(scheduler)
        generators = None
        if rng_state is not None:
            # One generator per row (diffusers' randn_tensor draws row i from generators[i]), each at the state
            # the real step drew its (1, C, h, w) noise from.
            generators = [torch.Generator(device=sample.device) for _ in range(sample.shape[0])]
            for g in generators:
                g.set_state(rng_state)
        return s.step(eps, t, sample, generator=generators, return_dict=False)[0]

    def scale(sample: torch.Tensor) -> torch.Tensor:
        return _scale_input(copy.deepcopy(scheduler), sample, t)

    return step, scale


def _scale_input(scheduler, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input scaling; a flow model's denoiser takes x_t as it is."""
    if is_flow_scheduler(scheduler):
        return sample
    return scheduler.scale_model_input(sample, t)


def decode(model: Model, latents: torch.Tensor) -> np.ndarray:
    """latents: (1, C, h, w) -> image (H, W, 3) float32 in [0, 1] (pixel-space models: latents are RGB). In the
    VAE's own dtype (float32 for an upcast SDXL VAE); a VAE config's latents_mean / latents_std are undone as the
    SDXL pipeline does."""
    with torch.no_grad():
        x = latents
        vae = model.vae
        if vae is not None:
            x = latents.to(next(vae.decoder.parameters()).dtype)  # FLUX's and SD3's VAEs have no post_quant_conv
            mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
            if mean is not None and std is not None:
                shape = (1, -1, 1, 1)
                x = x * torch.tensor(std).view(shape).to(x) / vae.config.scaling_factor \
                    + torch.tensor(mean).view(shape).to(x)
            else:
                x = x / vae.config.scaling_factor
            if vae.config.get("shift_factor") is not None:  # SD3, FLUX: latents = (z - shift) * scale
                x = x + vae.config.shift_factor
            x = vae.decode(x, return_dict=False)[0]
        x = (x / 2 + 0.5).clamp(0, 1)
    return x[0].permute(1, 2, 0).float().cpu().numpy()


def generate(
    model: Model,
    params: GenerationParams,
    *,
    runner: UNetRunner | None = None,
    on_step: StepHook | None = None,
    check: Callable[[int], None] | None = None,
) -> Generation:
    """Run the denoising loop. `check(i)` runs before step i and may raise (Cancelled, DeadlineExceeded)."""
    params = resolve_generation(model, params)
    runner = runner or families.runner(model)
    scheduler = make_scheduler(model, str(params.scheduler))
    timesteps = plan_timesteps(model, scheduler, params)
    params = dataclasses.replace(params, steps=len(timesteps))
    size = (int(params.height or 0), int(params.width or 0))
    prompt = families.of(model).encode(model, params.prompt, params.negative_prompt, size)
    cond = families.of(model).conditioning(model, prompt, float(params.guidance_scale or 0.0))
    token_ids = prompt.token_ids

    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator(device=model.device).manual_seed(params.seed)
    f = model.vae_scale_factor
    shape = (1, families.of(model).latent_channels(model), int(params.height or 0) // f, int(params.width or 0) // f)
    latents = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow models: unit noise, no attribute
    is_ddim = params.scheduler == "ddim"
    n = len(timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if check is not None:
            check(i)
        t_next = timesteps[i + 1] if i + 1 < n else None
        # A copy of the scheduler before it steps, so a hook can replay this step on perturbed inputs.
        before = None if is_ddim or on_step is None else copy.deepcopy(scheduler)
        rng_state = None if before is None else generator.get_state()
        with torch.no_grad():
            latent_in = _scale_input(scheduler, latents, t)
            eps = runner.guided(latent_in, t, cond)
            if is_ddim:
                nxt = ddim_step(scheduler, eps, int(t), t_next, latents)
            else:
                nxt = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        if on_step is not None:
            x0 = predict_x0(scheduler, latent_in, eps, float(t))
            step_fn, scale_fn = _replay(scheduler if is_ddim else before, is_ddim, t, t_next, rng_state)
            to_x0 = functools.partial(predict_x0, scheduler, timestep=float(t))
            on_step(StepState(i, n, timesteps[i], t, latent_in, eps, x0, nxt, cond, runner,
                              latents, step_fn, scale_fn, to_x0))
        latents = nxt
    return Generation(decode(model, latents), latents, timesteps, params, token_ids)
