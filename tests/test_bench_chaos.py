"""bench.chaos in short (make chaos runs 200 jobs): a front, two worker processes and a Redis that keeps an append-
only file; workers SIGKILLed at random and Redis SIGKILLed once and restarted on its data while clients stream.
Every job ends with one terminal event, none is lost or duplicated, and the figures are written as JSON."""

from __future__ import annotations

import json


def test_a_short_chaos_run_keeps_every_promise(tmp_path, capsys):
    from bench.chaos import main

    out = tmp_path / "chaos.json"
    status = main(["--clients", "2", "--jobs", "2", "--workers", "2", "--kill-every", "3,4", "--worker-kills", "1",
                   "--redis-kill-at", "0.3", "--out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert status == 0, printed
    assert figures["jobs"] == 4 and figures["redis_kills"] == 1, figures
    assert (figures["lost"], figures["duplicated"], figures["with_problems"]) == (0, 0, 0), figures
    assert figures["fleet_errors"] == [] and figures["completed"] + figures["cancelled"] + figures["dead_lettered"] \
        + figures["other_failed"] == 4
    assert "| jobs | completed |" in printed  # the table
