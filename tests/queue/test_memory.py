"""What only the in-process queue has to be told: bounds Redis enforces on its own keys."""

from __future__ import annotations

import time

from difflens.config import ServiceSettings
from difflens.queue import memory
from tests.queue.conftest import FAST, MODELS, spec


def test_dead_letter_list_keeps_the_most_recent_jobs_only(monkeypatch):
    """Redis caps its dead-letter stream (XADD MAXLEN ~); the embedded server's list must not grow for ever."""
    monkeypatch.setattr(memory, "DEAD_LETTER_MAXLEN", 3)
    q = memory.InProcessQueue(ServiceSettings(**{**FAST, "max_deliveries": 1}))
    jobs = [q.enqueue(spec()).id for _ in range(5)]
    for n in range(5):
        assert q.claim(f"w{n}", MODELS, block_s=2) is not None
    time.sleep(FAST["visibility_timeout_s"] + 0.15)  # every holder lost its job: the next delivery is refused
    assert q.claim("late", MODELS, block_s=0.5) is None
    assert {q.get(j).state for j in jobs} == {"failed"}
    assert q.dead_letters() == jobs[-3:]


def test_a_claim_does_not_spin_on_another_models_reclaimable_job():
    """A job of model a whose holder is gone (no worker of a here to reclaim it) must not make a claim for model b
    wake every millisecond for its whole block time."""
    q = memory.InProcessQueue(ServiceSettings(**FAST))
    q.enqueue(spec(model="a"))
    assert q.claim("gone", ["a"], block_s=1) is not None
    time.sleep(FAST["visibility_timeout_s"] + 0.1)  # reclaimable now, by a worker of a only
    waits = 0
    real = q._cond.wait

    def counting(timeout: float | None = None) -> bool:
        nonlocal waits
        waits += 1
        return real(timeout)

    q._cond.wait = counting  # type: ignore[method-assign]
    assert q.claim("w", ["b"], block_s=0.5) is None
    assert waits <= 5, waits
