"""bench.load: its summary of the clients' rows, and a second-long run against real processes to keep it working."""

from __future__ import annotations

import json

import pytest

from bench.load import main, summarize

RSS = {"before": 100.0, "after": 110.0, "peak": 120.0}


def test_the_summary_counts_each_row_once_and_keeps_refusals_apart():
    rows = [{"outcome": "completed", "wait_s": 0.01 * i, "e2e_s": 0.1 * i} for i in range(1, 101)]
    rows += [{"outcome": "RESOURCE_EXHAUSTED", "refused": True, "retry_after_s": 1.0},
             {"outcome": "failed DEADLINE_EXCEEDED", "wait_s": 5.0, "e2e_s": 9.0}]
    s = summarize(rows, 10.0, RSS, 64.0)
    assert s["jobs"] == {"completed": 100, "RESOURCE_EXHAUSTED": 1, "failed DEADLINE_EXCEEDED": 1}
    assert s["refusals"] == {"RESOURCE_EXHAUSTED": 1} and s["throughput_jobs_per_s"] == 10.0
    assert s["end_to_end"] == {"p50_ms": 5100.0, "p95_ms": 9500.0, "p99_ms": 9900.0, "n": 100}  # completed only
    assert s["queue_wait"]["n"] == 101 and s["queue_wait"]["p99_ms"] == 1000.0
    assert s["front_rss_mib"]["ratio_after_before"] == 1.1 and s["front_rss_mib"]["within_bound"]
    assert not summarize(rows, 10.0, {**RSS, "after": 164.5}, 64.0)["front_rss_mib"]["within_bound"]


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--seconds", "0"], ["--masks", "-1"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be" in capsys.readouterr().err


def test_a_short_run_against_real_processes(tmp_path, redis_url):
    """Two clients for a second and a half on one worker: every row accounted for, the figures in the JSON."""
    out = tmp_path / "load.json"
    assert main(["--clients", "2", "--seconds", "1.5", "--workers", "1", "--steps", "1", "--masks", "2",
                 "--redis", redis_url, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["jobs"]["completed"] >= 1 and result["throughput_jobs_per_s"] > 0
    assert sum(result["jobs"].values()) == result["end_to_end"]["n"] + sum(result["refusals"].values())
    assert result["queue_wait"]["n"] >= 1 and result["queue_wait"]["p50_ms"] >= 0
    assert result["front_rss_mib"]["before"] > 10 and result["front_rss_mib"]["within_bound"]
    assert result["warmup_jobs"] == 2 and result["commit"]
