"""Downloads over real HTTP: resume with Range, sha256, Bearer only on its own host, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_runner.downloads import DownloadError, DownloadSpec, download
from tests.http_support import serve_asgi
from tests.runner.support import FileServer, pseudo_random, sha256

CONTENT = pseudo_random("download", 3 * 1024 * 1024 + 123)


@pytest.fixture
def files() -> Iterator[tuple[FileServer, str]]:
    server = FileServer()
    with serve_asgi(server) as base_url:
        yield server, base_url


async def fetch(spec: DownloadSpec, **kw: object) -> object:
    options: dict[str, object] = {"timeout_s": 5, "retry_initial_s": 0.01, "retry_max_s": 0.05}
    return await download(spec, **{**options, **kw})  # type: ignore[arg-type]


async def test_resumes_with_range_after_a_dropped_connection(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, drop_after=1_000_000)
    dest = tmp_path / "model.bin"
    seen: list[tuple[int, int | None]] = []
    callers: set[threading.Thread] = set()

    def on_progress(done: int, total: int | None) -> None:
        seen.append((done, total))
        callers.add(threading.current_thread())

    result = await fetch(
        DownloadSpec(
            url=f"{base}/files/model.bin", dest=dest, what="model", sha256=sha256(CONTENT)
        ),
        on_progress=on_progress,
    )
    assert dest.read_bytes() == CONTENT
    assert result.sha256_verified and result.bytes == len(CONTENT)  # type: ignore[attr-defined]
    first, second = server.seen("model.bin")
    assert "range" not in first.headers
    kept = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < kept <= 1_000_000  # only what arrived was kept, and asked for from there on
    assert seen[-1] == (len(CONTENT), len(CONTENT))
    assert callers == {threading.current_thread()}  # progress reaches the event loop's thread
    assert not (tmp_path / "model.bin.part").exists()


async def test_starts_over_when_the_server_ignores_range(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, drop_after=500_000, ranges=False)
    dest = tmp_path / "model.bin"
    await fetch(
        DownloadSpec(url=f"{base}/files/model.bin", dest=dest, what="model", sha256=sha256(CONTENT))
    )
    assert dest.read_bytes() == CONTENT
    assert "range" in server.seen("model.bin")[1].headers


async def test_checksum_mismatch_is_refused_and_nothing_is_kept(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT)
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError) as caught:
        await fetch(
            DownloadSpec(url=f"{base}/files/model.bin", dest=dest, what="model", sha256="0" * 64)
        )
    assert caught.value.code == "checksum_mismatch"
    assert "expected 0000" in caught.value.message
    assert len(server.seen("model.bin")) == 1  # not retried
    assert not dest.exists() and not (tmp_path / "model.bin.part").exists()


async def test_retries_server_errors(files: tuple[FileServer, str], tmp_path: Path) -> None:
    server, base = files
    server.add("model.bin", CONTENT, fail_first=2)
    dest = tmp_path / "model.bin"
    result = await fetch(DownloadSpec(url=f"{base}/files/model.bin", dest=dest, what="model"))
    assert dest.read_bytes() == CONTENT
    assert not result.sha256_verified  # type: ignore[attr-defined]
    assert len(server.seen("model.bin")) == 3


async def test_bearer_goes_to_its_own_host_but_not_across_a_redirect(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    cdn = FileServer()
    cdn.add("model.bin", CONTENT)
    with serve_asgi(cdn) as cdn_base:
        # Same machine, other host name: the key must not follow.
        signed = cdn_base.replace("127.0.0.1", "localhost") + "/files/model.bin?sig=abc"
        server.add("download", b"", bearer="the-key", redirect_to=signed)
        dest = tmp_path / "model.bin"
        await fetch(
            DownloadSpec(
                url=f"{base}/files/download",
                dest=dest,
                what="model",
                sha256=sha256(CONTENT),
                bearer="the-key",
                civitai=True,
            )
        )
    assert dest.read_bytes() == CONTENT
    assert server.seen("download")[0].headers["authorization"] == "Bearer the-key"
    (at_cdn,) = cdn.seen("model.bin")
    assert "authorization" not in at_cdn.headers


async def test_bearer_follows_a_redirect_on_the_same_host(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, bearer="the-key")
    server.add("download", b"", bearer="the-key", redirect_to="/files/model.bin")
    dest = tmp_path / "model.bin"
    await fetch(
        DownloadSpec(url=f"{base}/files/download", dest=dest, what="model", bearer="the-key")
    )
    assert dest.read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("status", "civitai", "code", "message"),
    [
        (401, True, "civitai_unauthorized", "Civitai refused the API key"),
        (403, True, "civitai_forbidden", "early access model or the key's account"),
        (404, True, "model_not_found", "not found"),
        (403, False, "download_forbidden", "presigned URL may have expired"),
        (400, False, "download_failed", "HTTP 400"),
    ],
)
async def test_http_errors_have_stable_codes(
    files: tuple[FileServer, str],
    tmp_path: Path,
    status: int,
    civitai: bool,
    code: str,
    message: str,
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, status=status)
    with pytest.raises(DownloadError) as caught:
        await fetch(
            DownloadSpec(
                url=f"{base}/files/model.bin?token=secret",
                dest=tmp_path / "m.bin",
                what="model",
                bearer="k" if civitai else None,
                civitai=civitai,
            )
        )
    assert caught.value.code == code
    assert message in caught.value.message
    assert "secret" not in caught.value.message
    assert len(server.seen("model.bin")) == 1


async def test_gives_up_after_the_last_attempt(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, status=503)
    with pytest.raises(DownloadError, match="failed after 3 attempts: HTTP 503") as caught:
        await fetch(
            DownloadSpec(url=f"{base}/files/model.bin", dest=tmp_path / "m.bin", what="model"),
            attempts=3,
        )
    assert caught.value.code == "download_failed"


async def test_never_writes_more_than_allowed(
    files: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, base = files
    server.add("model.bin", CONTENT)
    with pytest.raises(DownloadError) as caught:
        await fetch(
            DownloadSpec(
                url=f"{base}/files/model.bin",
                dest=tmp_path / "m.bin",
                what="model",
                max_bytes=1000,
            )
        )
    assert caught.value.code == "download_too_large"


async def test_copies_local_files(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    source.write_bytes(CONTENT)
    for url in (source.as_uri(), str(source)):
        dest = tmp_path / "out" / "model.safetensors"
        result = await fetch(DownloadSpec(url=url, dest=dest, what="model", sha256=sha256(CONTENT)))
        assert dest.read_bytes() == CONTENT
        assert result.sha256_verified  # type: ignore[attr-defined]
        dest.unlink()
    with pytest.raises(DownloadError) as caught:
        await fetch(DownloadSpec(url=str(tmp_path / "absent"), dest=dest, what="model"))
    assert caught.value.code == "model_not_found"


def download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("download: ")]


@pytest.mark.parametrize(
    ("serving", "retry_initial_s"),
    [
        # One 64 KiB chunk every 10 s: the thread is waiting in a read when the cancel comes.
        ({"chunk_delay_s": 10}, 0.01),
        # Refused with 503, then 30 s before the next try: the thread is waiting to retry.
        ({"fail_first": 5}, 30),
    ],
    ids=["reading", "waiting-to-retry"],
)
async def test_a_cancelled_download_ends_its_thread_at_once(
    files: tuple[FileServer, str],
    tmp_path: Path,
    serving: dict[str, object],
    retry_initial_s: float,
) -> None:
    server, base = files
    server.add("model.bin", CONTENT, **serving)
    spec = DownloadSpec(url=f"{base}/files/model.bin", dest=tmp_path / "m.bin", what="model")
    task = asyncio.create_task(fetch(spec, timeout_s=60, retry_initial_s=retry_initial_s))
    deadline = time.monotonic() + 10
    while not server.seen("model.bin"):
        assert time.monotonic() < deadline, "the download never reached the server"
        await asyncio.sleep(0.01)
    assert download_threads()
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Neither the server's next chunk, the next try, nor the 60 s read timeout was waited for.
    assert time.monotonic() - cancelled_at < 3
    assert download_threads() == []
    assert not spec.dest.exists()


async def test_an_http_proxy_named_by_the_environment_carries_the_download(
    files: tuple[FileServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, base = files
    server.add("model.bin", CONTENT)
    # The file server stands in for the proxy: it gets the whole URL on the request line.
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", base)
    dest = tmp_path / "model.bin"
    await fetch(
        DownloadSpec(
            url="http://files.invalid/files/model.bin",
            dest=dest,
            what="model",
            sha256=sha256(CONTENT),
        )
    )
    assert dest.read_bytes() == CONTENT
    (request,) = server.seen("model.bin")
    assert request.headers["host"] == "files.invalid"
    assert request.headers["user-agent"].startswith("loratrain-runner/")
