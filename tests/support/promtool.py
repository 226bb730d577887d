"""promtool (Debian's prometheus package; `make tools`) where it is installed, and a check of PromQL expressions
(alert rules, dashboard panels) against the collectors service/difflens/metrics.py declares."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.k8s_tools import tool

MISSING = "promtool not on PATH (make tools)"


def promtool_path() -> str | None:
    """promtool from `make tools`' folder or PATH, or None."""
    return tool("promtool")


def promtool_report(scrape: str) -> str | None:
    """What promtool says about `scrape` ('' when nothing: exit 0, no output), or None without promtool."""
    promtool = promtool_path()
    if promtool is None:
        return None
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True,
                             timeout=30)
    said = (checked.stdout + checked.stderr).strip()
    return said or ("" if checked.returncode == 0 else f"exit {checked.returncode}")


def promtool_run(*args: str | Path) -> subprocess.CompletedProcess[str] | None:
    """`promtool ARGS...` (e.g. "check", "rules", FILE; "test", "rules", FILE), or None without promtool."""
    promtool = promtool_path()
    if promtool is None:
        return None
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120)


# The series a collector of each type exports, after its name (prometheus_client drops a counter's _total from
# the family's name). _created is left out on purpose: nothing should chart or alert on it.
_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# Gauges every front exports with the same value (one shared queue): summing them over fronts multiplies them.
REPLICATED_GAUGES = ("difflens_queue_depth", "difflens_live_workers")


# Triton Inference Server's own series that difflens's dashboard charts (a worker's `--backend triton` server, scraped
# on its metrics port), as tritonserver 2.51 exports them: counters without _total, durations in microseconds.
# Listed explicitly, so a misspelt one fails the check as a difflens_ name does; tests/triton checks the list against
# a real server's scrape.
_TRITON_LABELS = frozenset({"model", "version"})
TRITON_SERIES: dict[str, frozenset[str]] = {
    **{name: _TRITON_LABELS for name in (
        "nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
        "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count")},
    "nv_inference_request_failure": _TRITON_LABELS | {"reason"},
}


def declared_series() -> dict[str, frozenset[str]]:
    """Every series name difflens.metrics' REGISTRY exports, with the labels it carries (histogram buckets add
    `le`)."""
    from prometheus_client.metrics import MetricWrapperBase

    from difflens import metrics

    # the label names are only on the collector objects (a private field, stable across prometheus_client releases)
    labels = {c._name: frozenset(c._labelnames) for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)}
    series = {}
    for family in metrics.REGISTRY.collect():
        for suffix in _SERIES_SUFFIXES.get(family.type, ("",)):
            series[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return series


_NAME = re.compile(r"(?<![\w:$])((?:difflens|nv_inference)_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# {{label}} in a Grafana legend, {{ $labels.label }} in an alert annotation ({{ $value }} is no label)
_LEGEND = re.compile(r"\{\{\s*(?:\$labels\.)?(?<!\$)\b([A-Za-z_]\w*)\s*(?:\|[^}]*)?\}\}")
_SUMMED = re.compile(r"\bsum\s*(?:by\s*\([^)]*\)\s*)?\(\s*(?:\w+\s*\(\s*)*(" + "|".join(REPLICATED_GAUGES) + r")\b")


def promql_problems(expr: str, legend: str = "") -> list[str]:
    """What is wrong with `expr` against metrics.py: a difflens_ metric it does not declare (or an nv_inference_
    one not in TRITON_SERIES), a label (in a matcher, a by/on/without clause, or the legend's {{label}}) that none of
    the expression's metrics carries, a replicated gauge summed over fronts. [] when nothing."""
    declared = declared_series() | TRITON_SERIES
    problems: list[str] = []
    carried = set(TARGET_LABELS)
    for m in _NAME.finditer(expr):
        name = m.group(1)
        if name not in declared:
            where = "TRITON_SERIES" if name.startswith("nv_") else "difflens.metrics"
            problems.append(f"{name}: not declared by {where}")
            continue
        carried |= declared[name]
        for label in _MATCHER.findall(m.group(2) or ""):
            if label not in declared[name] | TARGET_LABELS:
                problems.append(f"{name}: no label {label!r} (it has {sorted(declared[name])})")
    if not any(m.group(1) in declared for m in _NAME.finditer(expr)):
        problems.append(f"no difflens (or charted Triton) metric in {expr!r}")
    used = {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    used |= set(_LEGEND.findall(legend))
    problems += [f"label {label!r}: none of the expression's metrics has it" for label in sorted(used - carried)]
    problems += [f"{m.group(1)} summed: every front exports the same value, use max" for m in _SUMMED.finditer(expr)]
    return problems
