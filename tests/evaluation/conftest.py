from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory):
    """An untrained pixel-space shapes model of the `tiny` architecture, saved like the shipped one, with short
    sampling defaults (DDIM, 4 steps, guidance 2)."""
    from difflens.training.build import ARCHS, build_components, save_model

    root = tmp_path_factory.mktemp("pixel")
    c = build_components(ARCHS["tiny"], root / "tokenizer", seed=0, terminal_alpha_bar=0.0047)
    defaults = {"steps": 4, "guidance_scale": 2.0, "scheduler": "ddim", "width": 32, "height": 32}
    return save_model(root / "model", c["unet"], c["text_encoder"], c["tokenizer"], c["noise_scheduler"], defaults)


@pytest.fixture(scope="session")
def pixel_model(pixel_dir):
    from difflens.engine.loading import load_model

    return load_model(pixel_dir)
