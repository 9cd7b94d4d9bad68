"""Upload through a presigned PUT: streamed, sized, hashed, retried until a deadline.

The trained model is hours of GPU time: a short S3 outage must not throw it away, so the upload
retries with backoff for as long as the runner would wait for the relay (the orphan timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

log = logging.getLogger("gpu_runner.upload")

CHUNK_BYTES = 1024 * 1024
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
    """The file in 1 MiB chunks, each read and hashed in a worker thread: the event loop (and a
    trainer that shares it) never waits for the disk or the hash."""

    def next_chunk(f: BinaryIO) -> bytes:
        chunk = f.read(CHUNK_BYTES)
        hasher.update(chunk)
        return chunk

    with open(path, "rb") as f:  # noqa: ASYNC230 - opening is instant; reads go to a thread
        while chunk := await asyncio.to_thread(next_chunk, f):
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
    give_up_after_s: float,
    on_retry: Callable[[int, str], None] | None = None,
) -> UploadResult:
    """PUT `path` to `url` with a Content-Length (S3 presigned PUTs refuse chunked bodies).

    Network errors, 5xx and throttling answers are retried with exponential backoff (doubling
    from `retry_initial_s` up to `retry_max_s`) until `give_up_after_s` have passed; each retry
    is reported to `on_retry(attempt, problem)`. A refusal (other 4xx) is final at once.
    """
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
    give_up_at = time.monotonic() + give_up_after_s
    attempt = 0
    while True:
        attempt += 1
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
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
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
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise UploadError(
                "upload_failed",
                f"the upload failed for {give_up_after_s:.0f} s ({attempt} attempts); "
                f"last: {problem}",
            )
        wait_s = min(delay, remaining)
        log.warning("upload attempt %d failed: %s; retrying in %.2f s", attempt, problem, wait_s)
        if on_retry is not None:
            on_retry(attempt, problem)
        await asyncio.sleep(wait_s)
        delay = min(delay * 2, retry_max_s)
