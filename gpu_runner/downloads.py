"""Stream a file to disk: sha256 checked, resumed with HTTP Range, Bearer kept on its own host.

Each download receives, hashes and writes on a thread of its own (http.client), off the runner's
event loop. Redirects are followed by hand: Civitai answers a download with a redirect to a signed
CDN URL, and the API key must not travel to that other host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import http.client
import logging
import re
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx

log = logging.getLogger("gpu_runner.downloads")
USER_AGENT = "loratrain-runner/1"

CHUNK_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
DOWNLOAD_ATTEMPTS = 6
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

ProgressFn = Callable[[int, int | None], None]


class DownloadError(Exception):
    """A download that failed for good: a stable code and a message a user can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Retry(Exception):
    """A failure worth another try (connection dropped, timeout, 5xx)."""


@dataclass(frozen=True)
class DownloadSpec:
    url: str
    dest: Path
    what: str  # "images zip", "model": names the file in messages
    sha256: str | None = None
    expected_bytes: int | None = None
    max_bytes: int | None = None  # never write more than this (the disk check's budget)
    bearer: str | None = None  # sent only to the URL's own origin
    civitai: bool = False  # 401/403 are about the Civitai key


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes: int
    sha256: str
    sha256_verified: bool


def redact_url(url: str) -> str:
    """The URL without its query string and credentials: fine for logs and messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def local_path(url: str) -> Path | None:
    """The path for file:// URLs and plain absolute paths (the local provider), else None."""
    if url.startswith("file://"):
        return Path(url2pathname(urlsplit(url).path))
    if url.startswith("/"):
        return Path(url)
    return None


class _PartialFile:
    """The bytes received so far, with their running hash: what a Range request resumes from."""

    def __init__(self, path: Path, spec: DownloadSpec, on_progress: ProgressFn | None) -> None:
        self.path = path
        self.spec = spec
        self.on_progress = on_progress
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.hasher = hashlib.sha256()
        self.written = 0
        self.total: int | None = spec.expected_bytes

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hasher = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        limit = self.spec.max_bytes
        if limit is not None and self.written + len(chunk) > limit:
            raise DownloadError(
                "download_too_large",
                f"the {self.spec.what} is larger than the {limit} bytes expected or free on disk",
            )
        try:
            self.file.write(chunk)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DownloadError(
                    "disk_full", f"the disk filled up while downloading the {self.spec.what}"
                ) from None
            raise
        self.hasher.update(chunk)
        self.written += len(chunk)
        if self.on_progress is not None:
            self.on_progress(self.written, self.total)

    def close(self) -> None:
        self.file.close()


def _status_error(spec: DownloadSpec, status: int) -> DownloadError:
    if spec.civitai and status == 401:
        return DownloadError(
            "civitai_unauthorized",
            "Civitai refused the API key (HTTP 401): check that the key is valid and not revoked",
        )
    if spec.civitai and status == 403:
        return DownloadError(
            "civitai_forbidden",
            "Civitai answered 403 Forbidden: this is an early access model or the key's account "
            "may not download it",
        )
    if spec.what == "model" and status == 404:
        return DownloadError(
            "model_not_found", f"the model file was not found (HTTP 404) at {redact_url(spec.url)}"
        )
    if status in (401, 403):
        return DownloadError(
            "download_forbidden",
            f"the {spec.what} download was refused (HTTP {status}); its presigned URL may have "
            "expired",
        )
    return DownloadError("download_failed", f"the {spec.what} download failed with HTTP {status}")


class _Stopped(Exception):
    """The download was cancelled: its thread ends without another read or retry."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # As httpx builds it for the runner's other calls: SSL_CERT_FILE / SSL_CERT_DIR where set
    # (a host behind a private CA), else certifi's bundle.
    return httpx.create_ssl_context()


def _proxy_for(url: str) -> tuple[str, int] | None:
    """The proxy (host, port) the environment names for this URL (HTTP(S)_PROXY, NO_PROXY), as
    httpx honoured them for the runner's downloads; None to connect directly."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    where = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return where.hostname or "", where.port or 80


def _request_target(url: str) -> str:
    """Path and query as sent on the request line; characters a URL may not hold are quoted."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return quote(target, safe="!#$%&'()*+,/:;=?@[]~")


class _Receiver:
    """One download, run on a thread of its own: receives, hashes and writes. Socket reads,
    sha256 and file writes release the GIL, so downloads at once share the cores rather than one
    event loop; a cancel (stop) cuts the current read short."""

    def __init__(self, spec: DownloadSpec, timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.stopped = threading.Event()
        self._connection: http.client.HTTPConnection | None = None

    def stop(self) -> None:
        """From the event loop: end the thread at its next read, or its wait before a retry."""
        self.stopped.set()
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            # Wakes a read blocked on this socket; the thread then sees `stopped`. The OS
            # socket's own shutdown: SSLSocket.shutdown drops its TLS state first, so a request
            # being sent on the download's thread that moment would go out unencrypted.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _check_stopped(self) -> None:
        if self.stopped.is_set():
            raise _Stopped

    def run(
        self,
        *,
        attempts: int,
        retry_initial_s: float,
        retry_max_s: float,
        on_progress: ProgressFn | None,
    ) -> DownloadResult:
        spec = self.spec
        spec.dest.parent.mkdir(parents=True, exist_ok=True)
        partial = _PartialFile(spec.dest.with_name(spec.dest.name + ".part"), spec, on_progress)
        try:
            source = local_path(spec.url)
            if source is not None:
                self._copy_local(source, partial)
            else:
                self._download(partial, attempts, retry_initial_s, retry_max_s)
        finally:
            partial.close()
        return _finish(spec, partial)

    def _copy_local(self, source: Path, partial: _PartialFile) -> None:
        if not source.is_file():
            code = "model_not_found" if self.spec.what == "model" else "download_failed"
            raise DownloadError(code, f"the {self.spec.what} file {source} does not exist")
        partial.total = source.stat().st_size
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                self._check_stopped()
                partial.write(chunk)

    def _download(
        self, partial: _PartialFile, attempts: int, retry_initial_s: float, retry_max_s: float
    ) -> None:
        spec = self.spec
        delay = retry_initial_s
        for attempt in range(1, attempts + 1):
            try:
                self._attempt(partial)
                return
            except _Retry as e:
                if attempt == attempts:
                    raise DownloadError(
                        "download_failed",
                        f"the {spec.what} download failed after {attempts} attempts: {e}",
                    ) from None
                log.warning(
                    "%s download from %s: %s; retrying in %.2f s with %d bytes kept",
                    spec.what,
                    redact_url(spec.url),
                    e,
                    delay,
                    partial.written,
                )
                if self.stopped.wait(delay):
                    raise _Stopped from None
                delay = min(delay * 2, retry_max_s)

    def _connect(self, url: str, proxy: tuple[str, int] | None) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            if proxy is None:
                connection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout_s, context=_tls_context()
                )
            else:  # a CONNECT tunnel through the proxy; TLS end to end with the host
                connection = http.client.HTTPSConnection(
                    *proxy, timeout=self.timeout_s, context=_tls_context()
                )
                connection.set_tunnel(host, port)
        elif parts.scheme == "http":
            connection = http.client.HTTPConnection(
                *(proxy or (host, port)), timeout=self.timeout_s
            )
        else:
            raise DownloadError(
                "download_failed",
                f"the {self.spec.what} URL {redact_url(url)} is neither http nor https",
            )
        self._connection = connection
        try:
            connection.connect()
            # A stop that came before the socket existed could not cut it short: look again.
            self._check_stopped()
        except BaseException:
            connection.close()
            raise
        return connection

    def _open(
        self, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET with redirects followed by hand; Authorization only ever goes to the first
        origin."""
        spec = self.spec
        url = spec.url
        auth_origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            if spec.bearer and _origin(url) == auth_origin:
                request_headers["Authorization"] = f"Bearer {spec.bearer}"
            proxy = _proxy_for(url)
            connection = self._connect(url, proxy)
            try:
                # Through a plain-HTTP proxy the request line names the whole URL.
                target = _request_target(url)
                if url.startswith("http:") and proxy:
                    target = f"http://{urlsplit(url).netloc}{target}"
                connection.request("GET", target, headers=request_headers)
                response = connection.getresponse()
            except BaseException:
                connection.close()
                raise
            location = response.getheader("location")
            if response.status in _REDIRECTS and location:
                connection.close()
                url = urljoin(url, location)
                continue
            return connection, response
        raise DownloadError(
            "download_failed", f"the {spec.what} download redirected too many times"
        )

    def _attempt(self, partial: _PartialFile) -> None:
        spec = self.spec
        # identity: Range offsets must count the file's bytes, not a compressed stream's.
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT, "Accept": "*/*"}
        if partial.written:
            headers["Range"] = f"bytes={partial.written}-"
        try:
            connection, response = self._open(headers)
        except (OSError, http.client.HTTPException) as e:
            self._check_stopped()
            raise _Retry(f"{type(e).__name__}: {e}") from None
        try:
            status = response.status
            if status == 206 and partial.written:
                match = _CONTENT_RANGE.match(response.getheader("content-range", ""))
                if not match or int(match.group(1)) != partial.written:
                    partial.restart()
                    raise _Retry("the server resumed from a different offset; starting over")
                if match.group(3) != "*":
                    partial.total = int(match.group(3))
            elif status == 200:
                if partial.written:
                    log.info("%s: the server ignored Range; starting over", spec.what)
                    partial.restart()
                length = response.getheader("content-length")
                if length and length.isdigit():
                    partial.total = int(length)
            elif status == 416 and partial.written and partial.written == partial.total:
                return  # everything had arrived before the connection broke
            elif status >= 500 or status in _RETRYABLE:
                raise _Retry(f"HTTP {status}")
            else:
                raise _status_error(spec, status)
            if spec.max_bytes is not None and partial.total and partial.total > spec.max_bytes:
                raise DownloadError(
                    "download_too_large",
                    f"the {spec.what} is {partial.total} bytes, more than the {spec.max_bytes} "
                    "bytes expected or free on disk",
                )
            self._receive(response, partial)
        finally:
            connection.close()
        if partial.total is not None and partial.written < partial.total:
            raise _Retry(f"connection ended at {partial.written} of {partial.total} bytes")

    def _receive(self, response: http.client.HTTPResponse, partial: _PartialFile) -> None:
        """The body's raw bytes, written as each read returns them (read1: one socket read, not
        a full buffer), so what a broken connection leaves is kept for the Range request that
        resumes it."""
        while True:
            try:
                chunk = response.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:
                self._check_stopped()
                raise _Retry(f"{type(e).__name__}: {e}") from None
            self._check_stopped()
            if not chunk:
                return
            partial.write(chunk)


def _verify(spec: DownloadSpec, digest: str) -> bool:
    if spec.sha256 is None:
        return False
    if digest != spec.sha256.lower():
        raise DownloadError(
            "checksum_mismatch",
            f"the {spec.what} has sha256 {digest}, expected {spec.sha256}: the file is corrupt "
            "or not the one requested",
        )
    return True


class _ProgressOnLoop:
    """A download thread's progress, handed to `on_progress` on the event loop. At most one
    call waits there at a time and carries the latest figures when it runs, so a fast download
    does not wake the loop for every read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_progress: ProgressFn) -> None:
        self._loop = loop
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._latest: tuple[int, int | None] = (0, None)
        self._waiting = False

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            self._latest = (done, total)
            if self._waiting:
                return
            self._waiting = True
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, total = self._latest
            self._waiting = False
        self._on_progress(done, total)


async def download(
    spec: DownloadSpec,
    *,
    timeout_s: float,
    retry_initial_s: float,
    retry_max_s: float,
    attempts: int = DOWNLOAD_ATTEMPTS,
    on_progress: ProgressFn | None = None,
) -> DownloadResult:
    """Download `spec.url` (or copy a local file) to `spec.dest` on a thread of its own; raises
    DownloadError when it cannot. `on_progress` is called on the event loop. Cancelled, it stops
    the thread (a read or a wait before a retry at once, a connect within `timeout_s`) and
    returns once the thread has ended."""
    loop = asyncio.get_running_loop()
    receiver = _Receiver(spec, timeout_s)
    finished: asyncio.Future[DownloadResult] = loop.create_future()

    def run() -> None:
        try:
            result = receiver.run(
                attempts=attempts,
                retry_initial_s=retry_initial_s,
                retry_max_s=retry_max_s,
                on_progress=None if on_progress is None else _ProgressOnLoop(loop, on_progress),
            )
            outcome = functools.partial(finished.set_result, result)
        except BaseException as e:
            outcome = functools.partial(finished.set_exception, e)
        # The loop is closed only when nobody waits for this download any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(outcome)

    thread = threading.Thread(target=run, name=f"download: {spec.what}", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(finished)
    except asyncio.CancelledError:
        receiver.stop()
        # No download thread outlives its run: the stop ends it within one read.
        await asyncio.wait({finished})
        finished.exception()  # retrieved: its _Stopped is this cancel's doing, not news
        thread.join()  # at once: handing over the outcome was its last step
        raise


def _finish(spec: DownloadSpec, partial: _PartialFile) -> DownloadResult:
    """Check the finished .part file's sha256, then move it into place (or delete it)."""
    part = partial.path
    digest = partial.hasher.hexdigest()
    try:
        verified = _verify(spec, digest)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    part.replace(spec.dest)
    return DownloadResult(spec.dest, partial.written, digest, verified)
