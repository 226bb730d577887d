"""bench.service's pure parts: how --pin shares out the CPUs, and the two targets each job row is judged by."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.service import FLOOR_MARGIN_MS, cpu_layout, judge, pin_process, pin_threads_default

THREADED = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print('up', flush=True); time.sleep(60)")


def test_pinning_gives_each_process_cpus_of_its_own():
    layout = cpu_layout(set(range(16)), pin_threads_default(set(range(16))))
    assert {k: len(v) for k, v in layout.items()} == {"redis": 1, "front": 1, "worker": 4, "client": 4}
    cpus = [c for v in layout.values() for c in v]
    assert len(cpus) == len(set(cpus))


def test_pinning_reaches_every_thread_of_a_running_process():
    proc = subprocess.Popen([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        cpu = min(os.sched_getaffinity(0))
        pin_process(proc.pid, {cpu})
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 4
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tids)
    finally:
        proc.kill()
        proc.wait()


def test_pinning_on_too_few_cpus_says_how_many_it_needs():
    with pytest.raises(ValueError, match="needs 4 usable CPUs for 1 torch threads.*may use 2"):
        cpu_layout({0, 1}, pin_threads_default({0, 1}))


def test_each_job_is_judged_against_5_ms_and_against_the_floor_plus_the_margin():
    floor = {"grpc_call_p50_ms": 1.5, "redis_ping_p50_ms": 0.5, "floor_p50_ms": 2.5}
    rows = {"plain": {"added_p50_ms": 4.0}, "rise": {"added_p50_ms": 4.6}}
    verdict = judge(rows, floor)
    assert verdict["floor_limit_ms"] == 2.5 + FLOOR_MARGIN_MS == 4.5
    assert (rows["plain"]["target_met"], rows["plain"]["floor_target_met"]) == (True, True)
    assert (rows["rise"]["target_met"], rows["rise"]["floor_target_met"]) == (True, False)
    assert verdict["target_met"] and not verdict["floor_target_met"]
