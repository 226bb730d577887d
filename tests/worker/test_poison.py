"""A poison job, one that kills every worker that runs it, with real `difflens worker` processes: it is dead-lettered
after DIFFLENS_MAX_DELIVERIES deliveries, and the other jobs of its model complete meanwhile. The test restarts
each worker that dies, as Kubernetes would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from difflens.jobs import Completed, Failed
from difflens.queue.redis_streams import RedisStreamsQueue
from tests.support.poison_worker import EXIT_CODE
from tests.worker.helpers import MODEL, settings, spec

POISON = "a poison circle"
MAX_DELIVERIES = 2


def _worker(tiny_dir: Path, redis_url: str, queue_name: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFLENS_VISIBILITY_TIMEOUT_S": "2",
           "DIFFLENS_HEARTBEAT_INTERVAL_S": "0.3", "DIFFLENS_MAX_DELIVERIES": str(MAX_DELIVERIES)}
    env.pop("DIFFLENS_REDIS_URL", None)
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.poison_worker", POISON, "worker", "--redis", redis_url, "--queue",
             queue_name, "--model", f"{MODEL}={tiny_dir}", "--name", name, "--max-jobs", "1", "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env)


def test_a_poison_job_is_dead_lettered_and_the_jobs_behind_it_complete(tiny_dir, redis_url, queue_name, tmp_path):
    q = RedisStreamsQueue(redis_url, settings(tiny_dir, queue_name=queue_name, max_deliveries=MAX_DELIVERIES))
    log = tmp_path / "workers.log"
    workers = {slot: _worker(tiny_dir, redis_url, queue_name, f"{slot}-0", log) for slot in ("a", "b")}
    deaths = 0
    try:
        poison = q.enqueue(spec(POISON, steps=2)).id
        others = [q.enqueue(spec(f"a red circle {i}", steps=2, seed=i)).id for i in range(4)]
        end = time.monotonic() + 240
        while not all(q.get(j).done for j in [poison, *others]):
            assert time.monotonic() < end, f"jobs not ended; workers' log:\n{log.read_text()[-4000:]}"
            for slot, proc in workers.items():
                if proc.poll() is not None:  # a pod restarted after its container died
                    assert proc.returncode == EXIT_CODE, log.read_text()[-4000:]
                    deaths += 1
                    workers[slot] = _worker(tiny_dir, redis_url, queue_name, f"{slot}-{deaths}", log)
            time.sleep(0.2)
        ended = {j: q.events(j)[-1][1] for j in [poison, *others]}
        records, dead = {j: q.get(j) for j in [poison, *others]}, q.dead_letters()
    finally:
        for proc in workers.values():
            proc.terminate()
        for proc in workers.values():
            proc.wait(60)
        q.close()
    assert all(isinstance(ended[j], Completed) for j in others), ended
    assert isinstance(ended[poison], Failed) and ended[poison].code == "ABORTED", ended[poison]
    assert dead == [poison]
    assert deaths == MAX_DELIVERIES  # each delivery killed its worker; the one after them is the dead letter
    assert records[poison].state == "failed" and records[poison].deliveries == MAX_DELIVERIES + 1
    # not held up by it: work queued behind it went on while it was killing workers. Only the first of them is
    # promised to end before it: with both workers down at once (each restart is slow on a loaded machine), the
    # poison's last delivery can come before the rest of them, which is not blocking them.
    assert min(records[j].updated_at for j in others) < records[poison].updated_at
