"""Outage: one record per outage of a dependency, with its traceback, and one when it works again."""

from __future__ import annotations

import logging

from difflens.outage import Outage


def fail(outage: Outage) -> None:
    try:
        raise ConnectionError("redis went away")
    except ConnectionError:
        outage.failed()


def test_each_outage_logs_its_first_failure_and_its_end_once(caplog):
    log = logging.getLogger("difflens.test.outage")
    caplog.set_level(logging.DEBUG, logger=log.name)
    outage = Outage(log, "taking a job")
    outage.ok()  # nothing to report while it works
    assert caplog.records == []
    for _ in range(3):
        fail(outage)
    assert outage.down
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert caplog.records[0].exc_info and "redis went away" in caplog.text
    outage.ok()
    outage.ok()
    assert not outage.down
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(back) == 1 and "taking a job works again after" in back[0] and "(3 failed attempts)" in back[0]
    caplog.clear()
    fail(outage)  # a new outage is reported again, at the level asked for
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
