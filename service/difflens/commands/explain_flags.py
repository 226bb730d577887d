"""The explanation flags of the command line (--methods, --explain-steps, DF-RISE and DF-CAM options), shared by
`difflens explain` and `difflens replay`, and their parsing into ExplainOptions.

`explain` starts from the defaults (all three methods on every step); `replay` starts from the audit record's
options, so a flag that is not given keeps what the record asked for. torch-free, so the parser builds fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from difflens.engine.options import (
    CAM_TARGETS,
    MASK_KINDS,
    MASK_SAMPLERS,
    METHODS,
    RISE_ESTIMATORS,
    RISE_TARGETS,
    SCORES,
    SSIM_PADDINGS,
    SUBSTRATES,
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    RiseOptions,
    StepSelector,
)
from difflens.errors import InvalidArgument

# flag dest -> RiseOptions / CamOptions field (the flags a method's options come from)
RISE_FLAGS = {"masks": "num_masks", "batch": "batch_size", "mask": "mask", "grid_size": "grid_size", "p": "p",
              "substrate": "substrate", "score": "score", "structure_2x": "structure_2x",
              "ssim_padding": "ssim_padding", "rise_target": "target", "mask_seed": "seed", "sampler": "sampler",
              "antithetic": "antithetic", "stop_at_r": "stop_at_r", "min_masks": "min_masks",
              "estimator": "estimator"}
CAM_FLAGS = {"cam_layers": "layers", "cam_target": "target"}


def choices_text(values: Sequence[str]) -> str:
    return "|".join(values)


def add_explanation_flags(p: argparse.ArgumentParser, *, keep: str | None = None) -> None:
    """The explanation group. keep=None: unset flags take the defaults (explain); keep='the record': unset flags
    keep that source's value (replay), and the help says so."""
    e = p.add_argument_group("explanation" if keep is None else f"explanation (default: as in {keep})")

    def d(default: str) -> str:  # a flag's own default, shown only where unset flags take the defaults
        return "" if keep else default

    e.add_argument("--methods", default=None if keep else "rise,cam,attn", metavar="rise,cam,attn|none",
                   help="comma-separated methods, or none" + d(" (default: all three)"))
    e.add_argument("--explain-steps", default=None if keep else "all", metavar="all|3,5,9|every:K",
                   help="which step indices (0-based) to explain" + d(" (default all)"))
    e.add_argument("--masks", type=int, help="DF-RISE: number of masks" + d(" (default 256)"))
    e.add_argument("--batch", type=int, help="DF-RISE: masks per UNet call" + d(" (default 32)"))
    e.add_argument("--mask", metavar=choices_text(MASK_KINDS), help="DF-RISE mask kind" + d(" (default pixel)"))
    e.add_argument("--grid-size", type=int, help="DF-RISE grid masks: cells per side" + d(" (default 8)"))
    e.add_argument("--p", type=float, help="DF-RISE: probability a mask keeps a pixel" + d(" (default 0.5)"))
    e.add_argument("--substrate", metavar=choices_text(SUBSTRATES),
                   help="DF-RISE masked-out value" + d(" (default zero)"))
    e.add_argument("--score", metavar=choices_text(SCORES), help="DF-RISE per-pixel score" + d(" (default structure)"))
    e.add_argument("--structure-2x", action="store_true", default=None,
                   help="DF-RISE: the reference code's 2*sigma_xy")
    e.add_argument("--ssim-padding", metavar=choices_text(SSIM_PADDINGS),
                   help="DF-RISE structure term's window past the border" + d(" (default reflect)") +
                        "; zero: the paper's / reference code's padding (docs/method.md's parity option)")
    e.add_argument("--rise-target", metavar=choices_text(RISE_TARGETS), help="DF-RISE reference" + d(" (default eps)"))
    e.add_argument("--mask-seed", type=int, help="DF-RISE mask seed" + d(" (default 0)"))
    e.add_argument("--sampler", metavar=choices_text(MASK_SAMPLERS),
                   help="DF-RISE mask draws: independent, stratified per pixel or scrambled Sobol" + d(" (default mc)"))
    e.add_argument("--antithetic", action="store_true", default=None,
                   help="DF-RISE: masks in pairs, M and its mirror (1 - M for p 0.5); --masks must be even")
    e.add_argument("--estimator", metavar=choices_text(RISE_ESTIMATORS),
                   help="DF-RISE map from the scores: RISE's ratio, or a per-pixel regression on mask covariates "
                        "(the same map from fewer masks; pixel masks, --masks >= 16)" + d(" (default ratio)"))
    e.add_argument("--stop-at-r", type=float, metavar="R",
                   help="DF-RISE: stop a step's masks once the split-half r of its map is >= R" + d(" (default: off)"))
    e.add_argument("--min-masks", type=int,
                   help="DF-RISE: masks before the split-half r is first checked" + d(" (default 64)"))
    e.add_argument("--cam-layers", metavar="a,b,...",
                   help="DF-CAM UNet module paths" + d(" (default: the reference set)"))
    e.add_argument("--cam-target", metavar=choices_text(CAM_TARGETS),
                   help="DF-CAM target scalar" + d(" (default output_sum)"))


def rise_summary(steps: Sequence[Any]) -> list[str]:
    """One line per explained step of a run that could stop DF-RISE early (StepExplanation.rise), e.g.
    'difflens: DF-RISE step 3 (t=519): masks used: 96 of 256, split-half r 0.962 >= 0.95'; none otherwise."""
    if not any(s.rise is not None and s.rise.stop_at_r is not None for s in steps):
        return []
    return [f"difflens: DF-RISE step {s.index} (t={s.timestep}): {s.rise.describe()}" for s in steps
            if s.rise is not None]


def parse_methods(text: str) -> tuple[str, ...]:
    items = [m.strip() for m in text.split(",") if m.strip()]
    if items == ["none"]:
        return ()
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise InvalidArgument("methods", f"got {text!r}; allowed: none or a comma-separated subset of "
                                         f"{','.join(METHODS)}")
    return tuple(dict.fromkeys(items))


def parse_ints(field: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgument(field, f"got {text!r}; expected comma-separated integers") from None
    if not values:
        raise InvalidArgument(field, "expected at least one integer")
    return values


def parse_step_selector(text: str) -> StepSelector:
    text = text.strip()
    if text == "all":
        return StepSelector("all")
    if text.startswith("every:"):
        every = parse_ints("explain.steps", text[len("every:"):])
        if len(every) != 1:
            raise InvalidArgument("explain.steps", f"got {text!r}; every:K takes one integer K")
        return StepSelector("every", every=every[0])
    try:
        return StepSelector("list", indices=parse_ints("explain.steps", text))
    except InvalidArgument:
        raise InvalidArgument("explain.steps", f"got {text!r}; allowed: all, every:K or a list like 3,5,9") from None


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The option fields whose flags were given (flag dest -> field name in `flags`)."""
    out = {field: getattr(args, dest) for dest, field in flags.items() if getattr(args, dest, None) is not None}
    if "layers" in out:
        out["layers"] = tuple(x.strip() for x in out["layers"].split(",") if x.strip())
    return out


def explanation_given(args: argparse.Namespace) -> bool:
    """Whether any explanation flag was given (replay: re-explain rather than replay as recorded)."""
    dests = ("methods", "explain_steps", *RISE_FLAGS, *CAM_FLAGS)
    return any(getattr(args, d, None) is not None for d in dests)


def explanation_options(args: argparse.Namespace, base: ExplainOptions | None = None) -> ExplainOptions:
    """The explanation flags -> ExplainOptions. Unset flags keep `base`'s value (None: the defaults). A DF-RISE
    or DF-CAM flag for a method that is not among the methods is an error naming the flag, not silently dropped."""
    base = base or ExplainOptions(rise=RiseOptions(), cam=CamOptions(), attention=AttentionOptions())
    methods = parse_methods(args.methods) if args.methods is not None else base.methods
    steps = parse_step_selector(args.explain_steps) if args.explain_steps is not None else base.steps
    rise_kw, cam_kw = _given(args, RISE_FLAGS), _given(args, CAM_FLAGS)
    for method, flags, given in (("rise", RISE_FLAGS, rise_kw), ("cam", CAM_FLAGS, cam_kw)):
        if given and method not in methods:
            dest = next(d for d, f in flags.items() if f in given)
            raise InvalidArgument(f"--{dest.replace('_', '-')}",
                                  f"a {method} option, but {method} is not among the methods "
                                  f"({','.join(methods) or 'none'})")
    from difflens.job_codec import options_from_dict  # imports numpy: not while the parser is built

    return ExplainOptions(
        steps=steps,
        rise=options_from_dict(RiseOptions, rise_kw, base.rise) if "rise" in methods else None,
        cam=options_from_dict(CamOptions, cam_kw, base.cam) if "cam" in methods else None,
        attention=AttentionOptions() if "attn" in methods else None,
    )
