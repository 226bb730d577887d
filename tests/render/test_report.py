from __future__ import annotations

import base64
import re

from difflens.render import write_outputs
from difflens.render.report import relevance_chart
from tests.render.conftest import make_explanation
from tests.render.test_compose import assert_carries_the_scale


def _report(exp, tmp_path):
    written = write_outputs(exp, tmp_path / "run")
    return written, written["report.html"].read_text()


def test_report_is_self_contained(explanation, tmp_path):
    written, html = _report(explanation, tmp_path)
    assert not re.search(r"https?://", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    for name in ("image.png", "strip_rise.png", "strip_cam.png", "strip_attn.png", "attn_tokens.png"):
        assert written[name].read_bytes() in embedded, name


def test_report_has_one_chart_line_per_token(explanation, tmp_path):
    _, html = _report(explanation, tmp_path)
    svg = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svg) == 1
    lines = re.findall(r'<polyline class="relevance" data-token="([^"]*)" points="([^"]*)"', svg[0])
    assert [w for w, _ in lines] == explanation.tokens
    assert all(len(pts.split()) == len(explanation.steps) for _, pts in lines)


def test_chart_points_follow_the_relevance():
    import numpy as np

    svg = relevance_chart([900, 500], ["cat", "dog"], np.array([[1.0, 0.0], [0.0, 1.0]]))
    pts = dict(re.findall(r'data-token="(\w+)" points="([^"]*)"', svg))
    cat = [tuple(map(float, p.split(","))) for p in pts["cat"].split()]
    assert cat[0][1] < cat[1][1]  # relevance 1 is drawn higher (smaller y) than 0
    assert ">900<" in svg and ">500<" in svg  # x labelled by timestep


def test_report_escapes_the_prompt_and_words(tmp_path):
    exp = make_explanation(prompt='<b>"bold"</b>', tokens=("<b>", "x&y"))
    _, html = _report(exp, tmp_path)
    assert "<b>" not in html and "&lt;b&gt;" in html and "x&amp;y" in html


def test_report_lists_the_parameters(explanation, tmp_path):
    _, html = _report(explanation, tmp_path)
    assert "generation.steps" in html and "explain.steps.indices" in html and "/models/tiny" in html


def test_the_reports_pictures_of_maps_carry_the_colour_scale_and_the_method_names(explanation, tmp_path):
    import io

    from PIL import Image

    written, html = _report(explanation, tmp_path)
    shown = {base64.b64decode(s.split(",", 1)[1]) for s in re.findall(r'<img src="([^"]+)"', html)}
    for name in ("strip_rise.png", "strip_cam.png", "strip_attn.png", "attn_tokens.png"):
        data = written[name].read_bytes()
        assert data in shown, name
        assert_carries_the_scale(Image.open(io.BytesIO(data)))
    assert "colour scale" in html
