"""Waiting in tests for something to happen, instead of sleeping a guessed time: poll a condition until a deadline.

The deadline is generous on purpose (a shared 2-core machine under load is slow); a test that passes waits only as
long as the condition takes, and one that fails says what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Long enough for a loaded CI machine; a test that passes never waits it out.
DEFAULT_TIMEOUT_S = 60.0


def wait_until(condition: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S, interval_s: float = 0.02,
               what: str | Callable[[], str] = "") -> T:
    """condition()'s first truthy value, polled every `interval_s`; AssertionError naming `what` (a text, or a
    function giving one, e.g. a log read at that moment) when `timeout_s` passes first."""
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            said = what() if callable(what) else what
            raise AssertionError(f"not within {timeout_s:g} s: {said or condition}")
        time.sleep(interval_s)
