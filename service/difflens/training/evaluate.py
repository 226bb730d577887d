"""How well a shapes model draws what its caption says, judged by the classical checker.

`python -m difflens.training.evaluate models/shapes --images 120 --guidance 1,1.5,2` prints per-attribute
accuracy on training captions and on held-out captions (never trained on) for each scheduler and guidance scale;
with `--write-defaults` it records the best pair in the folder's difflens.json.

Sampling here is batched (many captions at once) with the engine's scheduler classes; for one caption and DDIM it
is the engine's `generate` with the same noise (a test checks this).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflens.scenes.captions import caption, held_out_objects
from difflens.scenes.checker import score
from difflens.scenes.render import Scene
from difflens.training.data import Tokenize, sample_training_scene

ATTRS = ("count", "shape", "color", "texture", "size", "position")
# Among equally good set-ups, the guidance nearest this: classifier-free guidance then does something (the
# explainers combine its two branches) without over-guiding. At 1.0 the unconditional branch drops out.
TIE_GUIDANCE = 2.0


@torch.no_grad()
def sample_images(unet, text_encoder, tokenizer, scheduler_config, captions: Sequence[str], guidance: float,
                  steps: int, seed: int = 0, noise: torch.Tensor | None = None, batch_size: int = 64,
                  scheduler: str = "ddim") -> np.ndarray:
    """Classifier-free-guided sampling of every caption. -> (N, S, S, 3) float32 in [0, 1].

    noise: (N, 3, S, S) initial noise; default: drawn from `seed`. scheduler: a name of the engine's
    SCHEDULER_CLASSES (DDIM is deterministic, eta 0; stochastic ones draw their noise from `seed`).
    """
    import diffusers

    from difflens.engine.sampler import SCHEDULER_CLASSES

    cls_name, extra = SCHEDULER_CLASSES[scheduler]
    size = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    if noise is None:
        noise = torch.randn(len(captions), unet.config.in_channels, size, size, generator=g)
    tokenize = Tokenize(tokenizer)
    uncond = text_encoder(tokenize([""]))[0]
    out = []
    for lo in range(0, len(captions), batch_size):
        chunk = list(captions[lo:lo + batch_size])
        cond = text_encoder(tokenize(chunk))[0]
        embeds = torch.cat([uncond.expand_as(cond), cond])
        sched = getattr(diffusers, cls_name).from_config(scheduler_config, **extra)
        sched.set_timesteps(steps)
        x = noise[lo:lo + batch_size] * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            u, c = unet(torch.cat([x_in, x_in]), t, embeds).sample.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x, generator=g).prev_sample
        out.append((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
    return np.concatenate(out)


def accuracy(images: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """images: (N, H, W, 3) in [0, 1]. Share of images right on each attribute (ATTRS), by the checker."""
    rows = [score(img, s) for img, s in zip(images, scenes, strict=True)]
    return {a: float(np.mean([r[a] for r in rows])) for a in ATTRS}


def eval_scenes(n_train: int, n_held: int, seed: int = 0) -> dict[str, list[Scene]]:
    """Single-object scenes to judge: `n_train` drawn from the training distribution, `n_held` held out."""
    rng = np.random.default_rng([seed, 7])
    train = [sample_training_scene(rng, 0.0) for _ in range(n_train)]
    held = sorted(held_out_objects(), key=caption)
    picks = rng.permutation(len(held))[:n_held] if n_held < len(held) else np.arange(len(held))
    return {"train": train, "held_out": [Scene((held[i],)) for i in sorted(picks)]}


def evaluate(unet, text_encoder, tokenizer, scheduler_config, guidances: Sequence[float], steps: int,
             n_train: int, n_held: int, seed: int = 0, schedulers: Sequence[str] = ("ddim",)) -> dict[str, Any]:
    """Checker accuracy per (scheduler, guidance) on both caption sets, and the best pair by mean accuracy.

    result["runs"]: list of {"scheduler", "guidance", "train": {attr: acc}, "held_out": {attr: acc}, "mean"}.
    """
    sets = eval_scenes(n_train, n_held, seed)
    runs = []
    for sched in schedulers:
        for g in guidances:
            run: dict[str, Any] = {"scheduler": sched, "guidance": g}
            for name, scenes in sets.items():
                imgs = sample_images(unet, text_encoder, tokenizer, scheduler_config, [caption(s) for s in scenes],
                                     g, steps, seed=seed + 1, scheduler=sched)
                run[name] = accuracy(imgs, scenes)
            run["mean"] = float(np.mean([v for name in sets for v in run[name].values()]))
            runs.append(run)
    return {"steps": steps, "images": {k: len(v) for k, v in sets.items()}, "runs": runs, "best": best_setup(runs)}


def best_setup(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The (scheduler, guidance) of the run with the highest mean accuracy; ties (a well-trained model scores 1.0
    at several guidances) go to the guidance nearest TIE_GUIDANCE, then to the earlier run."""
    best = max(runs, key=lambda r: (r["mean"], -abs(r["guidance"] - TIE_GUIDANCE)))
    return {"scheduler": best["scheduler"], "guidance": best["guidance"]}


def defaults_from(result: dict[str, Any] | None, size: int, steps: int = 50) -> dict[str, Any]:
    """difflens.json content: the best (scheduler, guidance) of an evaluation at its step count, or, without one,
    DDPM at guidance 1.5 (what looked best on young models)."""
    best = result["best"] if result else {"scheduler": "ddpm", "guidance": 1.5}
    steps = result["steps"] if result else steps
    return {"steps": steps, "guidance_scale": best["guidance"], "scheduler": best["scheduler"], "width": size,
            "height": size}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'scheduler':>11} {'guidance':>8} {'set':>9} " + " ".join(f"{a:>8}" for a in ATTRS)]
    for run in result["runs"]:
        for name in result["images"]:
            acc = run[name]
            lines.append(f"{run['scheduler']:>11} {run['guidance']:>8} {name:>9} "
                         + " ".join(f"{acc[a]:8.3f}" for a in ATTRS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m difflens.training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--images", type=int, default=120, help="training-caption images per guidance")
    p.add_argument("--held-out", type=int, default=58, help="held-out-caption images per guidance (58 = all)")
    p.add_argument("--guidance", default="1,1.5,2,3")
    p.add_argument("--schedulers", default="ddim,ddpm", help="comma-separated engine scheduler names")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-defaults", action="store_true", help="record the best guidance in difflens.json")
    a = p.parse_args(argv)
    from difflens.engine.loading import DEFAULTS_FILE, load_model

    torch.set_num_threads(a.threads)
    m = load_model(a.model)
    guidances = [float(g) for g in a.guidance.split(",")]
    result = evaluate(m.unet, m.text_encoder, m.tokenizer, m.scheduler.config, guidances, a.steps, a.images,
                      a.held_out, a.seed, schedulers=a.schedulers.split(","))
    print(format_table(result))
    print(json.dumps({"best": result["best"]}))
    if a.write_defaults:
        f = a.model / DEFAULTS_FILE
        defaults = json.loads(f.read_text()) if f.exists() else {}
        defaults.update(defaults_from(result, int(m.unet.config.sample_size)))
        f.write_text(json.dumps(defaults, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
