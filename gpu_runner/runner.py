"""The GPU side of a run: read the job, fetch inputs, train, upload, and report every step.

Exit codes: 0 uploaded, 1 the run failed (run.failed was sent), 2 the job could not be read,
3 the relay said the run is closed (410), 4 the relay was unreachable for the orphan timeout,
128 + signal number when terminated (143 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import shutil
import signal
import sys
import tarfile
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import httpx
from pydantic import BaseModel, ValidationError

from gpu_runner.archive import ArchiveError, pack_folder, safe_extract
from gpu_runner.downloads import DownloadError, DownloadResult, DownloadSpec, download, redact_url
from gpu_runner.epochs import EpochUploader, unpack_state
from gpu_runner.events import EventSender
from gpu_runner.protocol import (
    ComponentRole,
    EventType,
    FilesReadyData,
    GpuReadyData,
    HeartbeatData,
    ImagesReadyData,
    JobSpec,
    ModelComponent,
    ModelReadyData,
    ModelUploadedData,
    RunFailedData,
    Stage,
    TrainingCompletedData,
    TrainingProgressData,
    describe_invalid,
)
from gpu_runner.self_destroy import LeaveReason, destroy_own_instance
from gpu_runner.settings import RunnerSettings
from gpu_runner.system import free_disk_bytes, probe_gpu, required_disk_bytes
from gpu_runner.trainers.base import (
    PreparedTraining,
    ResumePoint,
    Trainer,
    TrainerError,
    TrainingInputs,
    TrainingResult,
)
from gpu_runner.upload import UploadError, upload_file

log = logging.getLogger("gpu_runner")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_JOB = 2
EXIT_RUN_CLOSED = 3
EXIT_ORPHANED = 4

LOG_TAIL_LINES = 50
# The full log goes next to the model; past this size only its end is uploaded.
LOG_UPLOAD_MAX_BYTES = 16 * 1024 * 1024
# A log is worth a short wait, not holding the GPU: the model upload is the patient one.
LOG_UPLOAD_PATIENCE_S = 60.0
LOG_FILE_NAME = "run.log"
TENSORBOARD_ARCHIVE_NAME = "tensorboard.tar.gz"
JOB_FETCH_ATTEMPTS = 4
STOP_TRAINER_TIMEOUT_S = 30.0
TERMINATE_FLUSH_S = 8.0  # docker stop waits 10 s before SIGKILL
_HEARTBEAT_STAGES: frozenset[Stage] = frozenset({"images", "model", "training", "upload"})

_MILESTONES: frozenset[EventType] = frozenset(
    {
        "gpu.ready",
        "images.ready",
        "model.ready",
        "files.ready",
        "training.completed",
        "model.uploaded",
        "epoch.saved",
    }
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Redaction and logging
# --------------------------------------------------------------------------------------------

_URL_QUERY = re.compile(r"((?:https?|s3|file)://[^\s?#\"'<>]*)\?[^\s\"'<>]*")
_AMZ_QUERY = re.compile(r"\?[^\s\"'<>]*X-Amz-[^\s\"'<>]*")
REDACTED = "[redacted]"


class Redactor:
    """Removes the run's secrets and URL query strings (presigned signatures) from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            if secret and secret not in self._secrets:
                self._secrets.append(secret)
        self._secrets.sort(key=len, reverse=True)  # longest first, so no partial leaks remain

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
        return _AMZ_QUERY.sub(f"?{REDACTED}", text)


class RedactingFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def configure_logging(redactor: Redactor, level: int = logging.INFO) -> None:
    """Every log line goes to stderr through the redactor."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs each request with its full URL at INFO; keep it to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Job intake
# --------------------------------------------------------------------------------------------


class JobIntakeError(Exception):
    """The job spec could not be fetched or is not valid; the message holds no secrets."""


async def load_job(settings: RunnerSettings) -> JobSpec:
    """Fetch and validate the job spec from LORA_JOB_URL (a presigned GET)."""
    url = settings.job_url
    if not url:
        raise JobIntakeError("LORA_JOB_URL is not set: the runner needs the job spec's URL")
    shown = redact_url(url)
    delay = settings.runner_retry_initial_s
    body = b""
    async with httpx.AsyncClient(timeout=settings.runner_http_timeout_s) as client:
        for attempt in range(1, JOB_FETCH_ATTEMPTS + 1):
            try:
                response = await client.get(url, follow_redirects=True)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}"
            else:
                if response.status_code == 200:
                    body = response.content
                    break
                if response.status_code < 500 and response.status_code != 429:
                    raise JobIntakeError(
                        f"cannot read the job spec at {shown}: HTTP {response.status_code} "
                        "(the URL may have expired or the job was removed)"
                    )
                problem = f"HTTP {response.status_code}"
            if attempt == JOB_FETCH_ATTEMPTS:
                raise JobIntakeError(
                    f"cannot read the job spec at {shown} after {attempt} attempts: {problem}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.runner_retry_max_s)
    try:
        return JobSpec.model_validate_json(body)
    except ValidationError as e:
        raise JobIntakeError(
            f"the job spec at {shown} is not valid: {describe_invalid(e)}"
        ) from None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step that failed in a way to report as run.failed."""

    def __init__(
        self, stage: Stage, code: str, message: str, log_tail: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.stage: Stage = stage
        self.code = code
        self.message = message
        self.log_tail = log_tail or []


def load_trainer(spec: JobSpec, settings: RunnerSettings) -> Trainer:
    """The trainer the job asks for (or the settings' override, for tests and demos)."""
    if settings.runner_trainer_factory:
        module_name, _, attr = settings.runner_trainer_factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise StepFailed(
                "runner",
                "trainer_unavailable",
                f"cannot load the trainer factory {settings.runner_trainer_factory}: {e}",
            ) from None
        trainer = factory(settings)
        return cast(Trainer, trainer)
    if spec.trainer == "builtin":
        # Imports nothing heavy: torch and friends load when training starts.
        from gpu_runner.trainers.builtin import BuiltinTrainer

        builtin: Trainer = BuiltinTrainer(settings)
        return builtin
    try:
        from gpu_runner.trainers.sd_scripts import SdScriptsTrainer
    except ImportError as e:
        raise StepFailed(
            "runner",
            "trainer_unavailable",
            f"the sd-scripts trainer cannot be loaded in this image: {e}",
        ) from None
    sd_scripts: Trainer = SdScriptsTrainer(settings)
    return sd_scripts


class Runner:
    """One run attempt on this machine. `run()` returns the process exit code."""

    def __init__(
        self,
        spec: JobSpec,
        settings: RunnerSettings,
        *,
        trainer: Trainer | None = None,
        redactor: Redactor | None = None,
        nvidia_smi: str = "nvidia-smi",
    ) -> None:
        self.spec = spec
        self.settings = settings
        self._trainer = trainer
        self._redact = redactor or Redactor()
        self._redact.add(spec.secrets())
        self._nvidia_smi = nvidia_smi
        self._gpu_found = False  # set by the machine check; without a GPU, trainers use fp32
        self._vram_mb: int | None = None  # the GPU's memory: trainers size fp8/block swap by it
        self.run_dir = settings.runner_workdir / spec.run_id
        self._stage: Stage = "runner"
        self._bytes_done: dict[str, int] = {}
        self._bytes_total: dict[str, int | None] = {}
        self._images_ready = asyncio.Event()
        self._training = False
        self._last_step: int | None = None
        self._prepared: PreparedTraining | None = None
        self._upload_retry: tuple[int, str] | None = None
        self._log_file: logging.Handler | None = None
        self._log_level_before = logging.NOTSET
        self._terminate_signal: int | None = None
        self._terminated = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=settings.runner_http_timeout_s)
        self._epochs: EpochUploader | None = None
        self.sender = EventSender(
            run_id=spec.run_id,
            attempt=spec.attempt,
            events_url=spec.events_url,
            secret=spec.webhook_secret,
            client=self._http,
            orphan_timeout_s=spec.limits.orphan_timeout_s,
            retry_initial_s=settings.runner_retry_initial_s,
            retry_max_s=settings.runner_retry_max_s,
        )

    # ---- control ---------------------------------------------------------------------------

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        """Ask the run to stop (SIGTERM/SIGINT): the trainer is stopped, run.failed is sent."""
        if self._terminate_signal is None:
            self._terminate_signal = signum
        self._terminated.set()

    async def run(self, *, handle_signals: bool = False) -> int:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.terminate, signum)
        self.sender.start()
        # An earlier attempt of this run on the same machine left its files: start clean.
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)
        self._log_file = self._start_log_file()
        heartbeats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        steps = asyncio.create_task(self._steps(), name="steps")
        gave_up = asyncio.create_task(self.sender.gave_up.wait())
        terminated = asyncio.create_task(self._terminated.wait())
        try:
            remaining = self.spec.limits.max_runtime_s - (time.monotonic() - started)
            done, _ = await asyncio.wait(
                {steps, gave_up, terminated},
                timeout=max(remaining, 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if gave_up in done:
                await self._halt(steps)
                if self.sender.give_up_reason == "closed":
                    return EXIT_RUN_CLOSED
                return EXIT_ORPHANED
            if steps in done:  # finished or failed on its own: report that, even if a signal came
                error = steps.exception()
                if error is None:
                    return await self._flush_and_exit(EXIT_OK)
                failure = self._as_step_failed(error)
                self._log_failure(failure)
                await self._upload_run_logs()
                self._send_failure(failure)
                return await self._flush_and_exit(EXIT_FAILED)
            if terminated in done:
                received = int(self._terminate_signal or signal.SIGTERM)
                log.warning("received %s: stopping the run", signal.Signals(received).name)
                stage = self._stage
                await self._halt(steps)
                failure = StepFailed(stage, "terminated", "the runner was terminated by its host")
                self._log_failure(failure)
                self._send_failure(failure)
                await self.sender.flush(TERMINATE_FLUSH_S)
                return 128 + received
            # None of them: the run hit its hard runtime cap.
            stage = self._stage
            await self._halt(steps)
            failure = StepFailed(
                stage,
                "max_runtime_exceeded",
                f"the run took longer than its limit of {self.spec.limits.max_runtime_s} s",
            )
            self._log_failure(failure)
            await self._upload_run_logs()
            self._send_failure(failure)
            return await self._flush_and_exit(EXIT_FAILED)
        finally:
            for task in (heartbeats, gave_up, terminated):
                task.cancel()
            await asyncio.gather(heartbeats, gave_up, terminated, return_exceptions=True)
            if self._epochs is not None:
                await self._epochs.close()
            self._stop_log_file()
            await self.sender.close()
            await self._http.aclose()
            if handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)

    async def _flush_and_exit(self, code: int) -> int:
        # The sender gives up by itself after the orphan timeout; the margin only guards that.
        flush = asyncio.create_task(self.sender.flush(self.spec.limits.orphan_timeout_s + 5))
        terminated = asyncio.create_task(self._terminated.wait())
        done, _ = await asyncio.wait({flush, terminated}, return_when=asyncio.FIRST_COMPLETED)
        for task in (flush, terminated):
            task.cancel()
        await asyncio.gather(flush, terminated, return_exceptions=True)
        if flush not in done:  # terminated while events were still waiting for the relay
            log.warning("terminated before every event was delivered")
            return 128 + int(self._terminate_signal or signal.SIGTERM)
        if self.sender.give_up_reason == "closed":
            return EXIT_RUN_CLOSED if code == EXIT_OK else code
        if self.sender.give_up_reason == "orphaned":
            return EXIT_ORPHANED
        return code

    async def _halt(self, steps: asyncio.Task[None]) -> None:
        """Stop the trainer (no process may survive) and the steps, whatever they were doing."""
        if self._training and self._trainer is not None:
            try:
                await asyncio.wait_for(self._trainer.stop(), STOP_TRAINER_TIMEOUT_S)
            except Exception:
                log.exception("stopping the trainer failed")
        steps.cancel()
        await asyncio.wait({steps}, timeout=10)
        if steps.done() and not steps.cancelled() and steps.exception() is not None:
            log.info("after stopping: %s", self._redact(str(steps.exception())))

    def _as_step_failed(self, error: BaseException) -> StepFailed:
        if isinstance(error, StepFailed):
            return error
        if isinstance(error, TrainerError):
            return StepFailed(error.stage, error.code, error.message, error.log_tail)
        log.error("unexpected error in stage %s", self._stage, exc_info=error)
        return StepFailed(self._stage, "internal_error", f"{type(error).__name__}: {error}")

    def _log_failure(self, failure: StepFailed) -> None:
        message = self._redact(failure.message)
        log.error("run failed in stage %s (%s): %s", failure.stage, failure.code, message)

    def _send_failure(self, failure: StepFailed) -> None:
        message = self._redact(failure.message)
        tail = [self._redact(line) for line in failure.log_tail[-LOG_TAIL_LINES:]]
        self._emit(
            "run.failed",
            RunFailedData(stage=failure.stage, code=failure.code, message=message, log_tail=tail),
        )

    def _emit(self, event_type: EventType, data: BaseModel) -> None:
        if event_type in _MILESTONES:
            log.info("%s %s", event_type, data.model_dump_json(exclude_none=True))
        self.sender.emit(event_type, data)

    async def _heartbeats(self) -> None:
        interval = self.spec.limits.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self._stage not in _HEARTBEAT_STAGES:
                continue
            self._emit("heartbeat", self._heartbeat())

    def _heartbeat(self) -> HeartbeatData:
        totals = list(self._bytes_total.values())
        downloading = self._stage in ("images", "model")
        retry = self._upload_retry if self._stage == "upload" else None
        return HeartbeatData(
            stage=self._stage,
            bytes_done=sum(self._bytes_done.values()) if downloading else None,
            bytes_total=(
                sum(t or 0 for t in totals)
                if downloading and totals and None not in totals
                else None
            ),
            step=self._last_step,
            retry=retry[0] if retry else None,
            error=retry[1] if retry else None,
        )

    # ---- the run's log, uploaded next to the model ----------------------------------------

    def _start_log_file(self) -> logging.Handler | None:
        """Copy every runner and trainer log line (redacted) to run_dir/run.log for upload."""
        if self.spec.log_upload is None:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / LOG_FILE_NAME, encoding="utf-8")
        handler.setFormatter(RedactingFormatter(self._redact))
        handler.setLevel(logging.INFO)
        logger = logging.getLogger("gpu_runner")
        logger.addHandler(handler)
        self._log_level_before = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the file keeps INFO lines whatever stderr shows
        return handler

    def _stop_log_file(self) -> None:
        handler, self._log_file = self._log_file, None
        if handler is not None:
            logger = logging.getLogger("gpu_runner")
            logger.removeHandler(handler)
            logger.setLevel(self._log_level_before)
            handler.close()

    async def _upload_run_logs(self) -> None:
        """The trainer's TensorBoard logs, then the run's log (which says how that went)."""
        await self._upload_tensorboard()
        await self._upload_log()

    async def _upload_tensorboard(self) -> None:
        """PUT a .tar.gz of the trainer's TensorBoard logs, if the job asks for them and the
        trainer wrote any; like the log, they never fail the run."""
        target, prepared = self.spec.tensorboard_upload, self._prepared
        if target is None or prepared is None or prepared.tensorboard_dir is None:
            return
        archive = self.run_dir / TENSORBOARD_ARCHIVE_NAME
        try:
            files = await asyncio.to_thread(pack_folder, prepared.tensorboard_dir, archive)
            size = archive.stat().st_size if files else 0
        except (OSError, tarfile.TarError) as e:
            log.warning("could not pack the TensorBoard logs: %s", self._redact(str(e)))
            return
        if not files:
            log.info("the trainer wrote no TensorBoard logs")
            return
        if size > target.max_bytes:
            log.warning(
                "not uploading the TensorBoard logs: %d bytes packed, over the limit of %d",
                size,
                target.max_bytes,
            )
            return
        try:
            await upload_file(
                self._http,
                target.url,
                archive,
                max_bytes=target.max_bytes,
                retry_initial_s=self.settings.runner_retry_initial_s,
                retry_max_s=self.settings.runner_retry_max_s,
                give_up_after_s=LOG_UPLOAD_PATIENCE_S,
            )
        except (UploadError, OSError) as e:
            log.warning("could not upload the TensorBoard logs: %s", self._redact(str(e)))
        else:
            log.info("uploaded the TensorBoard logs (%d files) to %s", files, target.key)

    async def _upload_log(self) -> None:
        """PUT the log so far; a log that cannot be uploaded never fails the run."""
        handler, target = self._log_file, self.spec.log_upload
        if handler is None or target is None:
            return
        handler.flush()
        path = self.run_dir / LOG_FILE_NAME
        limit = min(target.max_bytes, LOG_UPLOAD_MAX_BYTES)
        if path.stat().st_size > limit:
            path = await asyncio.to_thread(_log_end, path, limit)
        try:
            await upload_file(
                self._http,
                target.url,
                path,
                max_bytes=limit,
                retry_initial_s=self.settings.runner_retry_initial_s,
                retry_max_s=self.settings.runner_retry_max_s,
                give_up_after_s=LOG_UPLOAD_PATIENCE_S,
            )
        except (UploadError, OSError) as e:
            log.warning("could not upload the run's log: %s", self._redact(str(e)))
        else:
            log.info("uploaded the run's log to %s", target.key)

    # ---- the steps, in the seed's order ----------------------------------------------------

    async def _steps(self) -> None:
        if self._trainer is None:
            self._trainer = load_trainer(self.spec, self.settings)
        trainer = self._trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self._check_machine()
        self._stage = "images"
        fetched: list[Any] = await _all_or_none_of(
            [self._fetch_images(), self._fetch_model(), self._fetch_resume_state()]
        )
        dataset_dir, (model, components), resume = fetched
        self._stage = "files"
        uploader = self._start_epoch_uploads()
        inputs = TrainingInputs(
            run_dir=self.run_dir,
            dataset_dir=dataset_dir,
            model_path=model.path,
            family=self.spec.model.family,
            config=self.spec.training.for_family(self.spec.model.family),
            output_dir=self.run_dir / "output",
            secrets=self.spec.secrets(),
            cuda=self._gpu_found,
            components=components,
            variant=self.spec.model.variant,
            v_parameterization=self.spec.model.v_parameterization,
            vram_mb=self._vram_mb,
            samples=self.spec.samples,
            keep=self.spec.keep,
            resume=resume,
            on_epoch=uploader.report if uploader is not None else None,
        )
        inputs.output_dir.mkdir(parents=True, exist_ok=True)
        prepared = self._prepared = await asyncio.to_thread(trainer.prepare, inputs)
        self._emit(
            "files.ready",
            FilesReadyData(
                total_steps=prepared.total_steps,
                paths=prepared.paths,
                device=prepared.device,
                mixed_precision=prepared.mixed_precision,
            ),
        )
        result = await self._train(trainer, prepared)
        if uploader is not None:
            # The last epoch's files go up before the run says it trained.
            await uploader.finish(self.spec.limits.orphan_timeout_s)
        self._emit(
            "training.completed",
            TrainingCompletedData(epoch_losses=result.epoch_losses, best_epoch=result.best_epoch),
        )
        await self._upload(result)

    def _start_epoch_uploads(self) -> EpochUploader | None:
        if self.spec.epoch_uploads is None:
            return None
        self._epochs = EpochUploader(
            self.spec,
            self._http,
            self.sender,
            self.run_dir / "epochs",
            retry_initial_s=self.settings.runner_retry_initial_s,
            retry_max_s=self.settings.runner_retry_max_s,
            redact=self._redact,
        )
        self._epochs.start()
        return self._epochs

    async def _fetch_resume_state(self) -> ResumePoint | None:
        """An earlier attempt's last complete epoch: its training state, unpacked, and the
        LoRAs this host may keep without training them (sha256-checked like every download)."""
        source = self.spec.resume
        if source is None:
            return None
        folder = self.run_dir / "resume"
        loras = {epoch: folder / "loras" / f"{epoch:06d}.safetensors" for epoch in source.loras}
        files = [(source.state, folder / "state.tar", f"epoch {source.epoch}'s training state")]
        files += [
            (source.loras[epoch], path, f"epoch {epoch}'s LoRA")
            for epoch, path in sorted(loras.items())
        ]
        try:
            await _all_or_none_of(
                [
                    download(
                        DownloadSpec(
                            url=remote.url,
                            dest=dest,
                            what=what,
                            sha256=remote.sha256,
                            expected_bytes=remote.bytes,
                            max_bytes=remote.bytes,
                        ),
                        timeout_s=self.settings.runner_http_timeout_s,
                        retry_initial_s=self.settings.runner_retry_initial_s,
                        retry_max_s=self.settings.runner_retry_max_s,
                        on_progress=self._progress(what),
                    )
                    for remote, dest, what in files
                ]
            )
            state_dir = await asyncio.to_thread(
                unpack_state, folder / "state.tar", folder / "state"
            )
        except DownloadError as e:
            raise StepFailed("model", f"resume_{e.code}", e.message) from None
        except (OSError, tarfile.TarError) as e:
            raise StepFailed(
                "model", "resume_state_invalid", f"cannot unpack epoch {source.epoch}'s state: {e}"
            ) from None
        log.info(
            "resuming from epoch %d (saved by attempt %d, step %d)",
            source.epoch,
            source.attempt,
            source.step,
        )
        return ResumePoint(
            epoch=source.epoch,
            step=source.step,
            state_dir=state_dir,
            epoch_losses=list(source.epoch_losses),
            loras=loras,
        )

    async def _check_machine(self) -> None:
        self._stage = "gpu"
        gpu = await probe_gpu(self._nvidia_smi)
        self._gpu_found = gpu is not None
        self._vram_mb = gpu.vram_mb if gpu else None
        free = free_disk_bytes(self.run_dir)
        if gpu is None and self.settings.runner_require_gpu:
            raise StepFailed(
                "gpu",
                "no_gpu",
                "no NVIDIA GPU found: nvidia-smi is missing or failed on this machine",
            )
        model_files = [self.spec.model.bytes, *(c.bytes for c in self.spec.model.components)]
        needed = required_disk_bytes(
            sum(size or 0 for size in model_files),
            self.spec.images.bytes,
            self.settings.runner_disk_margin_bytes,
        )
        if free < needed:
            raise StepFailed(
                "gpu",
                "disk_full",
                f"not enough free disk: {free} bytes free in {self.settings.runner_workdir}, "
                f"{needed} needed for the model, the images (zipped and unzipped) and checkpoints",
            )
        self._emit(
            "gpu.ready",
            GpuReadyData(
                gpu_name=gpu.name if gpu else None,
                vram_mb=gpu.vram_mb if gpu else None,
                driver=gpu.driver if gpu else None,
                free_disk_bytes=free,
            ),
        )

    def _progress(self, name: str) -> Any:
        def on_progress(done: int, total: int | None) -> None:
            self._bytes_done[name] = done
            self._bytes_total[name] = total

        self._bytes_done[name] = 0
        self._bytes_total[name] = None
        return on_progress

    def _model_budget(self, declared: int | None = None) -> int:
        """The most bytes a model file's download may write: declared size, else what the disk
        allows."""
        if declared is not None:
            return declared
        free = free_disk_bytes(self.run_dir)
        reserved = self.spec.images.bytes * 2 + self.settings.runner_disk_margin_bytes
        return max(free - reserved, 0)

    async def _fetch_images(self) -> Path:
        spec = self.spec.images
        zip_path = self.run_dir / "images.zip"
        dataset_dir = self.run_dir / "dataset"
        try:
            await download(
                DownloadSpec(
                    url=spec.url,
                    dest=zip_path,
                    what="images zip",
                    sha256=spec.sha256,
                    expected_bytes=spec.bytes,
                    max_bytes=spec.bytes,
                ),
                timeout_s=self.settings.runner_http_timeout_s,
                retry_initial_s=self.settings.runner_retry_initial_s,
                retry_max_s=self.settings.runner_retry_max_s,
                on_progress=self._progress("images"),
            )
            extracted = await asyncio.to_thread(
                safe_extract,
                zip_path,
                dataset_dir,
                max_bytes=self.settings.runner_max_unzipped_bytes,
            )
        except DownloadError as e:
            raise StepFailed("images", e.code, e.message) from None
        except ArchiveError as e:
            raise StepFailed("images", "unsafe_archive", str(e)) from None
        zip_path.unlink(missing_ok=True)  # the unzipped copy is all training needs
        self._emit(
            "images.ready",
            ImagesReadyData(image_count=extracted.image_count, bytes=extracted.bytes),
        )
        self._images_ready.set()
        if self._stage == "images":
            self._stage = "model"
        return dataset_dir

    async def _fetch_model(self) -> tuple[DownloadResult, dict[ComponentRole, Path]]:
        """The checkpoint and the family's component files, all at once; model.ready when all
        of them are on disk."""
        spec = self.spec.model
        downloads = [
            self._download_model_file(
                spec.url,
                spec.filename,
                "model",
                spec.sha256,
                spec.bytes,
                needs_civitai_key=spec.needs_civitai_key,
                needs_hf_token=spec.needs_hf_token,
            ),
            *(self._fetch_component(component) for component in spec.components),
        ]
        results = await _all_or_none_of(downloads)
        result = results[0]
        components = {
            component.role: file.path
            for component, file in zip(spec.components, results[1:], strict=True)
        }
        # model.ready follows images.ready, so the events keep the seed's order.
        await self._images_ready.wait()
        self._emit(
            "model.ready",
            ModelReadyData(
                filename=spec.filename, bytes=result.bytes, sha256_verified=result.sha256_verified
            ),
        )
        return result, components

    async def _fetch_component(self, component: ModelComponent) -> DownloadResult:
        return await self._download_model_file(
            component.url,
            # Its own folder: a component may share the checkpoint's file name.
            f"{component.role}/{component.filename}",
            f"{component.role} file",
            component.sha256,
            component.bytes,
            needs_civitai_key=component.needs_civitai_key,
            needs_hf_token=component.needs_hf_token,
        )

    async def _download_model_file(
        self,
        url: str,
        filename: str,
        what: str,
        sha256: str | None,
        size: int | None,
        *,
        needs_civitai_key: bool,
        needs_hf_token: bool,
    ) -> DownloadResult:
        """One file of the model (resumable, sha256-checked), with the key its host needs."""
        if needs_civitai_key and not self.spec.civitai_api_key:
            raise StepFailed(
                "model",
                "civitai_unauthorized",
                f"Civitai needs an API key to download the {what}, and the job has none",
            )
        if needs_hf_token and not self.spec.hf_token:
            raise StepFailed(
                "model",
                "hf_unauthorized",
                f"Hugging Face needs a token to download the {what} (a gated repository), and "
                "the job has none: set hf_token",
            )
        bearer = (
            self.spec.civitai_api_key
            if needs_civitai_key
            else self.spec.hf_token
            if needs_hf_token
            else None
        )
        try:
            return await download(
                DownloadSpec(
                    url=url,
                    dest=self.run_dir / "model" / filename,
                    what=what,
                    sha256=sha256,
                    expected_bytes=size,
                    max_bytes=self._model_budget(size),
                    bearer=bearer,
                    civitai=needs_civitai_key,
                ),
                timeout_s=self.settings.runner_http_timeout_s,
                retry_initial_s=self.settings.runner_retry_initial_s,
                retry_max_s=self.settings.runner_retry_max_s,
                on_progress=self._progress(what),
            )
        except DownloadError as e:
            if needs_hf_token and e.code == "download_forbidden":
                raise StepFailed(
                    "model",
                    "hf_forbidden",
                    f"Hugging Face refused the {what} download ({e.message.split(';')[0]}): the "
                    "token must be valid, with read access, and its account must have accepted "
                    "the repository's license",
                ) from None
            raise StepFailed("model", e.code, e.message) from None

    async def _train(self, trainer: Trainer, prepared: PreparedTraining) -> TrainingResult:
        self._stage = "training"

        interval_s = self.settings.runner_progress_interval_s
        last: tuple[float, int | None] | None = None  # (monotonic time, epoch) of the last sent

        def on_progress(progress: TrainingProgressData) -> None:
            # Every event becomes a signal in the run's history: send a few, never every step.
            nonlocal last
            now = time.monotonic()
            self._last_step = progress.step
            if (
                last is None
                or progress.epoch != last[1]
                or progress.step >= progress.total
                or now - last[0] >= interval_s
            ):
                last = (now, progress.epoch)
                self._emit("training.progress", progress)

        self._training = True
        try:
            return await trainer.train(prepared, on_progress)
        finally:
            self._training = False

    async def _upload(self, result: TrainingResult) -> None:
        self._stage = "upload"
        target = self.spec.upload

        def on_retry(attempt: int, problem: str) -> None:
            self._upload_retry = (attempt, self._redact(problem)[:500])
            self._emit("heartbeat", self._heartbeat())

        try:
            # As patient as event delivery: the checkpoints stay on disk until S3 takes one.
            uploaded = await upload_file(
                self._http,
                target.url,
                result.checkpoint,
                max_bytes=target.max_bytes,
                retry_initial_s=self.settings.runner_retry_initial_s,
                retry_max_s=self.settings.runner_retry_max_s,
                give_up_after_s=self.spec.limits.orphan_timeout_s,
                on_retry=on_retry,
            )
        except UploadError as e:
            raise StepFailed("upload", e.code, e.message) from None
        except FileNotFoundError:
            raise StepFailed(
                "upload",
                "checkpoint_missing",
                f"the trainer reported {result.checkpoint.name} as best, but the file is missing",
            ) from None
        log.info("uploaded %s (%d bytes) to %s", result.checkpoint.name, uploaded.bytes, target.key)
        # Before model.uploaded: once the upload is verified, the GPU may be taken away.
        await self._upload_run_logs()
        self._emit(
            "model.uploaded",
            ModelUploadedData(
                key=target.key,
                bytes=uploaded.bytes,
                sha256=uploaded.sha256,
                epoch=result.best_epoch,
                loss=result.loss,
            ),
        )


def _log_end(path: Path, limit: int) -> Path:
    """A copy of the last `limit` bytes of the log (from a line start), saying what was cut."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(size - limit + 200)
        tail = f.read()
    tail = tail[tail.find(b"\n") + 1 :]
    end = path.with_name(f"{path.stem}-end{path.suffix}")
    note = f"[the first {size - len(tail)} bytes of this log were cut to fit the upload]\n"
    end.write_bytes(note.encode() + tail)
    return end


async def _all_or_none_of(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all at once; when one fails (or we are cancelled) the others are cancelled too."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# Process entry point
# --------------------------------------------------------------------------------------------


async def _main(settings: RunnerSettings, redactor: Redactor) -> int:
    try:
        spec = await load_job(settings)
    except JobIntakeError as e:
        log.error("%s", e)
        return EXIT_BAD_JOB
    redactor.add(spec.secrets())
    log.info(
        "run %s attempt %d: trainer %s, model %s (%s)",
        spec.run_id,
        spec.attempt,
        settings.runner_trainer_factory or spec.trainer,
        spec.model.filename,
        spec.model.family,
    )
    started = time.monotonic()
    code = await Runner(spec, settings, redactor=redactor).run(handle_signals=True)
    # Giving up on the run also gives the instance up (on Vast; locally this does nothing).
    reasons: dict[int, LeaveReason] = {EXIT_RUN_CLOSED: "closed", EXIT_ORPHANED: "orphaned"}
    reason = reasons.get(code)
    if reason is None and time.monotonic() - started >= spec.limits.max_runtime_s:
        reason = "max_runtime"
    if reason is not None:
        await destroy_own_instance(
            settings.runner_vast_api_url, reason, timeout_s=settings.runner_http_timeout_s
        )
    return code


def main() -> NoReturn:
    """`python -m gpu_runner`: run the job at LORA_JOB_URL and exit with the outcome's code."""
    redactor = Redactor()
    configure_logging(redactor)
    try:
        settings = RunnerSettings()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        log.error("invalid LORA_* settings: %s", problems)
        sys.exit(EXIT_BAD_JOB)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_main(settings, redactor)))
    sys.exit(130)
