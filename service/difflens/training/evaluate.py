"""How well a shapes model draws what its caption says, judged by the classical checker.

`python -m difflens.training.evaluate models/shapes --images 120 --guidance 1,1.5,2` prints per-attribute
accuracy on training captions and on held-out captions (never trained on) for each scheduler and guidance scale;
with `--write-defaults` it records the best pair in the folder's difflens.json.

Images come from `difflens.evaluation.sampling.sample_batch`: batched, and for one caption the image the engine's
`generate` gives for it (a test there checks this), so the figures judge the model as the service runs it. A model
still in training is judged the same way, as a `Model` over its in-memory components (`in_memory_model`).
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

from difflens.engine.loading import Model, ModelDefaults
from difflens.evaluation.sampling import sample_batch
from difflens.scenes.captions import caption, held_out_objects
from difflens.scenes.checker import ATTRS, accuracy
from difflens.scenes.render import Scene
from difflens.training.data import sample_training_scene

# Among equally good set-ups, the guidance nearest this: classifier-free guidance then does something (the
# explainers combine its two branches) without over-guiding. At 1.0 the unconditional branch drops out.
TIE_GUIDANCE = 2.0


def eval_scenes(n_train: int, n_held: int, seed: int = 0) -> dict[str, list[Scene]]:
    """Single-object scenes to judge: `n_train` drawn from the training distribution, `n_held` held out."""
    rng = np.random.default_rng([seed, 7])
    train = [sample_training_scene(rng, 0.0) for _ in range(n_train)]
    held = sorted(held_out_objects(), key=caption)
    picks = rng.permutation(len(held))[:n_held] if n_held < len(held) else np.arange(len(held))
    return {"train": train, "held_out": [Scene((held[i],)) for i in sorted(picks)]}


def in_memory_model(unet, text_encoder, tokenizer, scheduler, path: Path = Path("<in memory>")) -> Model:
    """Components not yet saved (a model in training) as the engine's Model, without a folder or defaults."""
    return Model(path=path, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=None,
                 defaults=ModelDefaults())


def evaluate(model: Model, guidances: Sequence[float], steps: int, n_train: int, n_held: int, seed: int = 0,
             schedulers: Sequence[str] = ("ddim",)) -> dict[str, Any]:
    """Checker accuracy per (scheduler, guidance) on both caption sets, and the best pair by mean accuracy. Image i
    of a set is generated with seed `seed + 1 + i` (the same noise for every set-up, so they are compared on equal
    terms).

    result["runs"]: list of {"scheduler", "guidance", "train": {attr: acc}, "held_out": {attr: acc}, "mean"}.
    """
    sets = eval_scenes(n_train, n_held, seed)
    runs = []
    for sched in schedulers:
        for g in guidances:
            run: dict[str, Any] = {"scheduler": sched, "guidance": g}
            for name, scenes in sets.items():
                seeds = [seed + 1 + i for i in range(len(scenes))]
                imgs = sample_batch(model, [caption(s) for s in scenes], seeds, steps=steps, guidance_scale=g,
                                    scheduler=sched)
                run[name] = accuracy(imgs, scenes)
            run["mean"] = float(np.mean([v for name in sets for v in run[name].values()]))
            runs.append(run)
    return {"steps": steps, "images": {k: len(v) for k, v in sets.items()}, "runs": runs, "best": best_setup(runs)}


def best_setup(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The (scheduler, guidance) of the run with the highest mean accuracy; ties (a well-trained model scores 1.0
    at several guidances) go to the guidance nearest TIE_GUIDANCE, then to the earlier run."""
    best = max(runs, key=lambda r: (r["mean"], -abs(r["guidance"] - TIE_GUIDANCE)))
    return {"scheduler": best["scheduler"], "guidance": best["guidance"]}


# A model trained on `size` px scenes is served up to this many times that: beyond it, it draws nothing of its
# scenes and a step costs ever more (13 s at 8x on the 2-core CPU for the shipped 32 px model).
MAX_SIDE_FACTOR = 4


def defaults_from(result: dict[str, Any] | None, size: int, steps: int = 50) -> dict[str, Any]:
    """difflens.json content: the best (scheduler, guidance) of an evaluation at its step count, or, without one,
    DDPM at guidance 1.5 (what looked best on young models); the training size, and MAX_SIDE_FACTOR times it as
    the largest side a request may ask."""
    best = result["best"] if result else {"scheduler": "ddpm", "guidance": 1.5}
    steps = result["steps"] if result else steps
    return {"steps": steps, "guidance_scale": best["guidance"], "scheduler": best["scheduler"], "width": size,
            "height": size, "max_side": MAX_SIDE_FACTOR * size}


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
    result = evaluate(m, guidances, a.steps, a.images, a.held_out, a.seed, schedulers=a.schedulers.split(","))
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
