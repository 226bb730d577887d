"""One log line per outage of a dependency, not one per retry.

A worker retries its claim every second and the front samples the queue depth every few seconds; while Redis is
down, logging every failed attempt with its traceback buries everything else an operator needs to read."""

from __future__ import annotations

import logging
import time


class Outage:
    """Call failed() from the except block of every failed attempt and ok() after every successful one. The first
    failure of an outage is logged at `level` with its traceback, later ones at DEBUG; the first success after
    it logs, at INFO, how long the outage lasted and how many attempts failed."""

    def __init__(self, log: logging.Logger, what: str, level: int = logging.ERROR) -> None:
        self._log, self._what, self._level = log, what, level
        self._since: float | None = None
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self) -> None:
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.log(self._level, "%s failed; retrying (further failures are logged at DEBUG until it "
                          "works again)", self._what, exc_info=True)
        else:
            self._log.debug("%s failed again (%d in a row)", self._what, self._failures, exc_info=True)

    def ok(self) -> None:
        if self._since is None:
            return
        self._log.info("%s works again after %.1f s (%d failed attempts)", self._what,
                       time.monotonic() - self._since, self._failures)
        self._since, self._failures = None, 0
