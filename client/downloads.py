"""Files of a run fetched from S3 and kept only when their size and sha256 are the ones the run
recorded."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from common.s3 import s3_client
from common.settings import Settings

from .errors import ChecksumMismatch, DownloadFailed, StorageError

DOWNLOAD_CHUNK_BYTES = 1024 * 1024
HTTP_TIMEOUT_S = 10.0
# A link signed here for one download: long enough for a large model on a slow line.
PRESIGNED_DOWNLOAD_S = 3600


async def download_verified(
    settings: Settings,
    bucket: str,
    key: str,
    size: int,
    sha256: str,
    target: Path,
    what: str,
    url: str | None = None,
    http: httpx.AsyncClient | None = None,
) -> Path:
    """Download s3://bucket/key to `target` and check its size and sha256 against what the run
    verified; `url` (a link the run signed) is tried first. Keeps nothing when any of that
    fails. The absolute path of the file."""
    uri = f"s3://{bucket}/{key}"
    try:
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadFailed(f"cannot write {target}: {e.strerror or e}") from None
    try:
        sha: str | None = None
        if url is not None:
            # The run's link names S3 as it was then: a restarted stack may listen elsewhere.
            with contextlib.suppress(httpx.TransportError):
                sha = await fetch(url, target, size, http)
        if sha is None:  # no link, or it expired (it lives a day): sign a fresh one here
            sha = await fetch(presign_download(settings, bucket, key), target, size, http)
    except httpx.HTTPStatusError as e:
        raise DownloadFailed(
            f"could not download {what}: S3 answered {e.response.status_code} for {uri}"
        ) from None
    except (httpx.HTTPError, OSError) as e:
        target.with_name(target.name + ".part").unlink(missing_ok=True)
        raise DownloadFailed(f"could not download {what}: {type(e).__name__}: {e}") from None
    except (BotoCoreError, ClientError) as e:
        raise StorageError(
            f"cannot sign a download of {uri} here ({e}); check the LORA_S3_ settings"
        ) from None
    if sha is None:
        raise DownloadFailed(f"S3 refused the download of {uri}: the link has expired or is wrong")
    return await asyncio.to_thread(keep_if_verified, target, uri, sha, sha256)


def keep_if_verified(target: Path, uri: str, sha256: str, verified: str) -> Path:
    """`target`'s absolute path when `sha256` is the `verified` one; else it is deleted."""
    if sha256 != verified:
        target.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"the download of {uri} has sha256 {sha256}, not the verified {verified}; nothing "
            "was kept, try again"
        )
    return target.resolve()


def presign_download(settings: Settings, bucket: str, key: str) -> str:
    return str(
        s3_client(settings).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGNED_DOWNLOAD_S
        )
    )


async def fetch(
    url: str, target: Path, size: int, http: httpx.AsyncClient | None = None
) -> str | None:
    """Stream `url` to `target` (through a .part file); its sha256, or None on 403."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=HTTP_TIMEOUT_S))
        response = await stack.enter_async_context(http.stream("GET", url))
        if response.status_code == 403:
            return None
        response.raise_for_status()
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with partial.open("wb") as f:
            async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                digest.update(chunk)
                f.write(chunk)
    got = partial.stat().st_size
    if got != size:
        partial.unlink()
        raise OSError(f"got {got} bytes of {size}")
    partial.replace(target)
    return digest.hexdigest()
