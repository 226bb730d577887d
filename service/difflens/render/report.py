"""report.html: one self-contained page (images as data URIs, inline CSS, inline SVG chart; no network, no script).

Everything taken from the request (prompt, words, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from difflens.render.compose import TITLES, methods_present
from difflens.render.maps import as_array

if TYPE_CHECKING:
    from difflens.engine.explain import Explanation

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.prompt { font-size: 16px; margin-bottom: 16px; } .muted { color: #666; }
.image img { image-rendering: pixelated; border: 1px solid #ccc; }
.wide { overflow-x: auto; } .wide img { display: block; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.v { font-family: ui-monospace, monospace; word-break: break-all; max-width: 900px; }
svg text { font: 12px system-ui, sans-serif; fill: #333; }
"""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img_tag(data: bytes, alt: str, mime: str = "image/png", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(data, mime)}" alt="{escape(alt)}"{size}>'


def flatten(params: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> [("generation.steps", 30), ...] in their own order; lists stay whole."""
    if isinstance(params, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in params.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix, params)]


def params_table(params: dict[str, Any]) -> str:
    rows = "".join(f'<tr><th>{escape(k)}</th><td class="v">{escape(json.dumps(v, default=str))}</td></tr>'
                   for k, v in flatten(params))
    return f"<table>{rows}</table>"


def timing_table(exp: Explanation) -> str:
    totals: dict[str, float] = {}
    for s in exp.steps:
        for name, sec in s.seconds.items():
            totals[name] = totals.get(name, 0.0) + sec
    if not totals:
        return ""
    n = len(exp.steps)
    rows = "".join(f"<tr><th>{escape(m)}</th><td>{t:.2f} s</td><td>{t / n:.2f} s</td></tr>" for m, t in totals.items())
    return f"<h2>Time</h2><table><tr><th>method</th><th>total</th><th>per explained step</th></tr>{rows}</table>"


def relevance_chart(timesteps: list[int], words: list[str], relevance: np.ndarray) -> str:
    """Inline SVG line chart, one polyline per word. relevance: (S, T) for S explained steps, T words;
    x = explained step (labelled with its timestep), y = relevance in [0, 1]."""
    n_steps = relevance.shape[0]
    left, top, plot_w, plot_h, legend_w = 48, 16, 560, 240, 180
    height = max(top + plot_h + 48, top + 18 * len(words) + 8)
    width = left + plot_w + 24 + legend_w

    def x(i: int) -> float:
        return left + (plot_w / 2 if n_steps == 1 else i * plot_w / (n_steps - 1))

    def y(v: float) -> float:
        return top + (1.0 - min(max(v, 0.0), 1.0)) * plot_h

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="token relevance over the explained steps">']
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    every = max(1, int(np.ceil(n_steps / 12)))  # at most ~12 tick labels
    for i in range(0, n_steps, every):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{timesteps[i]}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 36}" text-anchor="middle">'
                 "timestep of the explained step (generation order)</text>")
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/>')
    for j, word in enumerate(words):
        colour = PALETTE[j % len(PALETTE)]
        dash = "" if j < len(PALETTE) else ' stroke-dasharray="5 3"'  # a second pass through the colours
        pts = " ".join(f"{x(i):.1f},{y(float(relevance[i, j])):.1f}" for i in range(n_steps))
        parts.append(f'<g class="token"><polyline class="relevance" data-token="{escape(word)}" points="{pts}" '
                     f'fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for i in range(n_steps):
            tip = f"{word} t={timesteps[i]} relevance {float(relevance[i, j]):.3f}"
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(float(relevance[i, j])):.1f}" r="3" fill="{colour}">'
                         f"<title>{escape(tip)}</title></circle>")
        ly = top + 18 * j + 6
        lx = left + plot_w + 24
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"{dash}/>'
                     f'<text x="{lx + 24}" y="{ly + 4}">{escape(word)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def token_relevance(exp: Explanation) -> np.ndarray | None:
    """(S, T) relevance of each word at each explained step, or None when it was not computed."""
    if not exp.tokens or not exp.steps or not all("attn_relevance" in s.maps for s in exp.steps):
        return None
    return np.stack([as_array(s.maps["attn_relevance"]) for s in exp.steps])


def report_html(exp: Explanation, images: dict[str, bytes]) -> str:
    """The page. `images`: file name -> encoded bytes of what write_outputs wrote (image.png, strip_*.png,
    attn_tokens.png); whatever is present is shown."""
    gen = exp.params.get("generation", {}) if isinstance(exp.params, dict) else {}
    prompt = str(gen.get("prompt", "")) if isinstance(gen, dict) else ""
    shown = min(max(256, int(exp.image.shape[1])), 512)  # small images enlarged (pixelated), large ones fit
    body = [
        "<h1>difflens report</h1>",
        f'<div class="prompt">&ldquo;{escape(prompt)}&rdquo;</div>',
        f'<div class="muted">model {escape(str(exp.params.get("model", "")))}; '
        f"{len(exp.timesteps)} denoising steps, {len(exp.steps)} explained</div>",
        f'<h2>Image</h2><div class="image">{img_tag(images["image.png"], "generated image", width=shown)}</div>',
    ]
    if methods_present(exp):
        body.append('<p class="muted">Each map is drawn as a heat map at half weight over the image, after ReLU and '
                    "min-max scaling within its own tile: the colour scale under each picture runs from blue "
                    "(0, the tile's lowest value) to red (1, its highest).</p>")
    for m in methods_present(exp):
        name = f"strip_{m}.png"
        if name in images:
            body.append(f'<h2>{escape(TITLES[m])}, per explained step</h2>'
                        f'<div class="wide">{img_tag(images[name], TITLES[m])}</div>')
    rel = token_relevance(exp)
    if rel is not None:
        body.append("<h2>Token relevance over the steps</h2>"
                    f'<div class="wide">{relevance_chart([s.timestep for s in exp.steps], exp.tokens, rel)}</div>')
    if "attn_tokens.png" in images:
        body.append('<h2>Cross-attention per word (rows: explained steps)</h2>'
                    f'<div class="wide">{img_tag(images["attn_tokens.png"], "token maps")}</div>')
    body.append(timing_table(exp))
    body.append(f"<h2>Parameters</h2>{params_table(exp.params)}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>difflens report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
