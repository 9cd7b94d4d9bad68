"""Stream a file to disk: sha256 checked, resumed with HTTP Range, Bearer kept on its own host.

Redirects are followed by hand: Civitai answers a download with a redirect to a signed CDN URL,
and the API key must not travel to that other host.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx

log = logging.getLogger("gpu_runner.downloads")

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


async def _open(
    client: httpx.AsyncClient, spec: DownloadSpec, headers: dict[str, str]
) -> httpx.Response:
    """GET with redirects followed by hand; Authorization only ever goes to the first origin."""
    url = spec.url
    auth_origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        request_headers = dict(headers)
        if spec.bearer and _origin(url) == auth_origin:
            request_headers["Authorization"] = f"Bearer {spec.bearer}"
        request = client.build_request("GET", url, headers=request_headers)
        response = await client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code in _REDIRECTS and location:
            await response.aclose()
            url = urljoin(url, location)
            continue
        return response
    raise DownloadError("download_failed", f"the {spec.what} download redirected too many times")


async def _attempt(client: httpx.AsyncClient, partial: _PartialFile) -> None:
    spec = partial.spec
    # identity: Range offsets must count the file's bytes, not a compressed stream's.
    headers = {"Accept-Encoding": "identity"}
    if partial.written:
        headers["Range"] = f"bytes={partial.written}-"
    try:
        response = await _open(client, spec, headers)
    except httpx.HTTPError as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None
    try:
        status = response.status_code
        if status == 206 and partial.written:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if not match or int(match.group(1)) != partial.written:
                partial.restart()
                raise _Retry("the server resumed from a different offset; starting over")
            if match.group(3) != "*":
                partial.total = int(match.group(3))
        elif status == 200:
            if partial.written:
                log.info("%s: the server ignored Range; starting over", spec.what)
                partial.restart()
            length = response.headers.get("content-length")
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
        # Raw bytes as they arrive: a buffered chunk would be lost when the connection breaks.
        async for chunk in response.aiter_raw():
            partial.write(chunk)
    except httpx.HTTPError as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None
    finally:
        await response.aclose()
    if partial.total is not None and partial.written < partial.total:
        raise _Retry(f"connection ended at {partial.written} of {partial.total} bytes")


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


def _copy_local(source: Path, spec: DownloadSpec, on_progress: ProgressFn | None) -> DownloadResult:
    if not source.is_file():
        code = "model_not_found" if spec.what == "model" else "download_failed"
        raise DownloadError(code, f"the {spec.what} file {source} does not exist")
    part = spec.dest.with_name(spec.dest.name + ".part")
    partial = _PartialFile(part, spec, on_progress)
    partial.total = source.stat().st_size
    try:
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                partial.write(chunk)
    finally:
        partial.close()
    return _finish(spec, part, partial)


async def download(
    client: httpx.AsyncClient,
    spec: DownloadSpec,
    *,
    retry_initial_s: float,
    retry_max_s: float,
    attempts: int = DOWNLOAD_ATTEMPTS,
    on_progress: ProgressFn | None = None,
) -> DownloadResult:
    """Download `spec.url` to `spec.dest`; raises DownloadError when it cannot."""
    spec.dest.parent.mkdir(parents=True, exist_ok=True)
    source = local_path(spec.url)
    if source is not None:
        return await asyncio.to_thread(_copy_local, source, spec, on_progress)

    part = spec.dest.with_name(spec.dest.name + ".part")
    partial = _PartialFile(part, spec, on_progress)
    delay = retry_initial_s
    try:
        for attempt in range(1, attempts + 1):
            try:
                await _attempt(client, partial)
                break
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
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
    finally:
        partial.close()
    return _finish(spec, part, partial)


def _finish(spec: DownloadSpec, part: Path, partial: _PartialFile) -> DownloadResult:
    """Check the finished .part file's sha256, then move it into place (or delete it)."""
    digest = partial.hasher.hexdigest()
    try:
        verified = _verify(spec, digest)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    part.replace(spec.dest)
    return DownloadResult(spec.dest, partial.written, digest, verified)
