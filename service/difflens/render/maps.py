"""One saliency map over one image: the display rule (docs/method.md) and the heat-map blend.

Display rule: ReLU, bilinear upsample to the image's size, min-max to [0, 1]. Maps arrive as CPU tensors or numpy
arrays; everything here is numpy and PIL, so render/ needs no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

ALPHA = 0.5  # heat-map weight in the blend; the image keeps the rest


def as_array(x: Any) -> np.ndarray:
    """A CPU tensor or array-like -> float32 numpy array of the same shape."""
    return np.asarray(x, dtype=np.float32)


def display_map(saliency: Any, size: tuple[int, int]) -> np.ndarray:
    """The display rule. saliency: (h, w), any real values; size: (H, W). -> (H, W) float32 in [0, 1].

    A constant map (nothing to show, or all negative) becomes all zeros rather than NaN.
    """
    m = np.maximum(as_array(saliency), 0.0)
    if m.ndim != 2:
        raise ValueError(f"a saliency map must be (h, w), got shape {m.shape}")
    height, width = size
    if m.shape != (height, width):
        # PIL's bilinear on a float image samples at pixel centres, like torch's align_corners=False.
        m = np.asarray(Image.fromarray(m, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 0.0:
        return np.zeros((height, width), np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def jet(values: np.ndarray) -> np.ndarray:
    """The usual saliency colour map (blue = low, red = high). values: (...) in [0, 1] -> (..., 3) float32."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # r, g, b peak positions on the 0..4 scale
    return np.clip(1.5 - np.abs(v - centres), 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, saliency: Any, alpha: float = ALPHA) -> np.ndarray:
    """Blend a map's heat-map colours over the image. image: (H, W, 3) uint8; saliency: (h, w).

    Returns (H, W, 3) uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    heat = jet(display_map(saliency, image.shape[:2])) * 255.0
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return out.round().clip(0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8. Upscaling keeps the pixels visible (nearest)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    up = height >= image.shape[0] and width >= image.shape[1]
    method = Image.Resampling.NEAREST if up else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(image).resize((width, height), method))
