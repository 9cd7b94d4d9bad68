"""A TCP proxy in front of the local S3 server that can fake an outage, for upload tests.

    with OutageProxy(s3_endpoint) as proxy:
        url = presign_through(proxy.url)   # sign for the proxy's address: the Host header matches
        proxy.mode = "503"                 # every request gets 503 Service Unavailable
        proxy.mode = "refuse"              # every connection is closed at once, unanswered
        proxy.mode = "forward"             # bytes pass through both ways: S3 is back

Requests answered while not forwarding are counted in `refused`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal["forward", "503", "refuse"]

_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
    b"Content-Length: 65\r\nConnection: close\r\n\r\n"
    b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
)


class OutageProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.mode: Mode = "forward"
        self.refused = 0
        self.forwarded = 0
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> OutageProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            if self.mode == "refuse":
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with a reset, before any answer
            if self.mode == "503":
                self.refused += 1
                with contextlib.suppress(OSError):
                    client.recv(65536)  # the request's head; the body is not waited for
                    client.sendall(_UNAVAILABLE)
                return
            self.forwarded += 1
            with socket.create_connection(self._upstream, timeout=30) as upstream:
                pump = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                pump.start()
                _pump(client, upstream)
                pump.join(timeout=30)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until the source closes, then close the sink's sending side."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
