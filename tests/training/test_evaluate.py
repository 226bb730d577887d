from __future__ import annotations

import json

import numpy as np

from difflens.engine.loading import load_model
from difflens.scenes.checker import accuracy
from difflens.scenes.render import render_scene
from difflens.training.evaluate import eval_scenes, evaluate


def test_the_evaluation_made_in_training_is_that_of_the_saved_model(smoke):
    """finish() judges the EMA components in memory; the same evaluation of the folder it wrote, loaded through the
    standard loader, must give the same figures (same weights, scheduler, tokenizer and sampling)."""
    _, _, out = smoke
    record = json.loads((out / "training.json").read_text())["evaluation"]
    again = evaluate(load_model(out), [1.0, 2.0], 3, 3, 2, seed=0, schedulers=("ddim", "ddpm"))
    assert again == record


def test_accuracy_of_renders_is_perfect_and_of_noise_is_not():
    scenes = eval_scenes(6, 4)["train"]
    renders = np.stack([render_scene(s, 32, i)[0] for i, s in enumerate(scenes)]).astype(np.float32) / 255
    assert all(v == 1.0 for v in accuracy(renders, scenes).values())
    noise = np.random.default_rng(0).random(renders.shape).astype(np.float32)
    assert accuracy(noise, scenes)["count"] < 0.5


def test_eval_scenes_are_fixed_and_split():
    a, b = eval_scenes(10, 5, seed=2), eval_scenes(10, 5, seed=2)
    assert a == b and len(a["train"]) == 10 and len(a["held_out"]) == 5
    from difflens.scenes.captions import is_held_out

    assert not any(is_held_out(s) for s in a["train"]) and all(is_held_out(s) for s in a["held_out"])


def test_best_setup_is_the_most_accurate_and_ties_go_to_guidance_two():
    from difflens.training.evaluate import best_setup

    runs = [{"scheduler": "ddim", "guidance": g, "mean": m} for g, m in ((1.0, 0.9), (2.0, 0.8), (3.0, 0.95))]
    assert best_setup(runs) == {"scheduler": "ddim", "guidance": 3.0}
    tied = [{"scheduler": s, "guidance": g, "mean": 1.0} for s in ("ddim", "ddpm") for g in (1.0, 1.5, 2.0, 3.0)]
    assert best_setup(tied) == {"scheduler": "ddim", "guidance": 2.0}
    assert best_setup(tied[4:]) == {"scheduler": "ddpm", "guidance": 2.0}
