"""A TCP proxy that delays every chunk by a fixed time in each direction: Redis one network hop away from the
front and the worker, on one machine (`bench.service --redis-delay-ms`).

    python -m bench.latency_proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS

Prints "ready" once it listens. Chunks keep their order per direction; the delay is added on arrival, so a
stream of chunks is delayed, not throttled. A round trip through it costs 2 x DELAY_MS plus the proxy's own time
(~0.6 ms per round trip on the 2-core CI machine at DELAY_MS 1).

In a test, `LatencyProxy` runs it in a thread of the test's process, with a delay that can change while it runs: a
Redis that turns slow (or stalls, at a delay longer than any deadline) and recovers, its clients never restarted.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import Any


class Delay:
    """The delay added each way, in seconds: read as each chunk arrives, so a change applies to the next chunk."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    due: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            at, data = await due.get()
            if data is None:
                writer.close()
                return
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            due.put_nowait((time.monotonic() + delay.seconds, data))
    finally:
        due.put_nowait((0.0, None))
        await task


async def _start(listen_port: int, target: tuple[str, int], delay: Delay) -> asyncio.Server:
    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*target)
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay),
                             return_exceptions=True)

    return await asyncio.start_server(connection, "127.0.0.1", listen_port)


async def serve(listen_port: int, target: tuple[str, int], delay_s: float) -> None:
    server = await _start(listen_port, target, Delay(delay_s))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


class LatencyProxy:
    """The proxy on a free 127.0.0.1 port, served by a thread of this process until close(): `port`, and `delay_s`
    to change the delay each way while it runs."""

    def __init__(self, target: tuple[str, int], delay_s: float = 0.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._delay = Delay(delay_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(_start(self.port, target, self._delay), self._loop).result(10)

    @property
    def delay_s(self) -> float:
        return self._delay.seconds

    @delay_s.setter
    def delay_s(self, seconds: float) -> None:
        self._delay.seconds = seconds

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():  # the connections' pumps
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(__doc__)
    host, _, port = argv[1].rpartition(":")
    asyncio.run(serve(int(argv[0]), (host or "127.0.0.1", int(port)), float(argv[2]) / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
