"""The cancel channel as a worker hears it: a pub/sub subscription on a daemon thread (redis_streams.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from difflens.queue.common import text

log = logging.getLogger(__name__)


class CancelWatch:
    """The cancel channel, heard by a daemon thread. `generation` counts subscriptions (a reconnect makes a new
    one, and what was published in between is unknown); a job is vouched for only while the subscription it was
    claimed under is still the one up. Ids heard for jobs not (yet) tracked are kept RACE_S seconds: the message
    of a job cancelled just after its claim script may arrive before `track`."""

    RACE_S = 60.0

    def __init__(self, client: Any, channel: str, owns_client: bool) -> None:
        self._client, self._owns_client, self._channel = client, owns_client, channel
        self._lock = threading.Lock()
        self._generation = 0
        self._up = False
        self._tracked: dict[str, int | None] = {}  # job id -> generation it was claimed under (None: not up)
        self._cancelled: set[str] = set()  # tracked jobs heard cancelled
        self._recent: dict[str, float] = {}  # untracked ids heard -> monotonic time
        self._up_event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cancel-watch-{channel}", daemon=True)
        self._thread.start()

    def wait_up(self, timeout_s: float) -> bool:
        return self._up_event.wait(timeout_s)

    def generation(self) -> int | None:
        with self._lock:
            return self._generation if self._up else None

    def track(self, job_id: str, generation: int | None) -> None:
        with self._lock:
            self._tracked[job_id] = generation
            if self._recent.pop(job_id, None) is not None:
                self._cancelled.add(job_id)

    def cancelled(self, job_id: str) -> bool | None:
        with self._lock:
            if job_id in self._cancelled:
                return True
            generation = self._tracked.get(job_id)
            if generation is None or not self._up or generation != self._generation:
                return None
            return False

    def mark(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._tracked.pop(job_id, None)
            self._cancelled.discard(job_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._owns_client:
            self._client.close()

    def _heard(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._tracked:
                self._cancelled.add(job_id)
                return
            now = time.monotonic()
            self._recent[job_id] = now
            if len(self._recent) > 1000:  # other workers' jobs: keep only the race window
                self._recent = {k: t for k, t in self._recent.items() if now - t < self.RACE_S}

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._client.pubsub()
                    pubsub.subscribe(self._channel)
                msg = pubsub.get_message(timeout=0.5)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":  # also after redis-py reconnected and subscribed again
                    with self._lock:
                        self._generation += 1
                        self._up = True
                    self._up_event.set()
                elif msg["type"] == "message":
                    self._heard(text(msg["data"]))
            except Exception as e:  # the connection broke: what was published meanwhile is unknown
                with self._lock:
                    was_up, self._up = self._up, False
                if was_up:  # once per outage, not per retry
                    log.warning("cancel channel %s: subscription lost (%s); jobs read their cancel flag per step "
                                "until it is back", self._channel, e)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                pubsub = None
                self._stop.wait(0.5)
        if pubsub is not None:
            pubsub.close()
