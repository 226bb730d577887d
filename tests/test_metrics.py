"""difflens.metrics: what a job the queue ends itself counts."""

from __future__ import annotations

import pytest

from difflens import metrics
from difflens.jobs import Failed


def _value(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(("code", "status", "error"), [
    ("DEADLINE_EXCEEDED", "deadline_exceeded", "deadline_exceeded"),  # was counted only when it passed running
    ("ABORTED", "failed", "dead_letter"),
    ("UNAVAILABLE", "failed", "shutdown"),
    ("CANCELLED", "cancelled", None),  # a caller's cancel is not an error
])
def test_a_job_the_queue_ends_counts_its_status_and_the_error_a_worker_would(code, status, error):
    jobs = _value("difflens_jobs_total", {"status": status})
    errors = {t: _value("difflens_errors_total", {"type": t}) for t in ("deadline_exceeded", "dead_letter", "shutdown")}
    metrics.count_ended(Failed(code, "x"))
    assert _value("difflens_jobs_total", {"status": status}) == jobs + 1
    for t, before in errors.items():
        assert _value("difflens_errors_total", {"type": t}) == before + (t == error)


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_metrics_port_answers_probes_from_the_health_it_is_given():
    probe = metrics.Health()
    port = metrics.serve_metrics(0, "127.0.0.1", probe)
    assert _get(port, "/healthz") == (200, "alive\n")
    assert _get(port, "/readyz") == (503, "starting\n")
    probe.set(False, "loading models")
    assert _get(port, "/readyz") == (503, "loading models\n")
    probe.set(True, "worker w ready")
    assert _get(port, "/readyz") == (200, "worker w ready\n")
    probe.set(False, "draining")
    assert _get(port, "/readyz") == (503, "draining\n")
    status, body = _get(port, "/metrics")
    assert status == 200 and "difflens_jobs_total" in body


def test_a_metrics_port_without_health_is_never_ready():
    port = metrics.serve_metrics(0)
    assert _get(port, "/readyz")[0] == 503 and _get(port, "/healthz")[0] == 200
