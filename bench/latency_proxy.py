"""A TCP proxy that delays every chunk by a fixed time in each direction: Redis one network hop away from the
front and the worker, on one machine (`bench.service --redis-delay-ms`).

    python -m bench.latency_proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS

Prints "ready" once it listens. Chunks keep their order per direction; the delay is added on arrival, so a
stream of chunks is delayed, not throttled. A round trip through it costs 2 x DELAY_MS plus the proxy's own time
(~0.6 ms per round trip on the 2-core CI machine at DELAY_MS 1).
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
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
            due.put_nowait((time.monotonic() + delay_s, data))
    finally:
        due.put_nowait((0.0, None))
        await task


async def serve(listen_port: int, target: tuple[str, int], delay_s: float) -> None:
    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*target)
        await asyncio.gather(_pump(client_r, server_w, delay_s), _pump(server_r, client_w, delay_s),
                             return_exceptions=True)

    server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(__doc__)
    host, _, port = argv[1].rpartition(":")
    asyncio.run(serve(int(argv[0]), (host or "127.0.0.1", int(port)), float(argv[2]) / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
