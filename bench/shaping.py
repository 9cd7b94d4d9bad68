"""A TCP proxy that paces what a server sends to each connection: a download from a remote store
over a link of a given speed, for benchmarks whose loopback figures are bound by this machine's
CPU instead of by the network a real GPU host downloads over."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

READ_BYTES = 64 * 1024


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bytes_per_s: float | None
) -> None:
    started = time.monotonic()
    sent = 0
    try:
        while data := await reader.read(READ_BYTES):
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if bytes_per_s is not None:
                ahead = sent / bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


@contextlib.contextmanager
def shaped_proxy(target_url: str, bytes_per_s: float) -> Iterator[str]:
    """A proxy on a free loopback port in front of `target_url` (http://host:port); yields its
    URL. Each connection's server -> client bytes are paced to `bytes_per_s` (on average since
    the connection opened); client -> server bytes pass as they come. Presigned URLs made for
    the proxy's address stay valid: it forwards the bytes, Host header included, untouched."""
    target = urlsplit(target_url)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="shaped-proxy", daemon=True)
    thread.start()

    async def serve(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(
            _pump(client_reader, server_writer, None),
            _pump(server_reader, client_writer, bytes_per_s),
        )

    async def start() -> asyncio.Server:
        return await asyncio.start_server(serve, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:

        async def stop() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
