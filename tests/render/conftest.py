from __future__ import annotations

import numpy as np
import pytest
import torch

from difflens.engine.explain import Explanation, StepExplanation
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import Generation

LAYERS = ("down_blocks.0.attentions.0", "up_blocks.1.resnets.0")


def make_explanation(
    n_steps: int = 5,
    explained: tuple[int, ...] = (0, 2, 4),
    tokens: tuple[str, ...] = ("a", "red", "circle"),
    methods: tuple[str, ...] = ("rise", "cam", "attn"),
    image_size: tuple[int, int] = (32, 32),
    latent_size: tuple[int, int] = (8, 8),
    prompt: str = "a red circle",
) -> Explanation:
    """An Explanation built by hand with random maps (render is a function of an Explanation only)."""
    g = torch.Generator().manual_seed(0)
    h, w = latent_size
    timesteps = [int(t) for t in np.linspace(981, 1, n_steps).round()]
    steps = []
    for i in explained:
        maps: dict[str, torch.Tensor] = {}
        if "rise" in methods:
            maps["rise"] = torch.rand(h, w, generator=g)
            maps["rise_raw"] = maps["rise"] * 3
        if "cam" in methods:
            for layer in LAYERS:
                maps[f"cam/{layer}"] = torch.rand(h, w, generator=g)
            maps["cam"] = sum(maps[f"cam/{layer}"] for layer in LAYERS)  # type: ignore[assignment]
        if "attn" in methods:
            maps["attn"] = torch.rand(len(tokens), h, w, generator=g)
            rel = torch.rand(len(tokens), generator=g)
            maps["attn_relevance"] = (rel - rel.min()) / (rel.max() - rel.min() + 1e-12) if len(tokens) else rel
        steps.append(StepExplanation(i, timesteps[i], maps, {m: 0.01 for m in methods}))
    image = (np.random.default_rng(0).random((*image_size, 3)) * 255).astype(np.uint8)
    params = GenerationParams(prompt, steps=n_steps)
    record = {
        "generation": {"prompt": prompt, "negative_prompt": "", "seed": 0, "steps": n_steps,
                       "sampling": {"kind": "uniform", "shift": 60.0, "timesteps": None}},
        "explain": {"steps": {"kind": "list", "indices": list(explained), "every": 1}},
        "model": "/models/tiny", "unet_backend": "eager", "timesteps": timesteps, "methods": list(methods),
        "explained_steps": list(explained),
    }
    gen = Generation(image.astype(np.float32) / 255, torch.zeros(1, 4, h, w), timesteps, params, [])
    return Explanation(image, timesteps, steps, list(tokens), record, gen)


@pytest.fixture
def explanation() -> Explanation:
    return make_explanation()
