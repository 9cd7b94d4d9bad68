"""Upload the best checkpoint through a presigned PUT: streamed, sized, hashed, retried."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("gpu_runner.upload")

CHUNK_BYTES = 1024 * 1024
UPLOAD_ATTEMPTS = 5
_RETRYABLE = frozenset({408, 425, 429})
_S3_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")


class UploadError(Exception):
    """An upload that failed for good: a stable code and a readable message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UploadResult:
    bytes: int
    sha256: str


async def _read_chunks(
    path: Path, hasher: hashlib._Hash, counter: list[int]
) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:  # noqa: ASYNC230 - 1 MiB reads from local disk
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            counter[0] += len(chunk)
            yield chunk


async def upload_file(
    client: httpx.AsyncClient,
    url: str,
    path: Path,
    *,
    max_bytes: int,
    retry_initial_s: float,
    retry_max_s: float,
    attempts: int = UPLOAD_ATTEMPTS,
) -> UploadResult:
    """PUT `path` to `url` with a Content-Length (S3 presigned PUTs refuse chunked bodies)."""
    size = (await asyncio.to_thread(path.stat)).st_size
    if size > max_bytes:
        raise UploadError(
            "model_too_large",
            f"the checkpoint {path.name} is {size} bytes, over the upload limit of "
            f"{max_bytes} bytes",
        )
    if size == 0:
        raise UploadError("empty_checkpoint", f"the checkpoint {path.name} is empty")
    delay = retry_initial_s
    for attempt in range(1, attempts + 1):
        hasher = hashlib.sha256()
        sent = [0]
        try:
            # An explicit Content-Length makes httpx frame the streamed body by length, not chunks.
            response = await client.put(
                url,
                content=_read_chunks(path, hasher, sent),
                headers={"Content-Length": str(size)},
            )
        except httpx.HTTPError as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            status = response.status_code
            if 200 <= status < 300:
                if sent[0] != size:
                    raise UploadError(
                        "upload_failed", f"the checkpoint {path.name} changed while uploading"
                    )
                return UploadResult(bytes=size, sha256=hasher.hexdigest())
            if status < 500 and status not in _RETRYABLE:
                found = _S3_CODE.search(response.text)
                detail = f" ({found.group(1)})" if found else ""
                raise UploadError(
                    "upload_refused",
                    f"the upload URL refused the checkpoint with HTTP {status}{detail}; "
                    "the presigned URL may have expired",
                )
            problem = f"HTTP {status}"
        if attempt == attempts:
            raise UploadError(
                "upload_failed", f"the upload failed after {attempts} attempts: {problem}"
            )
        log.warning("upload attempt %d failed: %s; retrying in %.2f s", attempt, problem, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, retry_max_s)
    raise AssertionError("unreachable")
