"""One TLS context per process for the httpx clients the worker's activities open.

Building a context reads the CA bundle: tens of milliseconds of CPU with the GIL held. An async
activity that built one per call (`httpx.AsyncClient()` does) held the worker's event loop that
long each time, and at 10 run starts a second that loop, which also feeds every workflow task
and query, fell behind (bench P6 at 1,000 runs: status queries unanswered for 10 s). A context
is safe to share between clients and threads; it is built as httpx builds its default one
(`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured, else certifi's bundle).
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's TLS context for verified HTTPS, built on first use."""
    return httpx.create_ssl_context()
