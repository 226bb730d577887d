"""Request-level parameters of a generation and of its explanation, as plain frozen dataclasses.

These are the domain types every edge (Python API, CLI, gRPC) converts into. `None` on a generation field means
"the model's recommended default" (see `loading.ModelDefaults`). Validation of values that need the model
(resolution multiples, layer paths) happens in `validate.py`; values that do not are checked here on creation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from difflens.errors import InvalidArgument

if TYPE_CHECKING:  # torch stays out of this module's import so the CLI parser builds without it
    import torch

SchedulerName = Literal["ddim", "ddpm", "dpmsolver++", "euler"]
SamplingKind = Literal["uniform", "early", "late", "explicit"]
MAX_SHIFT = 10_000.0  # lambda of exponential sampling
MaskKind = Literal["pixel", "grid"]
MaskSampler = Literal["mc", "stratified", "sobol"]
RiseEstimator = Literal["ratio", "regression"]
REGRESSION_MIN_MASKS = 16  # per-pixel fits of 4 coefficients: below this, noisier than the ratio (bench.masks)
Substrate = Literal["zero", "blur"]
SsimPadding = Literal["zero", "reflect"]
ScoreKind = Literal["structure", "cosine"]
RiseTarget = Literal["eps", "x_prev"]
CamTarget = Literal["output_sum", "guided_sum", "guided_sqnorm"]
StepsKind = Literal["all", "list", "every"]
MethodName = Literal["rise", "cam", "attn"]
Backend = Literal["eager", "compile", "triton"]  # triton: the UNet on a Triton server (runner.RemoteUNet)

SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
METHODS: tuple[str, ...] = get_args(MethodName)
SAMPLING_KINDS: tuple[str, ...] = get_args(SamplingKind)
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)
MASK_SAMPLERS: tuple[str, ...] = get_args(MaskSampler)
RISE_ESTIMATORS: tuple[str, ...] = get_args(RiseEstimator)
SOBOL_MAX_DIM = 21201  # torch.quasirandom.SobolEngine.MAXDIM (kept here: the front validates without torch)
SUBSTRATES: tuple[str, ...] = get_args(Substrate)
SCORES: tuple[str, ...] = get_args(ScoreKind)
SSIM_PADDINGS: tuple[str, ...] = get_args(SsimPadding)
RISE_TARGETS: tuple[str, ...] = get_args(RiseTarget)
CAM_TARGETS: tuple[str, ...] = get_args(CamTarget)
BACKENDS: tuple[str, ...] = get_args(Backend)


def check_choice(field_name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgument(field_name, f"got {value!r}; allowed: {', '.join(allowed)}")


def check_range(field_name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise InvalidArgument(field_name, f"got {value}; allowed range [{lo}, {hi}]")


@dataclass(frozen=True)
class Sampling:
    """Which timesteps the generation visits.

    uniform: the scheduler's own spacing; early/late: exponential packing with shift lambda (docs/method.md);
    explicit: `timesteps`, strictly decreasing, each in [0, num_train_timesteps).
    """

    kind: SamplingKind = "uniform"
    shift: float = 60.0
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("sampling.kind", self.kind, get_args(SamplingKind))
        check_range("sampling.shift", self.shift, 0.0, MAX_SHIFT)
        if self.kind == "explicit":
            if not self.timesteps:
                raise InvalidArgument("sampling.timesteps", "explicit sampling needs a non-empty list")
        elif self.timesteps is not None:
            raise InvalidArgument("sampling.timesteps", f"only allowed with kind 'explicit', got kind {self.kind!r}")


@dataclass(frozen=True)
class GenerationParams:
    """What to generate. `None` fields take the model's recommended defaults."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: SchedulerName | None = None
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidArgument("prompt", "must be a string")
        check_range("seed", self.seed, 0, 2**63 - 1)
        if self.steps is not None:
            check_range("steps", self.steps, 1, 1000)
        if self.guidance_scale is not None:
            check_range("guidance_scale", self.guidance_scale, 0.0, 50.0)
        if self.scheduler is not None:
            check_choice("scheduler", self.scheduler, SCHEDULERS)


@dataclass(frozen=True)
class StepSelector:
    """Which denoising steps (indices 0..n-1) to explain: all, an explicit list, or every k-th from 0."""

    kind: StepsKind = "all"
    indices: tuple[int, ...] = ()
    every: int = 1

    def __post_init__(self) -> None:
        check_choice("explain.steps.kind", self.kind, get_args(StepsKind))
        if self.kind == "list" and not self.indices:
            raise InvalidArgument("explain.steps.indices", "kind 'list' needs at least one step index")
        if self.kind == "every":
            check_range("explain.steps.every", self.every, 1, 1000)

    def select(self, num_steps: int) -> list[int]:
        if self.kind == "all":
            return list(range(num_steps))
        if self.kind == "every":
            return list(range(0, num_steps, self.every))
        bad = [i for i in self.indices if not 0 <= i < num_steps]
        if bad:
            raise InvalidArgument("explain.steps.indices", f"{bad} out of range; allowed 0..{num_steps - 1}")
        return sorted(set(self.indices))


@dataclass(frozen=True)
class RiseOptions:
    """DF-RISE (docs/method.md). `masks`, when given, is (N, h, w) in [0, 1] and overrides num_masks/p/kind/seed/
    sampler/antithetic.

    structure_2x: the reference code's 2*sigma_xy numerator (parity flag).
    ssim_padding: how the structure term's 15 x 15 window sees past the latent's border - "reflect" (the default:
    the border's own pixels, mirrored) or "zero" (the paper's / reference code's padding, docs/method.md's parity
    option: the padded zeros count as data, identical in both inputs, which raises the score on a 7-pixel ring; on
    a 32 x 32 latent that ring decides where the map peaks).
    sampler: how the masks' uniform draws are made (engine/masks.py) - "mc" (independent, the reference code's),
    "stratified" (per pixel, or grid cell, the N draws take one of N equal strata each: every pixel is kept
    round(N p) times, to within 1) or "sobol" (scrambled Sobol points, one dimension per pixel or grid cell).
    antithetic: masks come in pairs drawn from one uniform U: M keeps where U < p, its partner where U >= 1 - p
    (for p = 0.5 exactly 1 - M; for p < 0.5 the two never both keep a pixel). num_masks must then be even.
    stop_at_r: stop early, after a batch, once at least `min_masks` masks ran and the split-half Pearson r of the
    DF-RISE map (even-numbered masks' map against odd-numbered masks'; antithetic pairs, and Sobol's consecutive
    points, which at p = 0.5 mirror each other too, go whole to one half) is >= stop_at_r; None: run all
    num_masks. The masks used and r are reported with the step (RiseStats).
    estimator: how the map is read off the scores (engine/rise_regression.py) - "ratio" (RISE's H / sum_k M_k, the
    reference code's; the default) or "regression" (per pixel, a least-squares fit of the scores on the pixel's
    own mask bit and two mask covariates whose expectation the design fixes: an estimate of the same
    E[s(u) | M(u) = 1] with a fraction of the masks' noise). regression needs drawn pixel masks (mask "pixel",
    no explicit masks): the covariates' expectation comes from the design; and at least 16 masks.
    """

    num_masks: int = 256
    p: float = 0.5
    mask: MaskKind = "pixel"
    grid_size: int = 8
    substrate: Substrate = "zero"
    score: ScoreKind = "structure"
    structure_2x: bool = False
    ssim_padding: SsimPadding = "reflect"
    target: RiseTarget = "eps"
    batch_size: int = 32
    seed: int = 0
    masks: torch.Tensor | None = field(default=None, compare=False, repr=False)
    sampler: MaskSampler = "mc"
    antithetic: bool = False
    stop_at_r: float | None = None
    min_masks: int = 64
    estimator: RiseEstimator = "ratio"

    def __post_init__(self) -> None:
        check_range("rise.num_masks", self.num_masks, 1, 1_000_000)
        check_range("rise.p", self.p, 1e-6, 1.0)
        check_choice("rise.mask", self.mask, get_args(MaskKind))
        if self.grid_size < 1:  # the upper bound is the latent's smaller side: rise.make_masks checks it
            raise InvalidArgument("rise.grid_size", f"got {self.grid_size}; must be >= 1")
        check_choice("rise.substrate", self.substrate, get_args(Substrate))
        check_choice("rise.score", self.score, get_args(ScoreKind))
        check_choice("rise.ssim_padding", self.ssim_padding, get_args(SsimPadding))
        check_choice("rise.target", self.target, get_args(RiseTarget))
        check_range("rise.batch_size", self.batch_size, 1, 4096)
        check_range("rise.seed", self.seed, 0, 2**63 - 1)  # as the generation seed: one range everywhere
        if self.masks is not None and self.masks.dim() != 3:
            raise InvalidArgument("rise.masks", f"must be (N, h, w), got shape {tuple(self.masks.shape)}")
        check_choice("rise.sampler", self.sampler, get_args(MaskSampler))
        if not isinstance(self.antithetic, bool):
            raise InvalidArgument("rise.antithetic", f"got {self.antithetic!r}; allowed: true, false")
        if self.antithetic and self.masks is None and self.num_masks % 2:
            raise InvalidArgument("rise.num_masks", f"got {self.num_masks}; antithetic masks come in pairs: "
                                                    "must be even")
        if self.antithetic and self.sampler == "sobol" and self.p == 0.5 and self.masks is None:
            # the first binary digit of consecutive Sobol points differs: at p = 0.5 mask 2j + 1 is already 1 - mask 2j
            raise InvalidArgument("rise.antithetic", "sobol masks at p = 0.5 already come in mirrored pairs; "
                                                     "antithetic would draw every mask twice")
        check_choice("rise.estimator", self.estimator, get_args(RiseEstimator))
        if self.estimator == "regression" and (self.mask != "pixel" or self.masks is not None):
            what = "explicit masks" if self.masks is not None else f"mask {self.mask!r}"
            raise InvalidArgument("rise.estimator", f"'regression' needs drawn pixel masks (mask 'pixel', no explicit "
                                                    f"masks): its covariates' expectation comes from the design; got "
                                                    f"{what} (use estimator 'ratio')")
        if self.estimator == "regression" and self.num_masks < REGRESSION_MIN_MASKS:
            raise InvalidArgument("rise.num_masks", f"got {self.num_masks}; estimator 'regression' needs at least "
                                                    f"{REGRESSION_MIN_MASKS} (four coefficients per pixel: with "
                                                    "fewer masks its map is noisier than the ratio's)")
        check_range("rise.min_masks", self.min_masks, 4, 1_000_000)  # two a half, or one pair a half
        if self.stop_at_r is not None:
            check_range("rise.stop_at_r", self.stop_at_r, 0.0, 1.0)
            if self.masks is None and self.min_masks > self.num_masks:
                raise InvalidArgument("rise.min_masks", f"got {self.min_masks}; must be at most rise.num_masks "
                                                        f"({self.num_masks}) to stop early")

    def check_latent(self, size: tuple[int, int]) -> None:
        """What the options need of the latent size (h, w), checked by the front before queueing and by the
        engine: grid cells no smaller than a latent pixel, and Sobol's dimension limit (one dimension per latent
        pixel, or per grid cell)."""
        if self.masks is not None:
            return
        if self.mask == "grid":
            check_range("rise.grid_size", self.grid_size, 1, min(size))
        dims = self.grid_size ** 2 if self.mask == "grid" else size[0] * size[1]
        if self.sampler == "sobol" and dims > SOBOL_MAX_DIM:
            what = f"{self.grid_size} x {self.grid_size} grid cells" if self.mask == "grid" else \
                f"{size[0]} x {size[1]} latent pixels"
            raise InvalidArgument("rise.sampler", f"'sobol' draws one dimension per mask value, {what} = {dims}; "
                                                  f"allowed at most {SOBOL_MAX_DIM} (use stratified or mc)")


@dataclass(frozen=True)
class RiseStats:
    """What DF-RISE used at one step, reported with its maps: masks_used of masks_planned (fewer when it stopped
    early), the split-half Pearson r of the map over those masks (None where undefined: a half with no kept pixel
    or a constant map), and the stop_at_r it was run with (None: no early stopping)."""

    masks_used: int
    masks_planned: int
    split_half_r: float | None = None
    stop_at_r: float | None = None

    def describe(self) -> str:
        """'masks used: 96 of 256, split-half r 0.962 >= 0.95' (or '< 0.95: all masks ran')."""
        r = "undefined" if self.split_half_r is None else f"{self.split_half_r:.3f}"
        text = f"masks used: {self.masks_used} of {self.masks_planned}, split-half r {r}"
        if self.stop_at_r is None:
            return text
        if self.split_half_r is None:
            return f"{text}: all masks ran"
        if self.split_half_r >= self.stop_at_r:
            return f"{text} >= {self.stop_at_r:g}"
        return f"{text} < {self.stop_at_r:g}: all masks ran"


DEFAULT_CAM_LAYERS: tuple[str, ...] = ()  # empty = every resnet, attention and sampler of the UNet's blocks


@dataclass(frozen=True)
class CamOptions:
    """DF-CAM. `layers` are UNet module paths (e.g. 'up_blocks.0.resnets.1'); empty means the reference's set."""

    layers: tuple[str, ...] = DEFAULT_CAM_LAYERS
    target: CamTarget = "output_sum"

    def __post_init__(self) -> None:
        check_choice("cam.target", self.target, get_args(CamTarget))


@dataclass(frozen=True)
class AttentionOptions:
    """Cross-attention token maps (no options yet; presence turns it on)."""


@dataclass(frozen=True)
class ExplainOptions:
    steps: StepSelector = field(default_factory=StepSelector)
    rise: RiseOptions | None = None
    cam: CamOptions | None = None
    attention: AttentionOptions | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        named = (("rise", self.rise), ("cam", self.cam), ("attn", self.attention))
        return tuple(name for name, opt in named if opt is not None)
