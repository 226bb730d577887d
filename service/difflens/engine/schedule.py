"""Timestep lists: the schedulers' uniform spacing, exponential early/late packing (docs/method.md, R3) and validation
of explicit lists."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from difflens.engine.options import MAX_SHIFT, SCHEDULERS
from difflens.errors import InvalidArgument

# Request name -> (diffusers class, config overrides).
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
}


# Flow-matching models (SD3, FLUX) ship this scheduler; of the request names only "euler" means anything for them
# (the velocity's Euler step), and it means this class on the model's own config (shift, dynamic shifting).
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_SCHEDULERS: tuple[str, ...] = ("euler",)


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config (its scheduler_config.json, with `_class_name`) is a flow-matching one."""
    return config.get("_class_name") == FLOW_SCHEDULER


def schedulers_for(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The request scheduler names a model with this scheduler config takes."""
    return FLOW_SCHEDULERS if is_flow(config) else SCHEDULERS


def new_scheduler(config: Mapping[str, Any], name: str):
    """A fresh diffusers scheduler of request name `name` (SCHEDULER_CLASSES) on a model's scheduler config; on a
    flow-matching config, "euler" is FlowMatchEulerDiscreteScheduler and any other name InvalidArgument."""
    import diffusers

    raw = {k: v for k, v in config.items() if k != "_class_name"}
    if is_flow(config):
        if name not in FLOW_SCHEDULERS:
            raise InvalidArgument("scheduler", f"got {name!r}; this flow-matching model allows: "
                                               f"{', '.join(FLOW_SCHEDULERS)}")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(raw)
    cls_name, extra = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(raw, **extra)


def flow_sigmas(timesteps: Sequence[int], num_train_timesteps: int) -> list[float]:
    """An integer timestep list (exponential or explicit sampling, each in [0, T)) as a flow model's unshifted
    sigmas: t -> (t + 1) / T, so that T - 1 is pure noise (sigma 1, where the uniform schedule starts) and 0 the
    last sigma of a T-step uniform schedule. The scheduler then shifts them (its `shift`, or `mu` under dynamic
    shifting) as it shifts its own uniform sigmas."""
    return [(int(t) + 1) / num_train_timesteps for t in timesteps]


def uniform_timesteps(scheduler, num_steps: int, num_train_timesteps: int, device: Any = None) -> tuple[list[int],
                                                                                                          bool]:
    """The `num_steps` timesteps `scheduler` spaces uniformly by its config (set on it), as integers, and whether
    they had to be corrected (the caller then sets the list explicitly).

    The one correction: "trailing" spacing takes np.arange(T, 0, -T/n), which for some n (61, 103, 121, ... of
    1000) has one more element than n because of float rounding; that extra last timestep is -1, which would run
    one more UNet call and index alphas_cumprod from the end. It is dropped. Any other list that is not n distinct
    timesteps in [0, T), strictly decreasing (e.g. n = T with "leading" spacing and steps_offset 1 reaches T),
    raises InvalidArgument on "steps" with the largest n that works.
    """
    ts, corrected = _spaced(scheduler, num_steps, device)
    problem = _uniform_problem(ts, num_steps, num_train_timesteps)
    if problem:
        top = next((n for n in range(num_steps - 1, 0, -1)
                    if _uniform_problem(_spaced(scheduler, n)[0], n, num_train_timesteps) is None), 1)
        raise InvalidArgument("steps", f"got {num_steps}; this model's {type(scheduler).__name__} config spaces "
                                       f"them with {problem}; allowed [1, {top}]")
    return ts, corrected


def _spaced(scheduler, n: int, device: Any = None) -> tuple[list[int], bool]:
    """The scheduler's uniform list for n steps as integers, without trailing spacing's spurious -1 (and whether
    it was there)."""
    scheduler.set_timesteps(n, device=device)
    ts = [int(t) for t in scheduler.timesteps]
    if len(ts) == n + 1 and ts[-1] < 0:
        return ts[:n], True
    return ts, False


def _uniform_problem(ts: list[int], n: int, T: int) -> str | None:
    if len(ts) != n:
        return f"{len(ts)} timesteps instead of {n}"
    out = [t for t in ts if not 0 <= t < T]
    if out:
        return f"timesteps {out[:3]} outside [0, {T - 1}]"
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        return "repeated timesteps"
    return None


# Per request name: the class defaults from_config fills in for keys a model's scheduler config lacks, and the
# config flags under which the class derives its timesteps from a sigma schedule (not reproduced by `spacing`).
_SPACING_DEFAULTS = {"ddim": "leading", "ddpm": "leading", "dpmsolver++": "linspace", "euler": "linspace"}
_SIGMA_FLAGS = {"ddim": (), "ddpm": (),
                "dpmsolver++": ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                "use_flow_sigmas"),
                "euler": ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")}


def spacing(config: Mapping[str, Any], name: str, n: int) -> tuple[list[int], bool] | None:
    """What `_spaced(new_scheduler(config, name), n)` gives, computed without diffusers (the torch-free front
    validates with it): the integer timesteps of the scheduler's linspace / leading / trailing spacing, less
    trailing spacing's spurious -1, and whether it was there. None where the config makes the class derive its
    timesteps otherwise (a sigma schedule such as Karras', DPM-Solver's clipped lambda, continuous Euler
    timesteps, an unknown spacing); a test compares it with diffusers for every n."""
    T = int(config.get("num_train_timesteps", 1000))
    kind = config.get("timestep_spacing", _SPACING_DEFAULTS[name])
    offset = int(config.get("steps_offset", 0))
    if any(config.get(flag) for flag in _SIGMA_FLAGS[name]) or not 1 <= n <= T:
        return None
    if name == "euler" and config.get("timestep_type", "discrete") != "discrete":
        return None
    if name == "dpmsolver++":
        if config.get("lambda_min_clipped", -math.inf) != -math.inf:
            return None
        return _dpm_spacing(kind, T, n, offset)
    ts: Any
    if kind == "linspace":
        dtype = np.float32 if name == "euler" else np.float64
        raw = np.linspace(0, T - 1, n, dtype=dtype)[::-1]
        ts = raw if name == "euler" else raw.round()
    elif kind == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + offset
    elif kind == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        return None
    return _without_spurious(ts.astype(np.float32 if name == "euler" else np.int64), n)


def _dpm_spacing(kind: str, T: int, n: int, offset: int) -> tuple[list[int], bool] | None:
    """DPMSolverMultistepScheduler's spacings with lambda_min_clipped at -inf (its last timestep is T)."""
    ts: Any
    if kind == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif kind == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + offset
    elif kind == "trailing":
        ts = np.arange(T, 0, -T / n).round() - 1
    else:
        return None
    return _without_spurious(ts.astype(np.int64), n)


def _without_spurious(ts: Any, n: int) -> tuple[list[int], bool]:
    out = [int(t) for t in ts]
    if len(out) == n + 1 and out[-1] < 0:
        return out[:n], True
    return out, False


def check_uniform_steps(config: Mapping[str, Any], name: str, num_steps: int, num_train_timesteps: int) -> None:
    """Raise InvalidArgument on "steps" when scheduler `name` on this scheduler config has no uniform list of
    `num_steps` timesteps (request validation, before anything runs). Cached per config, scheduler and n.

    Without diffusers (the torch-free front), a config `spacing` does not reproduce is left to the worker, which
    checks it the same way when it resolves the job (INVALID_ARGUMENT on steps then, naming the same range)."""
    if is_flow(config):  # n sigmas spaced over (0, 1]: distinct for every n in [1, T], nothing to check
        return
    key = json.dumps(dict(config), sort_keys=True, default=str)
    _check_uniform_cached(key, name, num_steps, num_train_timesteps)


@functools.lru_cache(maxsize=1024)
def _check_uniform_cached(config_json: str, name: str, num_steps: int, num_train_timesteps: int) -> None:
    config = json.loads(config_json)
    if spacing(config, name, num_steps) is None:
        if importlib.util.find_spec("diffusers") is not None:
            uniform_timesteps(new_scheduler(config, name), num_steps, num_train_timesteps)
        return

    def problem(n: int) -> str | None:
        spaced = spacing(config, name, n)
        return None if spaced is None else _uniform_problem(spaced[0], n, num_train_timesteps)

    found = problem(num_steps)
    if found:
        top = next((n for n in range(num_steps - 1, 0, -1) if problem(n) is None), 1)
        raise InvalidArgument("steps", f"got {num_steps}; this model's {SCHEDULER_CLASSES[name][0]} config spaces "
                                       f"them with {found}; allowed [1, {top}]")


def exponential_timesteps(
    stage: Literal["early", "late"], num_steps: int, shift: float, num_train_timesteps: int = 1000
) -> list[int]:
    """Timesteps packed toward t = T ("early", semantic stage) or t = 0 ("late", detail stage).

    Computed exactly as the reference code does (float power, truncation by int()), so results match it to the
    integer. Larger `shift` (lambda) packs more mildly. Raises InvalidArgument when the result is not strictly
    decreasing, naming n and lambda: a small lambda repeats timesteps at the packed end, a very large one (the
    steps then crowd near one end) elsewhere; the error says which way to move lambda.
    """
    if stage not in ("early", "late"):
        raise InvalidArgument("sampling.kind", f"got {stage!r}; allowed: early, late")
    if num_steps < 1:
        raise InvalidArgument("steps", f"got {num_steps}; must be >= 1")
    if shift < 0:
        raise InvalidArgument("sampling.shift", f"got {shift}; must be >= 0")
    ts = _exponential(stage, num_steps, shift, num_train_timesteps)
    try:
        check_timesteps(ts, num_train_timesteps)
    except InvalidArgument as e:
        raise InvalidArgument(
            "sampling.shift",
            f"exponential {stage} schedule with n={num_steps}, lambda={shift} is not strictly decreasing "
            f"({e.message}); {_shift_hint(stage, num_steps, shift, num_train_timesteps)}",
        ) from None
    return ts


def _exponential(stage: str, n: int, shift: float, T: int) -> list[int]:
    a = T ** (1 / (n + shift))
    if stage == "late":
        ts = sorted((int(a ** (k + 1 + shift)) for k in range(n)), reverse=True)
        if ts[0] == T:
            ts[0] = T - 1
        return ts
    return [T - 1] + [T - int(a ** (k + 1 + shift)) for k in range(n - 1)]


def _shift_hint(stage: str, n: int, shift: float, T: int) -> str:
    def works(lam: float) -> bool:
        try:
            check_timesteps(_exponential(stage, n, lam, T), T)
        except InvalidArgument:
            return False
        return True

    lam = shift  # up, doubling; each suggestion an integer, the value printed being the one that was tried
    while lam < MAX_SHIFT:
        lam = float(min(math.ceil(2 * lam + 10), MAX_SHIFT))
        if works(lam):
            return f"use a larger lambda (e.g. {lam:g}) or fewer steps"
    lam = shift  # down, halving
    while lam > 0:
        lam = float(math.floor(lam / 2))
        if works(lam):
            return f"use a smaller lambda (e.g. {lam:g}) or fewer steps"
    return "use fewer steps"


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """Validate an explicit list: integers in [0, T), strictly decreasing. Returns it as a list of int."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise InvalidArgument("sampling.timesteps", "must not be empty")
    out = [t for t in ts if not 0 <= t < num_train_timesteps]
    if out:
        # a few of them: the message must still say what is allowed within its 1 KiB (api/interceptors.py)
        shown = f"{out[:5]}" + (f" and {len(out) - 5} more" if len(out) > 5 else "")
        raise InvalidArgument("sampling.timesteps", f"{shown} out of range; allowed [0, {num_train_timesteps - 1}]")
    for i in range(1, len(ts)):
        if ts[i] >= ts[i - 1]:
            raise InvalidArgument(
                "sampling.timesteps",
                f"must be strictly decreasing; position {i} has {ts[i]} after {ts[i - 1]}",
            )
    return ts
