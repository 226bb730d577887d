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
