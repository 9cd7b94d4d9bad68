"""Upload of the best checkpoint: presigned PUT to the local S3 server, framing, retries, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpu_runner.upload import UploadError, UploadResult, upload_file
from tests.http_support import serve_asgi
from tests.runner.support import pseudo_random, sha256

CHECKPOINT = pseudo_random("checkpoint", 2 * 1024 * 1024 + 7)


@dataclass
class PutRecorder:
    fail_first: int = 0
    status: int | None = None
    puts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def app(self) -> Starlette:
        async def put(request: Request) -> Response:
            body = await request.body()
            self.puts.append((dict(request.headers), body))
            if self.status is not None:
                return Response(b"<Error><Code>AccessDenied</Code></Error>", self.status)
            if len(self.puts) <= self.fail_first:
                return Response(b"slow down", 503)
            return Response(b"", 200)

        return Starlette(routes=[Route("/upload", put, methods=["PUT"])])


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "lora-000002.safetensors"
    path.write_bytes(CHECKPOINT)
    return path


async def put(
    url: str,
    path: Path,
    max_bytes: int = 10**8,
    give_up_after_s: float = 10,
    retries: list[tuple[int, str]] | None = None,
) -> UploadResult:
    seen = retries if retries is not None else []
    async with httpx.AsyncClient(timeout=10) as client:
        return await upload_file(
            client,
            url,
            path,
            max_bytes=max_bytes,
            retry_initial_s=0.01,
            retry_max_s=0.05,
            give_up_after_s=give_up_after_s,
            on_retry=lambda attempt, problem: seen.append((attempt, problem)),
        )


async def test_uploads_to_a_presigned_put(s3: Any, settings: Any, checkpoint: Path) -> None:
    url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": settings.bucket, "Key": "runs/r/lora.safetensors"}
    )
    result = await put(url, checkpoint)
    assert result == UploadResult(bytes=len(CHECKPOINT), sha256=sha256(CHECKPOINT))
    stored = s3.get_object(Bucket=settings.bucket, Key="runs/r/lora.safetensors")["Body"].read()
    assert sha256(stored) == result.sha256


@pytest.fixture
def recorder() -> Iterator[tuple[PutRecorder, str]]:
    rec = PutRecorder()
    with serve_asgi(rec.app) as base:
        yield rec, f"{base}/upload"


async def test_sends_content_length_not_chunks_and_retries(
    recorder: tuple[PutRecorder, str], checkpoint: Path
) -> None:
    rec, url = recorder
    rec.fail_first = 2
    retries: list[tuple[int, str]] = []
    result = await put(url, checkpoint, retries=retries)
    assert len(rec.puts) == 3
    assert retries == [(1, "HTTP 503"), (2, "HTTP 503")]
    for headers, body in rec.puts:
        assert headers["content-length"] == str(len(CHECKPOINT))
        assert "transfer-encoding" not in headers
        assert body == CHECKPOINT
    assert result.sha256 == sha256(CHECKPOINT)


async def test_refusal_is_not_retried(recorder: tuple[PutRecorder, str], checkpoint: Path) -> None:
    rec, url = recorder
    rec.status = 403
    with pytest.raises(UploadError, match=r"HTTP 403 \(AccessDenied\)") as caught:
        await put(url, checkpoint)
    assert caught.value.code == "upload_refused"
    assert len(rec.puts) == 1


async def test_refuses_a_checkpoint_over_the_limit(
    recorder: tuple[PutRecorder, str], checkpoint: Path
) -> None:
    rec, url = recorder
    with pytest.raises(UploadError, match="over the upload limit of 1000 bytes") as caught:
        await put(url, checkpoint, max_bytes=1000)
    assert caught.value.code == "model_too_large"
    assert rec.puts == []


async def test_retries_until_its_deadline_then_says_so(
    recorder: tuple[PutRecorder, str], checkpoint: Path
) -> None:
    rec, url = recorder
    rec.fail_first = 10**6
    started = time.monotonic()
    with pytest.raises(
        UploadError, match=r"the upload failed for 1 s \(\d+ attempts\); last: HTTP 503"
    ):
        await asyncio.wait_for(put(url, checkpoint, give_up_after_s=1), timeout=60)
    # Not before its deadline, and soon after it: a loaded machine adds seconds, not tens.
    assert 1 <= time.monotonic() - started < 20
    assert len(rec.puts) > 10  # backoff capped at 0.05 s: it kept trying the whole second
