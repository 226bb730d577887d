"""The faithfulness suite: prompt fidelity (and R3's schedules), then explain generated scenes and measure the maps
against the ground truth of each generated image.

1. Fidelity: `fidelity_images` held-out single-object captions, generated in batches with the model's default
   scheduler, steps and guidance, scored by the checker; R3: the same captions and noise with the exponential
   early and late schedules (lambda = `shift`).
2. Explanation: held-out captions in a fixed shuffled order are generated one at a time with the model's
   defaults; an image whose checker result is not exactly one object of the caption's colour and shape is
   excluded (counted by reason) and the next caption is tried, until `explain_captions` images are accepted or
   `explain_captions * max_candidates_factor` were tried. Each accepted image is explained by
   engine.explain.run_explanation (DF-RISE, DF-CAM, attention) at `steps` spread over the trajectory; the
   StepStates of the same (deterministic) trajectory, captured by a plain generate, drive the deletion /
   insertion curves and the randomised-UNet sanity maps. The two trajectories must give the same image.
   The sanity check's chance level pairs each map with the randomised UNet's map of the previous accepted image
   at the same step: two maps that share neither input nor weights, only the method.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from difflens.engine import cam, rise
from difflens.engine.explain import run_explanation, to_uint8
from difflens.engine.faithfulness import spearman
from difflens.engine.loading import Model
from difflens.engine.options import (
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    MaskKind,
    MaskSampler,
    RiseEstimator,
    RiseOptions,
    Sampling,
    ScoreKind,
    SsimPadding,
    StepSelector,
)
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import StepState, decode, generate
from difflens.engine.schedule import exponential_timesteps
from difflens.engine.tokens import prompt_tokens
from difflens.engine.validate import resolve_generation
from difflens.errors import InvalidArgument
from difflens.evaluation import metrics
from difflens.evaluation.ground_truth import Regions, object_formed, regions_from_image
from difflens.evaluation.sampling import caption_object, decode_batch, fidelity, held_out_set
from difflens.evaluation.sanity import explain_state, on_runner, randomised_copy
from difflens.scenes.captions import held_out_captions
from difflens.scenes.render import ObjectSpec

GroundTruth = Callable[[np.ndarray, ObjectSpec, int], Regions | str]
Log = Callable[[str], None]
Schedule = Literal["uniform", "early", "late"]
EXPLAIN_SEED_OFFSET = 10_000  # explained images never share noise with the fidelity images


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of a run. steps: how many explained steps, spread evenly over the trajectory (first and last
    included), or explicit step indices. rise_mask / rise_grid_size / rise_score / rise_ssim_padding / rise_sampler /
    rise_antithetic / rise_estimator: the DF-RISE variant judged (RiseOptions' mask, grid_size, score,
    ssim_padding, sampler, antithetic, estimator)."""

    fidelity_images: int = 200
    explain_captions: int = 16
    max_candidates_factor: int = 4
    masks: int = 256
    rise_batch: int = 32
    steps: int | tuple[int, ...] = 6
    chunks: int = 16
    shift: float = 60.0
    seed: int = 0
    batch_size: int = 64
    schedules: tuple[Schedule, ...] = ("uniform", "early", "late")
    # R3 again at these few step counts: at the model's default (25) every schedule can be perfect, and only
    # with few steps does it show which attributes the early (high-noise) or late steps carry. lambda is scaled
    # by n / default steps there: docs/method.md's curve packs by (k + 1 + lambda) / (n + lambda), so lambda = 60 at
    # n = 3 would put all "late" steps near t = T and the "early" ones near 0, the opposite of their stages.
    r3_steps: tuple[int, ...] = (3, 5)
    rise_mask: MaskKind = "pixel"
    rise_grid_size: int = 8
    rise_score: ScoreKind = "structure"
    rise_ssim_padding: SsimPadding = "zero"
    rise_sampler: MaskSampler = "mc"
    rise_antithetic: bool = False
    rise_estimator: RiseEstimator = "ratio"

    def rise_options(self) -> RiseOptions:
        """The DF-RISE options every explained step uses (InvalidArgument naming rise.<field> when invalid)."""
        return RiseOptions(num_masks=self.masks, batch_size=self.rise_batch, seed=self.seed,
                           mask=self.rise_mask, grid_size=self.rise_grid_size, score=self.rise_score,
                           ssim_padding=self.rise_ssim_padding, sampler=self.rise_sampler,
                           antithetic=self.rise_antithetic, estimator=self.rise_estimator)

    def __post_init__(self) -> None:
        for name in ("fidelity_images", "explain_captions", "max_candidates_factor", "masks", "rise_batch",
                     "chunks", "batch_size"):
            if getattr(self, name) < (0 if name in ("fidelity_images", "explain_captions") else 1):
                raise InvalidArgument(name, f"got {getattr(self, name)}; must be positive")
        self.rise_options()
        if isinstance(self.steps, int) and self.steps < 1:
            raise InvalidArgument("steps", f"got {self.steps}; must be >= 1")
        if any(n < 1 for n in self.r3_steps):
            raise InvalidArgument("r3_steps", f"got {list(self.r3_steps)}; each must be >= 1")
        for s in self.schedules:
            if s not in ("uniform", "early", "late"):
                raise InvalidArgument("schedules", f"got {s!r}; allowed: uniform, early, late")


def explained_steps(num_steps: int, steps: int | Sequence[int]) -> list[int]:
    """Step indices to explain: `steps` evenly spread over 0..num_steps-1 (ends included), or the given ones."""
    if isinstance(steps, int):
        return sorted({int(round(x)) for x in np.linspace(0, num_steps - 1, min(steps, num_steps))})
    bad = [i for i in steps if not 0 <= i < num_steps]
    if bad:
        raise InvalidArgument("steps", f"{bad} out of range; allowed 0..{num_steps - 1}")
    return sorted(set(steps))


def run_fidelity(model: Model, cfg: EvalConfig, log: Log) -> dict[str, Any]:
    """Checker accuracy per attribute on held-out captions, for each schedule of `cfg.schedules`, at the model's
    default step count and (under "few_steps", keyed by the count) at each of `cfg.r3_steps`."""
    captions, seeds = held_out_set(cfg.fidelity_images)
    n0 = int(model.defaults.steps)
    out: dict[str, Any] = {"images": len(captions), "distinct_captions": len(set(captions)), "shift": cfg.shift,
                           **_schedules(model, cfg, captions, seeds, n0, cfg.shift, log),
                           "few_steps": {str(n): _schedules(model, cfg, captions, seeds, n, cfg.shift * n / n0, log)
                                         for n in cfg.r3_steps}}
    return out


def _schedules(model: Model, cfg: EvalConfig, captions: list[str], seeds: list[int], n: int, shift: float,
               log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": n, "shift": shift, "fidelity": {}, "timesteps": {}}
    for kind in cfg.schedules:
        t0 = time.perf_counter()
        sampling = Sampling(kind, shift=shift)
        if kind != "uniform":
            out["timesteps"][kind] = exponential_timesteps(kind, n, shift, model.num_train_timesteps)
        out["fidelity"][kind] = fidelity(model, captions, seeds, sampling, cfg.batch_size, steps=n) \
            if captions else {}
        log(f"fidelity ({kind}, {n} steps): {out['fidelity'][kind]} in {time.perf_counter() - t0:.0f} s")
    return out


@dataclass
class _Explainer:
    """What every explained image shares: options, the mask set, layers, the randomised UNet, and the randomised
    UNet's maps of the last accepted image per step index (the sanity check's chance pairs)."""

    model: Model
    cfg: EvalConfig
    runner: UNetRunner
    random_runner: UNetRunner
    rise_opts: RiseOptions
    cam_opts: CamOptions
    cam_layers: tuple[str, ...]
    last_random_maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: Model, cfg: EvalConfig) -> _Explainer:
        rand = randomised_copy(model.unet, seed=cfg.seed + 1)
        return cls(model, cfg, UNetRunner(model.unet), UNetRunner(rand),
                   cfg.rise_options(), CamOptions(),
                   cam.resolve_layers(model.unet, ()))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_batch(self.model, latents)

    def explain_image(self, caption: str, seed: int, ground_truth: GroundTruth) -> list[dict[str, Any]] | str:
        """Records of one caption (one per explained step), or why its image was excluded."""
        model, spec = self.model, caption_object(caption)
        params = GenerationParams(caption, seed=seed)
        n = int(resolve_generation(model, params).steps or 0)
        selected = explained_steps(n, self.cfg.steps)
        states: dict[int, StepState] = {}
        gen = generate(model, params, runner=self.runner,
                       on_step=lambda s: states.__setitem__(s.index, s) if s.index in selected else None)
        image = to_uint8(gen.image)
        regions = ground_truth(image, spec, model.vae_scale_factor)
        if isinstance(regions, str):
            return regions
        options = ExplainOptions(StepSelector("list", indices=tuple(selected)), rise=self.rise_opts,
                                 cam=self.cam_opts, attention=AttentionOptions())
        exp = run_explanation(model, params, options, runner=self.runner)
        if not np.array_equal(exp.image, image):
            raise RuntimeError(f"explaining changed the image of {caption!r} (seed {seed})")
        tokens = prompt_tokens(model.tokenizer, caption)
        h, w = states[selected[0]].latent_in.shape[-2:]
        masks = rise.make_masks(self.rise_opts, (int(h), int(w)), model.device)
        return [self._record(caption, seed, step.index, step.timestep, states[step.index],
                             metrics.method_maps(step.maps, exp.tokens, spec), step.maps["rise_mean"], regions,
                             masks, tokens, exp.tokens, spec)
                for step in exp.steps]

    def _record(self, caption: str, seed: int, index: int, timestep: int, state: StepState,
                maps: dict[str, torch.Tensor], rise_mean: torch.Tensor, regions: Regions, masks: torch.Tensor,
                tokens: Any, words: list[str], spec: ObjectSpec) -> dict[str, Any]:
        f = self.model.vae_scale_factor
        random_state = on_runner(state, self.random_runner)
        random_maps = metrics.method_maps(
            explain_state(random_state, self.rise_opts, masks, self.cam_opts, self.cam_layers, tokens), words, spec)
        other_image = self.last_random_maps.get(index, {})
        self.last_random_maps[index] = random_maps
        h, w = state.latent_in.shape[-2:]
        order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed * 1000 + index))
        record: dict[str, Any] = {
            "caption": caption, "seed": seed, "step": index, "timestep": timestep,
            "formed": object_formed(to_uint8(decode(self.model, state.x0)), regions.object, f),
            "random": metrics.curves(state, maps["rise"], self.decode, self.cfg.chunks, order=order),
            "methods": {},
        }
        reference = {"object_mask": torch.from_numpy(regions.object).float()}
        for name, sal in (maps | reference).items():
            r = metrics.region_scores(sal, regions)
            if name in random_maps:
                r["sanity_spearman"] = spearman(sal, random_maps[name])
            if name in other_image:
                # What the Spearman is when the map changed completely: smooth maps (DF-CAM sums 2 x 2 and 4 x 4
                # layers) correlate well above 0 by chance, so the sanity figure is read against this.
                r["sanity_chance_spearman"] = spearman(sal, other_image[name])
            if name in metrics.CURVED:
                # ties (the reference mask is two-valued) in the random baseline's order, not raster order
                r |= metrics.curves(state, sal, self.decode, self.cfg.chunks, tie_break=order)
            record["methods"][name] = r
        record["methods"]["rise"]["baseline_spearman"] = spearman(maps["rise"], rise_mean)
        return record


def run_explanations(model: Model, cfg: EvalConfig, ground_truth: GroundTruth, log: Log) -> dict[str, Any]:
    """Explain up to `cfg.explain_captions` accepted images; -> {"records", "accepted", "screened", "excluded",
    "captions", "steps"}."""
    pool = held_out_captions(two_objects=False)
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    ex = _Explainer.build(model, cfg)
    records: list[dict[str, Any]] = []
    excluded: Counter[str] = Counter()
    accepted: list[str] = []
    screened = 0
    for k in range(cfg.explain_captions * cfg.max_candidates_factor):
        if len(accepted) >= cfg.explain_captions:
            break
        caption, seed = pool[order[k % len(pool)]], EXPLAIN_SEED_OFFSET + cfg.seed * 100_000 + k
        screened += 1
        t0 = time.perf_counter()
        got = ex.explain_image(caption, seed, ground_truth)
        if isinstance(got, str):
            excluded[got] += 1
            continue
        records.extend(got)
        accepted.append(caption)
        log(f"explained {len(accepted)}/{cfg.explain_captions}: {caption!r} (seed {seed}) "
            f"in {time.perf_counter() - t0:.1f} s")
    steps = sorted({r["step"] for r in records})
    return {"records": records, "accepted": len(accepted), "screened": screened, "excluded": dict(excluded),
            "captions": accepted, "steps": steps}


def run_suite(model: Model, cfg: EvalConfig, *, ground_truth: GroundTruth = regions_from_image,
              log: Log = lambda _: None) -> dict[str, Any]:
    """Everything `difflens evaluate` measures, as one JSON-ready dict (NaN where nothing could be measured)."""
    t_start = time.perf_counter()
    r3 = run_fidelity(model, cfg, log)
    t_fid = time.perf_counter()
    explained = run_explanations(model, cfg, ground_truth, log)
    records, steps = explained.pop("records"), explained["steps"]
    t_end = time.perf_counter()
    summary: dict[str, Any] = {
        "model": str(model.path),
        "defaults": dataclasses.asdict(model.defaults),
        "config": dataclasses.asdict(cfg),
        "fidelity": dict(r3["fidelity"].get("uniform", {})) | {"images": r3["images"],
                                                               "distinct_captions": r3["distinct_captions"]},
        "r3": r3,
        "explained": explained,
        **metrics.aggregate(records),
        "claim": metrics.early_late(records, steps),
        "series": metrics.per_step(records, steps),
        "curves": metrics.mean_curves(records),
        "seconds": {"fidelity": t_fid - t_start, "explanation": t_end - t_fid, "total": t_end - t_start},
    }
    return summary
