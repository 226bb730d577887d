"""Simple line charts as PNG with Pillow (no plotting library): axes, ticks, a legend, one polyline per series.

NaN values break a line (nothing is drawn through them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from difflens.evaluation.metrics import KINDS, METHODS, REFERENCES, REGIONS

Series = dict[str, tuple[Sequence[float], Sequence[float | None]]]
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (120, 120, 120),
           (140, 86, 75), (23, 190, 207), (188, 189, 34))  # distinct for up to 9 series (the dashed one included)
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 400, 60, 170, 36, 46


def _finite(v: float | None) -> bool:
    return v is not None and not math.isnan(v) and not math.isinf(v)


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def line_chart(series: Series, title: str, xlabel: str, ylabel: str, path: Path,
               y_range: tuple[float, float] | None = None, dashed: Sequence[str] = (),
               x_labels: Sequence[str] | None = None) -> Path:
    """Draw `series` ({label: (xs, ys)}) into a PNG at `path`. Series named in `dashed` are drawn dashed;
    `x_labels[i]` names the tick at x = i (categorical axes). Ticks sit at the data's x values when there are
    at most 12 of them (step indices), else at five even positions."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs_all = [float(x) for xs, _ in series.values() for x in xs]
    ys_all = [float(y) for _, ys in series.values() for y in ys if _finite(y)]  # type: ignore[arg-type]
    x0, x1 = _range(xs_all)
    y0, y1 = y_range or _range(ys_all)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float, y: float) -> tuple[float, float]:
        return LEFT + (x - x0) / (x1 - x0) * pw, TOP + (1 - (y - y0) / (y1 - y0)) * ph

    d.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yp = px(x0, yv)
        d.line([LEFT - 4, yp, LEFT, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black", font=font)
    distinct = sorted(set(xs_all))
    ticks = distinct if len(distinct) <= 12 else [x0 + (x1 - x0) * k / 4 for k in range(5)]
    for xv in ticks:
        xp, _ = px(xv, y0)
        d.line([xp, TOP + ph, xp, TOP + ph + 4], fill="black")
        text = x_labels[int(xv)] if x_labels is not None and float(xv).is_integer() and 0 <= xv < len(x_labels) \
            else f"{xv:.3g}"
        d.text((xp - 3 * len(text), TOP + ph + 8), text, fill="black", font=font)
    d.text((LEFT, 10), title, fill="black", font=font)
    d.text((LEFT + pw // 2 - 30, H - 18), xlabel, fill="black", font=font)
    d.text((4, TOP - 26), ylabel, fill="black", font=font)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        segment: list[tuple[float, float]] = []
        for x, y in [*zip(xs, ys, strict=True), (None, None)]:
            if x is not None and _finite(y):
                segment.append(px(float(x), float(y)))  # type: ignore[arg-type]
                continue
            _polyline(d, segment, colour, label in dashed)
            segment = []
        ly = TOP + 14 * i + 6
        _polyline(d, [(W - RIGHT + 10, ly), (W - RIGHT + 34, ly)], colour, label in dashed)
        d.text((W - RIGHT + 40, ly - 6), label, fill="black", font=font)
    img.save(path, format="PNG")
    return path


def _polyline(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: tuple[int, int, int],
              dashed: bool) -> None:
    if len(pts) == 1:
        x, y = pts[0]
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
        if not dashed:
            d.line([xa, ya, xb, yb], fill=colour, width=2)
            continue
        n = max(1, int(math.hypot(xb - xa, yb - ya) // 6))
        for k in range(0, n, 2):
            d.line([xa + (xb - xa) * k / n, ya + (yb - ya) * k / n,
                    xa + (xb - xa) * (k + 1) / n, ya + (yb - ya) * (k + 1) / n], fill=colour, width=2)
        d.ellipse([xb - 2, yb - 2, xb + 2, yb + 2], fill=colour)


def write_charts(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """The curves and per-step series of a summary as PNGs in `out`; -> {file name: path}."""
    written: dict[str, Path] = {}
    curves, series = summary["curves"], summary["series"]
    for kind in KINDS:
        if curves:
            lines = {name: (c[kind]["fraction"], c[kind]["ssim"]) for name, c in curves.items()}
            name = f"{kind}_curves.png"
            written[name] = line_chart(lines, f"{kind} on the latent (mean over images and steps)",
                                       "fraction of latent pixels " + ("deleted" if kind == "deletion" else
                                                                       "restored"),
                                       "SSIM", out / name, dashed=("random", *REFERENCES))
    steps = series["steps"]
    for m in METHODS:
        lines = {f"{r} mass ratio": (steps, series[m].get(f"{r}_ratio", [])) for r in REGIONS} if steps else {}
        if lines:
            name = f"ratios_{m}.png"
            written[name] = line_chart(lines, f"{m}: saliency mass ratio per step (1 = no preference)",
                                       "step index", "mass ratio", out / name)
    if steps:
        for key, label in (("pointing_game", "pointing game"), ("sanity_spearman", "Spearman trained vs random")):
            name = f"{key}.png"
            written[name] = line_chart({m: (steps, series[m][key]) for m in METHODS}, f"{label} per step",
                                       "step index", label, out / name,
                                       y_range=(0.0, 1.0) if key == "pointing_game" else None)
        for kind in KINDS:
            lines = {m: (steps, series[m][f"{kind}_auc"]) for m in METHODS}
            lines["random"] = (steps, series["rise"][f"random_{kind}_auc"])
            lines |= {r: (steps, series[r][f"{kind}_auc"]) for r in REFERENCES if r in series}
            name = f"{kind}_auc_per_step.png"
            written[name] = line_chart(lines, f"{kind} AUC per step", "step index", "AUC (SSIM)", out / name,
                                       dashed=("random", *REFERENCES))
    fid = summary["r3"]["fidelity"]
    attrs = ("count", "color", "position", "shape", "size", "texture")
    if any(fid.values()):
        name = "r3_fidelity.png"
        written[name] = line_chart({k: (list(range(len(attrs))), [acc.get(a) for a in attrs])
                                    for k, acc in fid.items() if acc},
                                   "checker accuracy per attribute and schedule (R3)", "attribute", "accuracy",
                                   out / name, y_range=(0.0, 1.0), x_labels=attrs)
    return written
