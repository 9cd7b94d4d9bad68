"""Every saved epoch goes up while the next one trains: its LoRA, samples and training state.

The trainer reports an epoch once its files are complete (SavedEpoch). The uploader packs the
state folder into one tar, asks the relay for presigned PUTs of exactly those files (a request
signed with the run's secret, so the GPU never holds S3 credentials), uploads them, writes the
epoch's manifest last, and sends `epoch.saved`. An epoch without its manifest never counts: a
host that dies half-way leaves a folder that a resume skips.

Uploads never fail the run: an epoch that cannot be uploaded is logged and the next one tries
again (the kept LoRA still goes up at the end, as it always did).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from gpu_runner.events import EventSender
from gpu_runner.protocol import (
    EPOCH_LORA,
    EPOCH_MANIFEST,
    EPOCH_STATE,
    EpochFile,
    EpochManifest,
    EpochSavedData,
    JobSpec,
    UploadUrls,
    UploadUrlsRequest,
    sign_payload,
)
from gpu_runner.trainers.base import SavedEpoch
from gpu_runner.upload import UploadError, upload_file

log = logging.getLogger("gpu_runner")

# A training state of the largest family's LoRA (optimizer moments included) is a few GB.
MAX_EPOCH_FILE_BYTES = 64 * 1024**3
URL_REQUEST_ATTEMPTS = 5


class EpochUploadError(Exception):
    """One epoch's files could not be uploaded (the run goes on)."""


class EpochUploader:
    """Uploads each reported epoch in the background, in order, one at a time."""

    def __init__(
        self,
        spec: JobSpec,
        client: httpx.AsyncClient,
        sender: EventSender,
        work_dir: Path,
        *,
        retry_initial_s: float,
        retry_max_s: float,
        redact: Callable[[str], str],
    ) -> None:
        assert spec.epoch_uploads is not None
        self._spec = spec
        self._url = spec.epoch_uploads.url
        self._client = client
        self._sender = sender
        self._work_dir = work_dir
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._redact = redact
        self._queue: asyncio.Queue[SavedEpoch | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        resumed = spec.resume
        self._losses: dict[int, float] = (
            {e: loss for e, loss in enumerate(resumed.epoch_losses, start=1)} if resumed else {}
        )
        self.uploaded: list[int] = []

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._work(), name="epoch-uploads")

    def report(self, saved: SavedEpoch) -> None:
        """The trainer's callback: safe from any thread, never blocks training."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, saved)

    async def finish(self, timeout_s: float) -> None:
        """Let the epochs reported so far go up (at most `timeout_s`), then stop."""
        if self._task is None or self._loop is None:
            return
        # Behind whatever the trainer reported from its thread (call_soon keeps their order).
        self._loop.call_soon(self._queue.put_nowait, None)
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if not done:
            log.warning("the last epochs' uploads did not finish within %.0f s", timeout_s)
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _work(self) -> None:
        while (saved := await self._queue.get()) is not None:
            self._losses[saved.epoch] = saved.loss
            started = time.monotonic()
            try:
                await self._upload(saved)
            except (EpochUploadError, UploadError, OSError, tarfile.TarError) as e:
                message = e.message if isinstance(e, UploadError) else str(e)
                log.warning("epoch %d was not uploaded: %s", saved.epoch, self._redact(message))
                continue
            self.uploaded.append(saved.epoch)
            log.info("epoch %d uploaded in %.1f s", saved.epoch, time.monotonic() - started)

    async def _upload(self, saved: SavedEpoch) -> None:
        folder = self._work_dir / f"{saved.epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {EPOCH_LORA: saved.lora}
        for index, sample in enumerate(saved.samples):
            files[f"samples/{index:02d}{sample.suffix}"] = sample
        if saved.state_dir is not None:
            files[EPOCH_STATE] = await asyncio.to_thread(
                pack_state, saved.state_dir, folder / EPOCH_STATE
            )
        urls = await self._ask_for_urls(saved.epoch, [*files, EPOCH_MANIFEST])
        uploaded: dict[str, EpochFile] = {}
        for name, path in files.items():
            result = await upload_file(
                self._client,
                urls.urls[name],
                path,
                max_bytes=MAX_EPOCH_FILE_BYTES,
                retry_initial_s=self._retry_initial_s,
                retry_max_s=self._retry_max_s,
                give_up_after_s=self._spec.limits.orphan_timeout_s,
            )
            uploaded[name] = EpochFile(
                key=urls.keys[name], bytes=result.bytes, sha256=result.sha256
            )
        manifest = EpochManifest(
            run_id=self._spec.run_id,
            attempt=self._spec.attempt,
            epoch=saved.epoch,
            step=saved.step,
            loss=saved.loss,
            epoch_losses=[self._losses[e] for e in range(1, saved.epoch + 1) if e in self._losses],
            files=uploaded,
        )
        manifest_path = folder / EPOCH_MANIFEST
        manifest_path.write_text(manifest.model_dump_json(indent=1), encoding="utf-8")
        # Last: from here on the epoch counts.
        await upload_file(
            self._client,
            urls.urls[EPOCH_MANIFEST],
            manifest_path,
            max_bytes=MAX_EPOCH_FILE_BYTES,
            retry_initial_s=self._retry_initial_s,
            retry_max_s=self._retry_max_s,
            give_up_after_s=self._spec.limits.orphan_timeout_s,
        )
        self._sender.emit(
            "epoch.saved",
            EpochSavedData(
                epoch=saved.epoch,
                total_epochs=saved.total_epochs,
                step=saved.step,
                loss=saved.loss,
                bucket=urls.bucket,
                lora=uploaded[EPOCH_LORA],
                samples=[f for name, f in uploaded.items() if name.startswith("samples/")],
                state=uploaded.get(EPOCH_STATE),
                manifest_key=urls.keys[EPOCH_MANIFEST],
            ),
        )
        # The state is up: the disk it took is the next epoch's.
        shutil.rmtree(folder, ignore_errors=True)
        if saved.state_dir is not None:
            shutil.rmtree(saved.state_dir, ignore_errors=True)

    async def _ask_for_urls(self, epoch: int, names: list[str]) -> UploadUrls:
        """Presigned PUTs from the relay, for a request signed with the run's secret."""
        request = UploadUrlsRequest(
            run_id=self._spec.run_id, attempt=self._spec.attempt, epoch=epoch, files=names
        )
        body = request.model_dump_json().encode("utf-8")
        delay = self._retry_initial_s
        problem = ""
        for attempt in range(1, URL_REQUEST_ATTEMPTS + 1):
            msg_id = f"{self._spec.run_id}:{self._spec.attempt}:uploads:{epoch}:{attempt}"
            headers = sign_payload(self._spec.webhook_secret, msg_id, body, datetime.now(UTC))
            try:
                response = await self._client.post(self._url, content=body, headers=headers)
            except httpx.HTTPError as e:
                problem = type(e).__name__
            else:
                if response.status_code == 200:
                    return UploadUrls.model_validate_json(response.content)
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500 and response.status_code not in (408, 429):
                    break
            if attempt < URL_REQUEST_ATTEMPTS:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        raise EpochUploadError(f"the relay gave no upload URLs for epoch {epoch}: {problem}")


def pack_state(state_dir: Path, archive: Path) -> Path:
    """One uncompressed tar of the state folder's files (optimizer states do not compress)."""
    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w") as tar:
        for path in sorted(state_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(state_dir)), recursive=False)
    partial.replace(archive)
    return archive


def unpack_state(archive: Path, state_dir: Path) -> Path:
    """The state folder from its tar; nothing may land outside it."""
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    with tarfile.open(archive, "r") as tar:
        tar.extractall(state_dir, filter="data")
    with contextlib.suppress(OSError):
        archive.unlink()
    return state_dir
