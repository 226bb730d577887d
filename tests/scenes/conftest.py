from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter


def _degrade(img: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 with a Gaussian blur of radius `blur` px and Gaussian noise (0-255)."""
    x = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur))) if blur else img
    x = x.astype(float) + rng.normal(0.0, noise, x.shape) if noise else x.astype(float)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@pytest.fixture
def degrade():
    return _degrade
