"""bench.soak's per-job check: what it flags in a client's view of a job, and what it accepts."""

from __future__ import annotations

import numpy as np
import pytest

from bench.soak import job_problems
from difflens.jobs import Completed, Failed, JobRecord, Queued, Started, Step
from tests.worker.helpers import spec

SPEC = spec(steps=3, methods=("rise",))


def _step(i: int, value: float = 0.0) -> Step:
    return Step(index=i, timestep=900 - 300 * i, num_steps=3, latency_s=0.01,
                maps={"rise": np.full((2, 2), value, np.float32)})


def _record(state: str = "completed") -> JobRecord:
    return JobRecord(id="j", state=state, model="tiny", created_at=0.0, updated_at=0.0)


DONE = Completed(image_png=b"png", audit_json="{}")
GOOD = [Queued(0), Started("w0-0", 1), _step(0), _step(1), Started("w1-0", 2), _step(2), DONE]


def test_a_reclaimed_job_seen_once_through_is_fine():
    assert job_problems(SPEC, GOOD, list(GOOD), _record()) == []


def test_a_cancelled_job_with_a_prefix_of_its_steps_is_fine():
    events = [Queued(0), Started("w0-0", 1), _step(0), Failed("CANCELLED", "cancelled")]
    assert job_problems(SPEC, events, list(events), _record("cancelled")) == []


@pytest.mark.parametrize(("events", "watched", "state", "problem"), [
    (GOOD + [DONE], None, "completed", "2 terminal events"),
    (GOOD[:-1], None, "running", "0 terminal events"),
    (GOOD, GOOD[:2] + [_step(0, 1.0)] + GOOD[3:], "completed", "WatchJob from the start differs"),
    (GOOD[:3] + [_step(0)] + GOOD[3:], None, "completed", "a step came twice"),
    ([e for e in GOOD if not (isinstance(e, Step) and e.index == 1)], None, "completed", "completed with steps [0, 2]"),
    (GOOD, None, "failed", "completed, but the record says failed"),
    ([Queued(0), Started("w", 1), _step(1), Failed("ABORTED", "x")], None, "failed", "not a prefix"),
])
def test_each_broken_promise_is_named(events, watched, state, problem):
    problems = job_problems(SPEC, events, list(events) if watched is None else watched, _record(state))
    assert any(problem in p for p in problems), problems
