"""TrainingWorkflow's first version, kept so runs started before the lifecycle-v2 patch finish
on the code they started with (and their recorded histories replay).

Frozen: never change what this module does. Remove it, and the `workflow.patched` branch that
selects it, once no run started by it can be open (see README, "Shipping workflow changes").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.civitai import ModelActivities, ResolvedModel, ResolveModelInput
    from activities.gpu import AllocateGpuInput, GpuActivities, InstanceRef, RunRef
    from activities.notify import UserWebhookInput
    from activities.providers.base import Instance
    from activities.storage import (
        DatasetInput,
        ImagesZip,
        JobSpecInput,
        StorageActivities,
        VerifiedUpload,
        VerifyUploadInput,
    )
    from gpu_runner.protocol import (
        GpuReadyData,
        ModelUploadedData,
        RunFailedData,
        RunnerEvent,
        RunnerLimits,
        TrainingCompletedData,
        TrainingProgressData,
    )

    from .models import (
        GpuInfo,
        ModelResult,
        Progress,
        RunError,
        RunStatus,
        RunStatusName,
        S3Location,
        StatusChange,
        TrainingRequest,
        UserEventType,
    )
    from .notify import UserWebhookWorkflow
    from .status import Fact, derive_status, statuses_between

LORA_STATUS = SearchAttributeKey.for_keyword("LoraTrainingStatus")

# Named retry policies: most side effects retry until the status deadline calls a stall.
RETRY_UNTIL_DEADLINE = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
INSTANCE_POLL_INTERVAL = timedelta(seconds=30)
PROGRESS_WEBHOOK_MIN_INTERVAL = timedelta(seconds=30)
PROGRESS_WEBHOOK_MIN_PERCENT = 5.0

_TERMINAL_WEBHOOKS: dict[RunStatusName, UserEventType] = {
    RunStatusName.COMPLETED: "training.completed",
    RunStatusName.FAILED: "training.failed",
    RunStatusName.STALLED: "training.stalled",
    RunStatusName.CANCELLED: "training.cancelled",
}

T = TypeVar("T")


class _Stalled(Exception):
    """A status outlived its deadline."""


class _RunnerFailed(Exception):
    def __init__(self, failure: RunFailedData) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _ReplaceGpu(Exception):
    """The GPU never became ready: destroy it and try another offer."""


class LegacyTrainingRun:
    """The whole v1 run; TrainingWorkflow delegates its run and handlers here."""

    def __init__(self, request: TrainingRequest) -> None:
        self._request = request
        self._run_id = workflow.info().workflow_id
        self._facts: set[Fact] = set()
        self._attempt = 0
        self._seen_events: set[tuple[int, int]] = set()
        self._last_progress_seq = 0
        self._events_received = 0
        self._last_event_at = workflow.now()
        self._runner_failure: RunFailedData | None = None
        self._uploaded: ModelUploadedData | None = None
        self._instance: Instance | None = None
        self._gpu_spans: list[tuple[float, datetime, datetime | None]] = []
        self._output: S3Location | None = None
        self._download_url: str | None = None
        self._webhooks: list[tuple[UserEventType, datetime, dict[str, Any]]] = []
        self._webhooks_sent = 0
        self._last_progress_webhook: tuple[datetime, float] | None = None
        self._status = RunStatus(
            run_id=self._run_id,
            status=RunStatusName.PENDING,
            history=[StatusChange(status=RunStatusName.PENDING, at=workflow.now())],
        )

    # ----------------------------------------------------------------------------------------
    # The run
    # ----------------------------------------------------------------------------------------

    async def run(self, request: TrainingRequest) -> RunStatus:
        """Validate, zip, rent a GPU, follow it to a verified model; give the GPU back always."""
        notifier = asyncio.create_task(self._deliver_webhooks())
        self._announce(RunStatusName.PENDING)
        cancelled = False
        try:
            await self._train()
        except asyncio.CancelledError:
            cancelled = True
            self._end(RunStatusName.CANCELLED, RunError(code="cancelled", message="cancelled"))
        except Exception as exc:
            if isinstance(exc, workflow.NondeterminismError):
                raise
            self._end_with(exc)
        else:
            self._end(RunStatusName.COMPLETED)
        # Compensation runs on every path above: nothing labelled for this run survives it.
        await self._release_gpus()
        await workflow.wait_condition(lambda: self._webhooks_sent == len(self._webhooks))
        notifier.cancel()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._finish(cancelled)

    async def _train(self) -> None:
        images_zip, model = await self._within(
            self._request.deadlines.pending_s, self._prepare_inputs(), "preparing the run"
        )
        last_reason = ""
        for attempt in range(1, self._request.max_gpu_attempts + 1):
            await self._rent_gpu(attempt, images_zip, model)
            try:
                await self._wait_for_gpu_ready()
            except _ReplaceGpu as reason:
                workflow.logger.warning("replacing GPU (attempt %d): %s", attempt, reason)
                last_reason = str(reason)
                await self._give_back_current_gpu()
                continue
            await self._follow_runner_until_uploaded()
            await self._verify_upload()
            return
        raise _Stalled(
            f"no GPU became ready after {self._request.max_gpu_attempts} attempts "
            f"(last: {last_reason})"
        )

    async def _prepare_inputs(self) -> tuple[ImagesZip, ResolvedModel]:
        """Fail fast: a bad dataset or an unknown model never costs a GPU."""
        dataset = DatasetInput(run_id=self._run_id, images=self._request.images)
        _, model = await asyncio.gather(
            workflow.execute_activity_method(
                StorageActivities.validate_images,
                dataset,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=RETRY_UNTIL_DEADLINE,
            ),
            workflow.execute_activity_method(
                ModelActivities.resolve_model,
                ResolveModelInput(
                    run_id=self._run_id,
                    model=self._request.model,
                    civitai_api_key=self._request.civitai_api_key,
                ),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RETRY_UNTIL_DEADLINE,
            ),
        )
        images_zip = await workflow.execute_activity_method(
            StorageActivities.build_images_zip,
            dataset,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RETRY_UNTIL_DEADLINE,
        )
        return images_zip, model

    async def _rent_gpu(self, attempt: int, images_zip: ImagesZip, model: ResolvedModel) -> None:
        self._attempt = attempt
        self._status.attempt = attempt
        self._runner_failure = None
        request = self._request
        deadlines = request.deadlines

        async def rent() -> Instance:
            job = await workflow.execute_activity_method(
                StorageActivities.write_job_spec,
                JobSpecInput(
                    run_id=self._run_id,
                    attempt=attempt,
                    images_zip=images_zip,
                    model=model,
                    training=request.training,
                    trainer=request.trainer,
                    output=request.output,
                    civitai_api_key=request.civitai_api_key,
                    limits=RunnerLimits(
                        max_runtime_s=deadlines.pending_images_s
                        + deadlines.pending_model_s
                        + deadlines.training_total_s,
                    ),
                ),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RETRY_UNTIL_DEADLINE,
            )
            self._output = job.output
            return await workflow.execute_activity_method(
                GpuActivities.allocate_gpu,
                AllocateGpuInput(
                    run_id=self._run_id,
                    attempt=attempt,
                    job_url=job.job_url,
                    requirements=request.gpu,
                ),
                start_to_close_timeout=timedelta(minutes=3),
                retry_policy=RETRY_UNTIL_DEADLINE,
            )

        instance = await self._within(deadlines.pending_s, rent(), "renting a GPU")
        self._instance = instance
        self._gpu_spans.append((instance.dollars_per_hour or 0.0, workflow.now(), None))
        self._status.gpu = GpuInfo(
            provider=instance.provider,
            instance_id=instance.instance_id,
            gpu_name=instance.gpu_name,
            dollars_per_hour=instance.dollars_per_hour,
            started_at=workflow.now(),
        )
        self._learn(Fact.GPU_CREATED)

    async def _wait_for_gpu_ready(self) -> None:
        """pendingGpu: wait for gpu.ready, watching that the instance is still alive."""
        instance = self._instance
        assert instance is not None
        deadline = workflow.now() + timedelta(seconds=self._request.deadlines.pending_gpu_s)
        while Fact.GPU_READY not in self._facts:
            if self._runner_failure is not None:
                raise _ReplaceGpu(f"the runner failed on this host: {self._runner_failure.message}")
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0):
                raise _ReplaceGpu(f"GPU not ready within {self._request.deadlines.pending_gpu_s} s")
            if await self._wait(
                lambda: Fact.GPU_READY in self._facts or self._runner_failure is not None,
                min(remaining, INSTANCE_POLL_INTERVAL),
            ):
                continue
            current = await workflow.execute_activity_method(
                GpuActivities.get_gpu_instance,
                self._instance_ref(instance),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RETRY_UNTIL_DEADLINE,
            )
            if current is None or current.state in ("exited", "gone"):
                state = "gone" if current is None else current.state
                detail = f": {current.message}" if current and current.message else ""
                raise _ReplaceGpu(f"instance {instance.instance_id} {state}{detail}")

    async def _follow_runner_until_uploaded(self) -> None:
        """pendingImages .. training: each status must end before its deadline."""
        deadlines = self._request.deadlines
        while Fact.MODEL_UPLOADED not in self._facts:
            self._raise_if_runner_failed()
            status = self._status.status
            seen = self._events_received
            if status == RunStatusName.TRAINING:
                started = self._entered_at(status)
                idle_until = self._last_event_at + timedelta(seconds=deadlines.training_idle_s)
                total_until = started + timedelta(seconds=deadlines.training_total_s)
                if workflow.now() >= total_until:
                    raise _Stalled(f"training did not finish within {deadlines.training_total_s} s")
                if workflow.now() >= idle_until:
                    raise _Stalled(f"no event from the GPU for {deadlines.training_idle_s} s")
                until = min(idle_until, total_until)
                await self._wait(lambda: self._events_received != seen, until - workflow.now())  # noqa: B023
                continue
            limit_s = {
                RunStatusName.PENDING_IMAGES: deadlines.pending_images_s,
                RunStatusName.PENDING_MODEL: deadlines.pending_model_s,
            }[status]
            until = self._entered_at(status) + timedelta(seconds=limit_s)
            if workflow.now() >= until:
                raise _Stalled(f"{status.value} lasted longer than {limit_s} s")
            await self._wait(
                lambda: self._status.status != status or self._runner_failure is not None,  # noqa: B023
                until - workflow.now(),
            )
        self._raise_if_runner_failed()

    async def _verify_upload(self) -> None:
        uploaded, output = self._uploaded, self._output
        assert uploaded is not None and output is not None
        verified: VerifiedUpload = await workflow.execute_activity_method(
            StorageActivities.verify_upload,
            VerifyUploadInput(
                run_id=self._run_id,
                output=output,
                bytes=uploaded.bytes,
                sha256=uploaded.sha256,
            ),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RETRY_FOREVER,
        )
        self._status.result = ModelResult(
            location=verified.location,
            bytes=verified.bytes,
            sha256=verified.sha256,
            epoch=uploaded.epoch,
            loss=uploaded.loss,
        )
        self._download_url = verified.download_url

    # ----------------------------------------------------------------------------------------
    # GPU lifecycle
    # ----------------------------------------------------------------------------------------

    async def _give_back_current_gpu(self) -> None:
        instance = self._instance
        if instance is None:
            return
        await workflow.execute_activity_method(
            GpuActivities.deallocate_gpu,
            self._instance_ref(instance),
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RETRY_FOREVER,
        )
        self._close_gpu_span()
        self._instance = None
        self._facts.discard(Fact.GPU_CREATED)

    async def _release_gpus(self) -> None:
        """Destroy every instance labelled for this run, including one whose rental raised."""
        await workflow.execute_activity_method(
            GpuActivities.release_run_gpus,
            RunRef(run_id=self._run_id),
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RETRY_FOREVER,
        )
        self._close_gpu_span()
        self._instance = None
        self._bump()

    def _close_gpu_span(self) -> None:
        if self._gpu_spans and self._gpu_spans[-1][2] is None:
            rate, start, _ = self._gpu_spans[-1]
            self._gpu_spans[-1] = (rate, start, workflow.now())

    def _instance_ref(self, instance: Instance) -> InstanceRef:
        return InstanceRef(
            run_id=self._run_id, provider=instance.provider, instance_id=instance.instance_id
        )

    # ----------------------------------------------------------------------------------------
    # Runner events
    # ----------------------------------------------------------------------------------------

    def runner_event(self, event: RunnerEvent) -> None:
        """Sent only by the relay, after it verified the runner's signature."""
        key = (event.attempt, event.seq)
        if (
            event.run_id != self._run_id
            or event.attempt != self._attempt
            or key in self._seen_events
            or self._status.status.terminal
        ):
            return
        self._seen_events.add(key)
        self._events_received += 1
        self._last_event_at = workflow.now()
        self._apply(event)
        self._bump()

    def _apply(self, event: RunnerEvent) -> None:
        data = event.parsed()
        if isinstance(data, GpuReadyData):
            if self._status.gpu is not None and data.gpu_name:
                self._status.gpu.gpu_name = data.gpu_name
            self._learn(Fact.GPU_READY)
        elif isinstance(data, TrainingProgressData):
            if event.seq > self._last_progress_seq:
                self._last_progress_seq = event.seq
                self._record_progress(data)
        elif isinstance(data, TrainingCompletedData):
            self._status.epoch_losses = data.epoch_losses
            self._status.best_checkpoint = data.best_epoch
            self._learn(Fact.TRAINING_COMPLETED)
        elif isinstance(data, ModelUploadedData):
            self._uploaded = data
            self._learn(Fact.MODEL_UPLOADED)
        elif isinstance(data, RunFailedData):
            self._runner_failure = data
        elif event.type in (Fact.IMAGES_READY, Fact.MODEL_READY, Fact.FILES_READY):
            self._learn(Fact(event.type))

    def _record_progress(self, data: TrainingProgressData) -> None:
        percent = round(100.0 * data.step / data.total, 1) if data.total else 0.0
        self._status.progress = Progress(
            step=data.step,
            total=data.total,
            epoch=data.epoch,
            total_epochs=data.total_epochs,
            percent=percent,
            loss=data.loss,
            it_per_s=data.it_per_s,
            eta_s=data.eta_s,
        )
        last = self._last_progress_webhook
        now = workflow.now()
        if last is None or (
            now - last[0] >= PROGRESS_WEBHOOK_MIN_INTERVAL
            and percent - last[1] >= PROGRESS_WEBHOOK_MIN_PERCENT
        ):
            self._last_progress_webhook = (now, percent)
            self._queue_webhook("training.progress", self._status.progress.model_dump(mode="json"))

    def _raise_if_runner_failed(self) -> None:
        if self._runner_failure is not None:
            raise _RunnerFailed(self._runner_failure)

    # ----------------------------------------------------------------------------------------
    # Status
    # ----------------------------------------------------------------------------------------

    def status(self) -> RunStatus:
        return self._snapshot()

    async def wait_for_change(self, after_version: int) -> RunStatus:
        """Long poll: answers as soon as the status version passes `after_version`."""
        await workflow.wait_condition(lambda: self._status.version > after_version)
        return self._snapshot()

    def validate_wait_for_change(self, after_version: int) -> None:
        if after_version < 0:
            raise ValueError("after_version must be >= 0")

    def _snapshot(self) -> RunStatus:
        return self._status.model_copy(update={"cost_usd": self._cost_usd()}, deep=True)

    def _cost_usd(self) -> float:
        now = workflow.now()
        hours = sum(
            rate * ((end or now) - start).total_seconds() / 3600
            for rate, start, end in self._gpu_spans
        )
        return round(hours, 4)

    def _learn(self, fact: Fact) -> None:
        self._facts.add(fact)
        target = derive_status(self._facts)
        current = self._status.status
        if target == current or current.terminal:
            return
        for status in statuses_between(current, target):
            self._enter(status)

    def _enter(self, status: RunStatusName) -> None:
        self._status.status = status
        self._status.history.append(StatusChange(status=status, at=workflow.now()))
        self._announce(status)

    def _announce(self, status: RunStatusName) -> None:
        workflow.upsert_search_attributes([LORA_STATUS.value_set(status.value)])
        self._bump()
        self._queue_webhook("training.status", {"status": status.value})

    def _entered_at(self, status: RunStatusName) -> datetime:
        return next(c.at for c in reversed(self._status.history) if c.status == status)

    def _bump(self) -> None:
        self._status.version += 1

    def _end(self, status: RunStatusName, error: RunError | None = None) -> None:
        self._status.error = error
        self._enter(status)
        event_type = _TERMINAL_WEBHOOKS[status]
        payload: dict[str, Any] = {"status": status.value}
        if error is not None:
            payload["error"] = error.model_dump(mode="json")
        if self._status.result is not None:
            payload["model"] = self._status.result.model_dump(mode="json")
            payload["download_url"] = self._download_url
        self._queue_webhook(event_type, payload)

    def _end_with(self, exc: Exception) -> None:
        stage = self._status.status.value
        if isinstance(exc, _Stalled):
            self._end(
                RunStatusName.STALLED, RunError(code="stalled", message=str(exc), stage=stage)
            )
        elif isinstance(exc, _RunnerFailed):
            failure = exc.failure
            self._end(
                RunStatusName.FAILED,
                RunError(
                    code=failure.code,
                    message=failure.message,
                    stage=failure.stage,
                    log_tail=failure.log_tail,
                ),
            )
        elif isinstance(exc, ActivityError) and isinstance(exc.cause, ApplicationError):
            cause = exc.cause
            self._end(
                RunStatusName.FAILED,
                RunError(code=cause.type or "error", message=cause.message, stage=stage),
            )
        else:
            workflow.logger.exception("unexpected error in run %s", self._run_id)
            self._end(
                RunStatusName.FAILED,
                RunError(
                    code="internal_error", message=f"{type(exc).__name__}: {exc}", stage=stage
                ),
            )

    def _finish(self, cancelled: bool) -> RunStatus:
        if cancelled:
            raise asyncio.CancelledError()
        status = self._status.status
        if status == RunStatusName.COMPLETED:
            return self._snapshot()
        error = self._status.error
        assert error is not None
        raise ApplicationError(
            f"run {status.value}: {error.message}",
            error.model_dump(mode="json"),
            type=f"Run{status.value.capitalize()}",
            non_retryable=True,
        )

    # ----------------------------------------------------------------------------------------
    # User webhooks
    # ----------------------------------------------------------------------------------------

    def _queue_webhook(self, event_type: UserEventType, data: dict[str, Any]) -> None:
        webhook = self._request.webhook
        if webhook is None or not webhook.wants(event_type):
            return
        self._webhooks.append(
            (event_type, workflow.now(), {**data, "version": self._status.version})
        )

    async def _deliver_webhooks(self) -> None:
        """Starts one abandoned child per webhook, in order; never waits for delivery."""
        webhook = self._request.webhook
        while webhook is not None:
            await workflow.wait_condition(lambda: self._webhooks_sent < len(self._webhooks))
            event_type, occurred_at, data = self._webhooks[self._webhooks_sent]
            number = self._webhooks_sent + 1
            await workflow.start_child_workflow(
                UserWebhookWorkflow.run,
                UserWebhookInput(
                    run_id=self._run_id,
                    url=webhook.url,
                    secret=webhook.secret,
                    msg_id=f"{self._run_id}:{number}",
                    event_type=event_type,
                    occurred_at=occurred_at,
                    payload=data,
                ),
                id=f"{self._run_id}/webhook/{number}",
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
            self._webhooks_sent = number

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    @staticmethod
    async def _wait(condition: Callable[[], bool], within: timedelta) -> bool:
        """True when `condition` held within the time given, False when the time ran out."""
        try:
            await workflow.wait_condition(condition, timeout=max(within, timedelta(0)))
        except TimeoutError:
            return False
        return True

    async def _within(self, seconds: int, work: Awaitable[T], what: str) -> T:
        """Await `work`, or cancel it and stall the run when it takes longer than `seconds`."""
        task = asyncio.ensure_future(work)
        if not await self._wait(task.done, timedelta(seconds=seconds)):
            task.cancel()
            # A cancelled activity ends as ActivityError, not CancelledError: both mean "gave up".
            with contextlib.suppress(asyncio.CancelledError, ActivityError):
                await task
            self._raise_stalled(f"{what} took longer than {seconds} s")
        return task.result()

    @staticmethod
    def _raise_stalled(message: str) -> NoReturn:
        raise _Stalled(message)
