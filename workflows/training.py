"""TrainingWorkflow: owns one training run from request to trained model, or to a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)
from temporalio.exceptions import TimeoutError as ActivityTimeoutError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.civitai import ModelActivities, ResolveModelInput
    from activities.fleet import HOST_DOWN_SIGNAL, HostDown
    from activities.gpu import AllocateGpuInput, GpuActivities, InstanceRef, RunRef
    from activities.gpu_requirements import effective_requirements
    from activities.providers.base import Instance
    from activities.relay import RelayActivities
    from activities.storage import (
        DatasetInput,
        ImagesZip,
        JobSpecInput,
        JobSpecRef,
        RunKeyInput,
        StorageActivities,
        VerifiedUpload,
        VerifyUploadInput,
    )
    from gpu_runner.protocol import (
        EpochSavedData,
        GpuReadyData,
        HeartbeatData,
        ModelUploadedData,
        RunFailedData,
        RunnerEvent,
        RunnerLimits,
        TrainingCompletedData,
        TrainingProgressData,
    )

    from .deadlines import Deadline, status_deadline
    from .models import (
        GpuInfo,
        ModelResult,
        Progress,
        RelayedEvent,
        RunError,
        RunStatus,
        RunStatusName,
        SavedEpochInfo,
        StatusChange,
        TrainingRequest,
        UserEventType,
    )
    from .state import SEEN_WINDOW, ContinuedRun, GpuSpan, PreparedInputs, RunState
    from .status import Fact, derive_status, statuses_between
    from .training_v1 import LegacyTrainingRun
    from .webhooks import UserWebhooks

LORA_STATUS = SearchAttributeKey.for_keyword("LoraTrainingStatus")
# Runs started before this patch finish on LegacyTrainingRun (README: shipping workflow changes).
LIFECYCLE_V2 = "lifecycle-v2"
# A GPU that misses its boot deadline is named with the host's own reason (asks the provider).
HOST_REASON_AT_BOOT_DEADLINE = "host-reason-at-boot-deadline"
# The zip checks every file as it reads it: no separate validation pass over the dataset; the
# zip runs beside the model's resolution, so a bad dataset still fails before any GPU.
ZIP_CHECKS_DATASET = "zip-checks-dataset"
# A cancel during the hand-over to a fresh execution still cleans up, and one that arrives after
# the run reached its outcome is recorded without changing it. Asked only when such a cancel
# comes, so runs that never meet one record no marker.
CANCEL_ANYWHERE = "cancel-anywhere"
# A run is its id plus its first execution: GPU labels, job URLs and runner secrets name both, so
# a run that reuses an id never adopts the GPU, or accepts the events, of an earlier run.
RUN_IDENTITY = "run-identity"
# Faults end right: a trainer alive without steps is a lost host (replaced while attempts
# remain), and a deadline that passes while our own relay is down waits for the relay.
FAULTS_END_RIGHT = "faults-end-right"
# Cost edges: the budget is checked before each rental, the GPU is given back before the upload
# is verified (nothing is billed while S3 is checked), billing counts from the host's creation,
# and a destroy that does not converge within DESTROY_LIMIT is reported instead of retried
# forever in the run (the reaper keeps at it).
COST_EDGES = "cost-edges"
# The main loop's wake-up timer stands until it fires: an event that wakes the loop costs one
# workflow task instead of a cancelled timer and a new one, and no timer is ever cancelled in
# the instant it fires (the time-skipping test server rejects that cancel and stops the run).
STANDING_ALARM = "standing-alarm"
# The model's family sizes the GPU: its VRAM and disk needs (with the family's settings and the
# files beside the checkpoint) raise the request's minimums before any offer is searched.
FAMILY_SIZED_GPU = "family-sized-gpu"
# Every epoch is durable: the runner uploads each one (LoRA, samples, training state) as it
# ends and reports epoch.saved; the run lists them, and a replacement GPU resumes from the last
# complete one instead of training from the start.
DURABLE_EPOCHS = "durable-epochs"
# The fleet watch (one provider listing per interval for all runs) tells a run when its host
# exited or went; the run asks the provider itself only then, and every INSTANCE_BACKSTOP in
# case the watch is down, instead of every INSTANCE_CHECK_INTERVAL.
FLEET_WATCH = "fleet-watch"

# Named retry policies: side effects retry until the status deadline calls a stall; giving a
# GPU back never gives up.
RETRY_UNTIL_DEADLINE = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
# A provider that does not answer one instance check is asked again at the next one.
INSTANCE_CHECK_RETRY = RetryPolicy(maximum_attempts=3)
# How often the provider is asked whether the instance still lives, in every status: a dead
# host is replaced within this (DESIGN.md: under 30 s from death to the next allocation).
INSTANCE_CHECK_INTERVAL = timedelta(seconds=20)
# With the fleet watch: the run looks itself once soon after it rents (a host gone before
# the watch's first listing of it is not missed by the watch), then every INSTANCE_BACKSTOP.
FIRST_INSTANCE_CHECK = timedelta(seconds=30)
INSTANCE_BACKSTOP = timedelta(minutes=10)
VERIFY_WINDOW = timedelta(minutes=30)
WEBHOOK_HANDOVER = timedelta(minutes=1)
# The longest a watcher's wait_for_change may ask to wait before it is answered unchanged.
MAX_WATCH_WAIT_S = 3600.0
# How often a run wants its GPU's progress and heartbeats while nobody watches it (the relay
# asks, `progress_every_s`): liveness and the last step, at half the training idle
# deadline at most. A watch (wait_for_change) gets them at the relay's own pace, and for
# WATCH_LINGER after its last wait, so a watcher between two waits is still one.
UNWATCHED_PROGRESS_S = 300.0
WATCH_LINGER = timedelta(minutes=1)
# Stop before a cost cap is crossed, leaving the destroy this much of the GPU's time.
COST_CAP_MARGIN = timedelta(minutes=2)
# How long the run itself tries to destroy one instance before it reports it and moves on.
DESTROY_LIMIT = timedelta(minutes=15)
# A deadline that passes with the relay down is looked at again this often; once the relay is
# back, the GPU's held-back events (its retries back off up to 60 s) get this long to arrive.
RELAY_RECHECK = timedelta(seconds=30)
RELAY_RECOVERY_GRACE = timedelta(minutes=2)
# The longest one status waits for the relay; past it the deadline counts again.
RELAY_OUTAGE_LIMIT = timedelta(hours=2)
RELAY_CHECK_RETRY = RetryPolicy(maximum_attempts=2)
# An event this recent proves the relay delivers, whatever its health says (a runner sends a
# heartbeat a minute while it lives).
RELAY_HEARD_WINDOW = timedelta(minutes=2)
# Presigned URLs for the GPU: the job must be readable for as long as a boot may take.
JOB_URL_MARGIN_S = 10 * 60

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


class _CostCap(Exception):
    """The next minutes of GPU time would cross the run's max_cost_usd."""


class _GpuNotReleased(Exception):
    """An instance could not be destroyed within DESTROY_LIMIT; the reaper keeps trying."""


@dataclass(frozen=True)
class _ReplaceGpu:
    """This GPU will not finish the run: destroy it and try another offer."""

    reason: str


# How following a GPU ends when nothing failed: the model is up, or the history is long enough
# that the run hands itself over to a fresh execution first.
_Followed = Literal["uploaded", "hand over"] | _ReplaceGpu


@workflow.defn(name="TrainingWorkflow")
class TrainingWorkflow:
    @workflow.init
    def __init__(self, input: TrainingRequest | ContinuedRun) -> None:
        request, carried = (
            (input.request, input.state) if isinstance(input, ContinuedRun) else (input, None)
        )
        self._legacy = None if workflow.patched(LIFECYCLE_V2) else LegacyTrainingRun(request)
        self._request = request
        info = workflow.info()
        self._run_id = info.workflow_id
        self._state = carried or RunState(
            execution=info.first_execution_run_id,
            status=RunStatus(
                run_id=self._run_id,
                status=RunStatusName.PENDING,
                history=[StatusChange(status=RunStatusName.PENDING, at=workflow.now())],
            ),
            execution_bound=self._legacy is None and workflow.patched(RUN_IDENTITY),
        )
        self._facts = set(self._state.facts)
        self._webhooks = UserWebhooks(
            request.webhook, self._run_id, self._state.execution, self._state.webhooks
        )
        # Bumped whenever the main loop must look again (status, failure, history length);
        # progress alone only changes the query's answer and wakes nothing.
        self._wake = 0
        # The loop's standing wake-up timer and the time it fires (STANDING_ALARM).
        self._alarm: asyncio.Task[None] | None = None
        self._alarm_at = datetime.min
        self._closing = False
        # Set once the run stops waiting for work in flight (deadline or cancel).
        self._giving_up = False
        # Watchers waiting in wait_for_change now, and when the last one was answered.
        self._watchers = 0
        self._watched_at: datetime | None = None
        # The fleet watch said this instance exited or went: asked at the loop's next turn.
        # Heard only by runs that follow their GPU with the fleet watch (patch FLEET_WATCH):
        # one from before it never checks its instance on a signal.
        self._fleet_watch = False
        self._host_reported_down: str | None = None

    # ----------------------------------------------------------------------------------------
    # The run
    # ----------------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: TrainingRequest | ContinuedRun) -> RunStatus:
        """Validate, zip, rent a GPU, follow it to a verified model; give the GPU back always.

        A backend starts it with a TrainingRequest; a ContinuedRun is the run handing itself
        over to a fresh execution (continue-as-new)."""
        if self._legacy is not None:
            return await self._legacy.run(self._request)
        notifier = asyncio.create_task(self._webhooks.deliver_forever())
        if not isinstance(input, ContinuedRun):
            self._announce(RunStatusName.PENDING)
        else:
            self._state.executions += 1
            workflow.upsert_search_attributes(
                [LORA_STATUS.value_set(self._state.status.status.value)]
            )
            self._bump()
        if not await self._train_to_an_outcome():
            await self._hand_over_or_end_cancelled()
        # Compensation on every path above: nothing labelled for this run survives it, and a
        # cancel that arrives meanwhile waits for it.
        late_cancel = await self._shielded(self._compensate())
        closing = self._close(notifier)
        late_cancel = await self._shielded(closing, cancel_ended_it_before=True) or late_cancel
        return self._finish(late_cancel)

    async def _train_to_an_outcome(self) -> bool:
        """True once the run has its final status; False when it must hand over first."""
        try:
            if not await self._train():
                return False
        except asyncio.CancelledError:
            self._end(RunStatusName.CANCELLED, RunError(code="cancelled", message="cancelled"))
        except Exception as exc:
            if isinstance(exc, workflow.NondeterminismError):
                raise
            # An activity that the cancel stopped ends as an ActivityError caused by it.
            if is_cancelled_exception(exc) and workflow.patched(CANCEL_ANYWHERE):
                self._end(RunStatusName.CANCELLED, RunError(code="cancelled", message="cancelled"))
            else:
                self._end_with(exc)
        else:
            self._end(RunStatusName.COMPLETED)
        return True

    async def _train(self) -> bool:
        """True once the model is verified; False when the run must hand over first."""
        if self._state.prepared is None:
            await self._before_deadline(self._prepare_and_rent(), "preparing the run")
        while True:
            if self._state.instance is None:
                await self._before_deadline(self._rent(), "renting a GPU")
            followed = await self._follow_gpu_until_uploaded()
            if isinstance(followed, _ReplaceGpu):
                await self._replace_gpu(followed.reason)
                continue
            if followed == "hand over":
                return False
            instance = self._state.instance
            if instance is not None and workflow.patched(COST_EDGES):
                # The runner is done once its model is up: nothing is billed while S3 checks it.
                try:
                    await self._give_back(instance)
                except _GpuNotReleased as stuck:
                    # The model is up: verify it; the release at the end tries once more.
                    self._state.status.gpu_not_released = str(stuck)
            await self._verify_upload()
            return True

    async def _prepare_and_rent(self) -> None:
        """Fail fast: a bad dataset or an unknown model never costs a GPU."""
        dataset = DatasetInput(
            run_id=self._run_id, execution=self._state.execution, images=self._request.images
        )

        def zip_dataset(summary: str) -> Awaitable[ImagesZip]:
            return workflow.execute_activity_method(
                StorageActivities.build_images_zip,
                dataset,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(minutes=2),
                retry_policy=RETRY_UNTIL_DEADLINE,
                summary=summary,
            )

        resolve_model = workflow.execute_activity_method(
            ModelActivities.resolve_model,
            ResolveModelInput(
                run_id=self._run_id,
                model=self._request.model,
                civitai_api_key=self._request.civitai_api_key,
                model_files=self._request.model_files,
            ),
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RETRY_UNTIL_DEADLINE,
            summary="resolve the base model",
        )
        if workflow.patched(ZIP_CHECKS_DATASET):
            images_zip, model = await asyncio.gather(
                zip_dataset("check and zip the dataset"), resolve_model
            )
        else:
            _, model = await asyncio.gather(
                workflow.execute_activity_method(
                    StorageActivities.validate_images,
                    dataset,
                    start_to_close_timeout=timedelta(minutes=5),
                    retry_policy=RETRY_UNTIL_DEADLINE,
                    summary="validate the dataset",
                ),
                resolve_model,
            )
            images_zip = await zip_dataset("zip the dataset")
        self._state.prepared = PreparedInputs(images_zip=images_zip, model=model)
        self._state.status.attempt = 1
        await self._rent()

    async def _rent(self) -> None:
        """Write this attempt's job and rent an instance for it."""
        state, request = self._state, self._request
        prepared = state.prepared
        assert prepared is not None
        attempt = state.status.attempt
        if (refusal := self._over_budget_for_a_rental()) and workflow.patched(COST_EDGES):
            raise _CostCap(refusal)
        deadlines = request.deadlines
        runtime_s = (
            deadlines.pending_images_s + deadlines.pending_model_s + deadlines.training_total_s
        )
        durable_epochs = workflow.patched(DURABLE_EPOCHS)
        job = await workflow.execute_activity_method(
            StorageActivities.write_job_spec,
            JobSpecInput(
                run_id=self._run_id,
                execution=state.execution,
                attempt=attempt,
                images_zip=prepared.images_zip,
                model=prepared.model,
                training=request.training,
                trainer=request.trainer,
                output=request.output,
                civitai_api_key=request.civitai_api_key,
                limits=RunnerLimits(max_runtime_s=runtime_s),
                events_name_execution=state.execution_bound,
                job_url_ttl_s=deadlines.pending_gpu_s + JOB_URL_MARGIN_S,
                # The upload URL lives only as long as this attempt's training can.
                upload_url_ttl_s=min(deadlines.pending_gpu_s + runtime_s, 7 * 24 * 3600 - 60),
                save_epochs=durable_epochs,
                samples=request.samples,
                keep=request.keep,
                resume=durable_epochs and request.resume and attempt > 1,
            ),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RETRY_UNTIL_DEADLINE,
            summary=f"write the job for GPU attempt {attempt}",
        )
        state.output = job.output
        if durable_epochs:
            self._found_saved_epochs(job, attempt)
        model = prepared.model
        requirements, download_bytes = request.gpu, prepared.images_zip.bytes + (model.bytes or 0)
        if workflow.patched(FAMILY_SIZED_GPU):
            # The disk counts the family's component files by their known sizes on its own.
            requirements = effective_requirements(
                request.gpu, model.family, model.variant, request.training, model.bytes
            )
            download_bytes += sum(c.bytes or 0 for c in model.components)
        renting_since = workflow.now()
        instance = await workflow.execute_activity_method(
            GpuActivities.allocate_gpu,
            AllocateGpuInput(
                run_id=self._run_id,
                attempt=attempt,
                execution=state.execution if state.execution_bound else None,
                job_url=job.job_url,
                requirements=requirements,
                exclude_machine_ids=state.excluded_machines,
                download_bytes=download_bytes,
            ),
            # Long enough for offers tried at Vast's create pace behind other runs' calls: the
            # heartbeat (every 15 s while the provider creates) tells a dead worker sooner.
            start_to_close_timeout=timedelta(minutes=15),
            heartbeat_timeout=timedelta(minutes=1),
            retry_policy=RETRY_UNTIL_DEADLINE,
            # A cancelled allocation is waited for, so the release after it sees what it rented.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"rent GPU attempt {attempt}",
        )
        if self._giving_up:
            return  # the release that follows destroys it by its label
        state.instance = instance
        # Billed from the host's creation, which lies between asking and the answer (a time
        # from another clock outside that window, e.g. a test's skipped time, is not trusted).
        now, created = workflow.now(), instance.created_at
        start = created if created is not None and renting_since <= created <= now else now
        state.gpu_spans.append(
            GpuSpan(dollars_per_hour=instance.dollars_per_hour or 0.0, start=start)
        )
        state.status.gpu = GpuInfo(
            provider=instance.provider,
            instance_id=instance.instance_id,
            gpu_name=instance.gpu_name,
            dollars_per_hour=instance.dollars_per_hour,
            started_at=start,
            machine_id=instance.machine_id,
            host_id=instance.host_id,
            country=instance.country,
        )
        self._learn(Fact.GPU_CREATED)

    def _found_saved_epochs(self, job: JobSpecRef, attempt: int) -> None:
        """What storage holds of earlier attempts (an epoch whose event never arrived counts
        too), and where this attempt resumes."""
        for info in job.saved_epochs:
            self._keep_epoch(info)
        if job.resumed_from is not None:
            self._state.status.resumed.append(
                f"resumed from epoch {job.resumed_from} on attempt {attempt}"
            )
        if job.saved_epochs or job.resumed_from is not None:
            self._bump()

    def _keep_epoch(self, info: SavedEpochInfo) -> None:
        epochs = [e for e in self._state.status.epochs if e.epoch != info.epoch]
        self._state.status.epochs = sorted([*epochs, info], key=lambda e: e.epoch)

    async def _follow_gpu_until_uploaded(self) -> _Followed:
        """pendingGpu .. training: one deadline per status, the instance checked all along:
        when the fleet watch says its host is down, and every INSTANCE_BACKSTOP."""
        self._fleet_watch = workflow.patched(FLEET_WATCH)
        check_interval = INSTANCE_BACKSTOP if self._fleet_watch else INSTANCE_CHECK_INTERVAL
        next_check = workflow.now() + (
            FIRST_INSTANCE_CHECK if self._fleet_watch else INSTANCE_CHECK_INTERVAL
        )
        while Fact.MODEL_UPLOADED not in self._facts:
            if self._should_continue_as_new():
                return "hand over"
            if lost := self._host_lost_before_ready():
                return lost
            deadline = self._deadline()
            now = workflow.now()
            if now >= deadline.at:
                if workflow.patched(FAULTS_END_RIGHT) and await self._relay_kept_events_away():
                    continue
                if deadline.trainer_idle and workflow.patched(FAULTS_END_RIGHT):
                    return _ReplaceGpu(f"{deadline.message}: its trainer is stuck")
                if deadline.replace_gpu:
                    limit_s = self._request.deadlines.pending_gpu_s
                    reason = f"GPU not ready within {limit_s} s"
                    if workflow.patched(HOST_REASON_AT_BOOT_DEADLINE):
                        reason += await self._host_says()
                    return _ReplaceGpu(reason)
                raise _Stalled(deadline.message)
            cost_cap_at = self._cost_cap_at()
            if cost_cap_at is not None and now >= cost_cap_at:
                raise _CostCap()
            if now >= next_check or self._host_reported_down_now():
                self._host_reported_down = None
                if lost := await self._check_instance():
                    return lost
                next_check = workflow.now() + check_interval
                continue
            wake, summary = min(
                (deadline.at, deadline.summary),
                (next_check, "check the GPU instance"),
                (cost_cap_at or deadline.at, "cost cap"),
            )
            await self._sleep_until_woken(wake, summary)
        return self._host_lost_before_ready() or "uploaded"

    def _host_reported_down_now(self) -> bool:
        instance = self._state.instance
        return instance is not None and self._host_reported_down == instance.instance_id

    async def _sleep_until_woken(self, wake: datetime, summary: str) -> None:
        """Until `wake` (in the future) or until something wakes the loop. The timer for a
        wake-up stands: a later loop that wakes no earlier waits on it again, and one that must
        wake earlier sets an earlier timer and leaves the old one to fire unheard."""
        seen = self._wake
        if not workflow.patched(STANDING_ALARM):
            await self._wait(lambda: self._wake != seen, wake - workflow.now(), summary)
            return
        if self._alarm is None or self._alarm.done() or wake < self._alarm_at:
            self._alarm_at = wake
            self._alarm = asyncio.create_task(
                workflow.sleep(wake - workflow.now(), summary=summary)
            )
        alarm = self._alarm
        await workflow.wait_condition(lambda: alarm.done() or self._wake != seen)

    async def _instance_now(self) -> tuple[bool, Instance | None]:
        """(asked, the provider's view): asked is False when the provider did not answer."""
        instance = self._state.instance
        assert instance is not None
        try:
            current = await workflow.execute_local_activity_method(
                GpuActivities.get_gpu_instance,
                self._instance_ref(instance),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=INSTANCE_CHECK_RETRY,
                summary="check the GPU instance",
            )
        except ActivityError as e:
            if is_cancelled_exception(e) and workflow.patched(CANCEL_ANYWHERE):
                raise  # the run's cancel, which arrives once: not a provider that did not answer
            workflow.logger.warning("run %s: instance check failed; next one soon", self._run_id)
            return False, None
        return True, current

    async def _relay_kept_events_away(self) -> bool:
        """Whether a deadline that just passed must wait: our relay is down, so the GPU's events
        cannot reach the run (asked again in RELAY_RECHECK), or it just came back and the
        events it held back get RELAY_RECOVERY_GRACE. An event that reached the run since the
        last look proves the relay delivers, whatever its health says. A status waits at most
        RELAY_OUTAGE_LIMIT in all; a relay that cannot be asked lets the deadline count."""
        # The deadline's own time: the grace counts from it, as the v7 recordings did.
        state, now = self._state, workflow.now()
        try:
            # A regular activity, not a local one: asked only when a deadline passes, and the
            # time-skipping test server does not skip time past one in flight.
            health = await workflow.execute_activity_method(
                RelayActivities.relay_health,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RELAY_CHECK_RETRY,
                summary="is the relay up?",
            )
        except ActivityError as e:
            if is_cancelled_exception(e):
                raise
            workflow.logger.warning("run %s: could not ask the relay", self._run_id)
            return False
        heard = state.last_event_at is not None and now - state.last_event_at < RELAY_HEARD_WINDOW
        if health.up or heard:
            if state.relay_down_since is None:
                return False
            self._relay_is_back()
            state.deadline_grace_until = now + RELAY_RECOVERY_GRACE
            return True
        waiting_since = state.relay_wait_started_at or now
        if now - waiting_since >= RELAY_OUTAGE_LIMIT:
            self._relay_is_back()
            return False
        state.relay_wait_started_at = waiting_since
        if state.relay_down_since is None:
            workflow.logger.warning(
                "run %s: deadline passed with the relay down (%s): waiting for the relay",
                self._run_id,
                health.detail,
            )
            state.relay_down_since = now
            state.status.waiting_for_relay = health.detail
            self._bump()
        state.deadline_grace_until = now + RELAY_RECHECK
        return True

    def _relay_is_back(self) -> None:
        state = self._state
        state.relay_down_since = None
        if state.status.waiting_for_relay is not None:
            state.status.waiting_for_relay = None
            self._bump()

    async def _host_says(self) -> str:
        """The host's own word on an instance that did not boot, for the run's error."""
        asked, current = await self._instance_now()
        if not asked:
            return ""
        if current is None:
            return " (the provider no longer knows the instance)"
        return f" (instance {current.state}: {current.message})" if current.message else ""

    async def _check_instance(self) -> _ReplaceGpu | None:
        """A dead or exited instance is replaced at once, whatever the status."""
        instance = self._state.instance
        assert instance is not None
        asked, current = await self._instance_now()
        if not asked:
            return None
        if Fact.MODEL_UPLOADED in self._facts or self._state.runner_failure is not None:
            return None  # the runner ends its process after these: not a death
        if current is None or current.state in ("exited", "gone"):
            state = "gone" if current is None else current.state
            detail = f": {current.message}" if current and current.message else ""
            return _ReplaceGpu(f"instance {instance.instance_id} {state}{detail}")
        return None

    async def _replace_gpu(self, reason: str) -> None:
        state = self._state
        instance = state.instance
        assert instance is not None
        where = instance.gpu_name or instance.provider
        if instance.machine_id:
            where += f" on machine {instance.machine_id}"
            state.excluded_machines.append(instance.machine_id)
        state.status.gpu_failures.append(f"attempt {state.status.attempt} ({where}): {reason}")
        workflow.logger.warning(
            "run %s: replacing GPU attempt %d: %s", self._run_id, state.status.attempt, reason
        )
        await self._give_back(instance)
        if state.status.attempt >= self._request.max_gpu_attempts:
            raise _Stalled(
                f"no GPU finished the run after {state.status.attempt} attempts: "
                + "; ".join(state.status.gpu_failures)
            )
        # A new GPU starts from nothing: its own attempt number, facts, events and liveness.
        state.status.attempt += 1
        self._facts.clear()
        state.seen_seqs, state.last_progress_seq, state.last_step = [], 0, 0
        state.last_step_at, state.runner_failure = None, None
        state.status.progress = None
        self._enter(RunStatusName.PENDING_GPU)

    async def _verify_upload(self) -> None:
        uploaded, output = self._state.uploaded, self._state.output
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
            schedule_to_close_timeout=VERIFY_WINDOW,
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RETRY_UNTIL_DEADLINE,
            summary="verify the uploaded model",
        )
        self._state.status.result = ModelResult(
            location=verified.location,
            bytes=verified.bytes,
            sha256=verified.sha256,
            epoch=uploaded.epoch,
            loss=uploaded.loss,
        )
        self._state.status.download_url = verified.download_url

    # ----------------------------------------------------------------------------------------
    # Continue-as-new and closing
    # ----------------------------------------------------------------------------------------

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._request.continue_as_new_after_events
        )

    async def _hand_over_or_end_cancelled(self) -> None:
        """Hand the run (GPU included) to a fresh execution with the same state; a cancel
        meanwhile ends the run here instead, and the compensation after this runs as usual."""
        try:
            await self._webhooks.drain(WEBHOOK_HANDOVER)
            await self._answer_waiters()
        except asyncio.CancelledError:
            if not workflow.patched(CANCEL_ANYWHERE):
                raise
            self._end(RunStatusName.CANCELLED, RunError(code="cancelled", message="cancelled"))
            return
        self._state.facts = sorted(self._facts)
        workflow.continue_as_new(ContinuedRun(request=self._request, state=self._state))

    async def _close(self, notifier: asyncio.Task[None]) -> None:
        """The last webhooks handed over and every watcher answered."""
        await self._webhooks.drain(WEBHOOK_HANDOVER)
        notifier.cancel()
        await self._answer_waiters()

    async def _answer_waiters(self) -> None:
        """Every wait_for_change in flight gets an answer before this execution ends."""
        self._closing = True
        await workflow.wait_condition(workflow.all_handlers_finished)

    # ----------------------------------------------------------------------------------------
    # GPU lifecycle
    # ----------------------------------------------------------------------------------------

    async def _give_back(self, instance: Instance) -> None:
        """Destroy the instance; _GpuNotReleased when that does not converge within
        DESTROY_LIMIT (the run reports it; the reaper destroys it once the run has closed)."""
        bounded = workflow.patched(COST_EDGES)
        try:
            await workflow.execute_activity_method(
                GpuActivities.deallocate_gpu,
                self._instance_ref(instance),
                start_to_close_timeout=timedelta(minutes=2),
                schedule_to_close_timeout=DESTROY_LIMIT if bounded else None,
                retry_policy=RETRY_FOREVER,
                summary=f"destroy GPU instance {instance.instance_id}",
            )
        except ActivityError as e:
            if not bounded or is_cancelled_exception(e):
                raise
            raise _GpuNotReleased(
                f"GPU instance {instance.instance_id} ({instance.provider}) could not be "
                f"destroyed within {int(DESTROY_LIMIT.total_seconds() // 60)} min "
                f"({_cause_of(e)}); the reaper keeps trying"
            ) from None
        self._close_gpu_span()
        self._state.instance = None
        self._facts.discard(Fact.GPU_CREATED)

    async def _compensate(self) -> None:
        """Destroy every instance labelled for this run, and forget the run's job secrets."""
        bounded = workflow.patched(COST_EDGES)
        try:
            await workflow.execute_activity_method(
                GpuActivities.release_run_gpus,
                RunRef(
                    run_id=self._run_id,
                    execution=self._state.execution if self._state.execution_bound else None,
                ),
                start_to_close_timeout=timedelta(minutes=2),
                schedule_to_close_timeout=DESTROY_LIMIT if bounded else None,
                retry_policy=RETRY_FOREVER,
                summary="give every GPU of the run back",
            )
            self._state.status.gpu_not_released = None  # whatever was left is gone now
        except ActivityError as e:
            if not bounded or is_cancelled_exception(e):
                raise
            instance = self._state.instance
            which = f"GPU instance {instance.instance_id}" if instance else "the run's GPUs"
            self._state.status.gpu_not_released = (
                f"{which} could not be destroyed within "
                f"{int(DESTROY_LIMIT.total_seconds() // 60)} min ({_cause_of(e)}); "
                "the reaper keeps trying"
            )
            workflow.logger.error("run %s: %s", self._run_id, self._state.status.gpu_not_released)
        self._close_gpu_span()
        self._state.instance = None
        self._bump()
        await workflow.execute_activity_method(
            StorageActivities.delete_job_specs,
            RunKeyInput(run_id=self._run_id, execution=self._state.execution),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RETRY_FOREVER,
            summary="delete the run's job specs (they hold secrets)",
        )

    def _close_gpu_span(self) -> None:
        spans = self._state.gpu_spans
        if spans and spans[-1].end is None:
            spans[-1].end = workflow.now()

    def _instance_ref(self, instance: Instance) -> InstanceRef:
        return InstanceRef(
            run_id=self._run_id, provider=instance.provider, instance_id=instance.instance_id
        )

    def _cost_usd(self) -> float:
        now = workflow.now()
        hours = sum(
            span.dollars_per_hour * ((span.end or now) - span.start).total_seconds() / 3600
            for span in self._state.gpu_spans
        )
        return round(hours, 4)

    def _over_budget_for_a_rental(self) -> str | None:
        """Why renting another GPU would cross the cost cap: one at the requirements' highest
        price could not even run for COST_CAP_MARGIN on what is left."""
        cap = self._request.max_cost_usd
        if cap is None:
            return None
        spent = self._cost_usd()
        price = self._request.gpu.max_dollars_per_hour
        needed = price * COST_CAP_MARGIN.total_seconds() / 3600
        if cap - spent > needed:
            return None
        return (
            f"not renting GPU attempt {self._state.status.attempt}: ${spent:.4f} of the run's "
            f"${cap} cost cap is spent, and a GPU at up to ${price}/h would cross it"
        )

    def _cost_cap_at(self) -> datetime | None:
        """When the run must stop so that the cap is not crossed, while a GPU is held."""
        cap, instance = self._request.max_cost_usd, self._state.instance
        if cap is None or instance is None or not instance.dollars_per_hour:
            return None
        left_h = (cap - self._cost_usd()) / instance.dollars_per_hour
        return workflow.now() + timedelta(hours=left_h) - COST_CAP_MARGIN

    # ----------------------------------------------------------------------------------------
    # Runner events
    # ----------------------------------------------------------------------------------------

    @workflow.signal
    def relayed_event(self, relayed: RelayedEvent) -> None:
        """Sent only by the relay, after it verified the runner's signature with the secret of
        `relayed.execution` (the first execution id of the run the GPU was rented for)."""
        if self._legacy is None and relayed.execution != self._state.execution:
            workflow.logger.warning(
                "run %s: ignored a %s event of another run of this id",
                self._run_id,
                relayed.event.type,
            )
            return
        self._take(relayed.event)

    @workflow.signal(name=HOST_DOWN_SIGNAL)
    def host_down(self, report: HostDown) -> None:
        """Sent by the fleet watch (activities/fleet.py) when this run's host exited or went
        from the provider's listing; the run confirms with the provider before it acts."""
        instance = self._state.instance
        if self._legacy is not None or instance is None or not self._fleet_watch:
            return
        if report.instance_id != instance.instance_id:
            return  # an earlier attempt's host, already replaced
        workflow.logger.info(
            "run %s: the fleet watch saw instance %s %s",
            self._run_id,
            report.instance_id,
            report.state,
        )
        self._host_reported_down = report.instance_id
        self._wake += 1

    @workflow.signal
    def runner_event(self, event: RunnerEvent) -> None:
        """Sent by relays from before runs were told apart by execution, for runners whose job
        names the run id alone; runs started since then take only `relayed_event`."""
        if self._legacy is None and self._state.execution_bound:
            workflow.logger.warning(
                "run %s: ignored a %s event not relayed for this run's execution",
                self._run_id,
                event.type,
            )
            return
        self._take(event)

    def _take(self, event: RunnerEvent) -> None:
        if self._legacy is not None:
            self._legacy.runner_event(event)
            return
        state = self._state
        state.last_event_at = workflow.now()
        if state.relay_down_since is not None:
            self._relay_is_back()  # an event got through
        if (
            event.run_id != self._run_id
            or event.attempt != state.status.attempt
            or event.seq in state.seen_seqs
            or state.status.status.terminal
        ):
            return
        state.seen_seqs = [*state.seen_seqs[-(SEEN_WINDOW - 1) :], event.seq]
        self._apply(event)
        if self._should_continue_as_new():
            self._wake += 1

    def _apply(self, event: RunnerEvent) -> None:
        data = event.parsed()
        state = self._state
        if isinstance(data, GpuReadyData):
            if state.status.gpu is not None and data.gpu_name:
                state.status.gpu.gpu_name = data.gpu_name
            self._learn(Fact.GPU_READY)
        elif isinstance(data, TrainingProgressData):
            self._note_step(data.step)
            if event.seq > state.last_progress_seq:
                state.last_progress_seq = event.seq
                self._record_progress(data)
        elif isinstance(data, HeartbeatData):
            if data.step is not None:
                self._note_step(data.step)
            if data.stage == "upload" and Fact.TRAINING_COMPLETED in self._facts:
                # Trained, and retrying the model upload through an S3 outage: that is
                # progress too, bounded by the runner's orphan timeout and the total deadline.
                self._state.last_step_at = workflow.now()
        elif isinstance(data, EpochSavedData):
            self._note_step(data.step)
            info = SavedEpochInfo(
                epoch=data.epoch,
                loss=data.loss,
                step=data.step,
                attempt=event.attempt,
                bucket=data.bucket,
                lora=data.lora,
                samples=data.samples,
                state=data.state,
                manifest_key=data.manifest_key,
            )
            self._keep_epoch(info)
            self._bump()
            self._webhooks.queue(
                "training.epoch",
                {
                    **info.model_dump(mode="json", exclude={"state", "manifest_key"}),
                    "version": state.status.version,
                },
            )
        elif isinstance(data, TrainingCompletedData):
            state.status.epoch_losses = data.epoch_losses
            state.status.best_checkpoint = data.best_epoch
            self._learn(Fact.TRAINING_COMPLETED)
        elif isinstance(data, ModelUploadedData):
            state.uploaded = data
            self._learn(Fact.MODEL_UPLOADED)
            self._wake += 1  # no status follows training: verify now, not at the next check
        elif isinstance(data, RunFailedData):
            state.runner_failure = data
            self._wake += 1
            self._bump()
        elif event.type in (Fact.IMAGES_READY, Fact.MODEL_READY, Fact.FILES_READY):
            self._learn(Fact(event.type))

    def _note_step(self, step: int) -> None:
        """Liveness is a step that advanced, not a message that arrived."""
        if step > self._state.last_step:
            self._state.last_step = step
            self._state.last_step_at = workflow.now()

    def _record_progress(self, data: TrainingProgressData) -> None:
        percent = round(100.0 * data.step / data.total, 1) if data.total else 0.0
        progress = Progress(
            step=data.step,
            total=data.total,
            epoch=data.epoch,
            total_epochs=data.total_epochs,
            percent=percent,
            loss=data.loss,
            it_per_s=data.it_per_s,
            eta_s=data.eta_s,
        )
        self._state.status.progress = progress
        self._bump()
        self._webhooks.queue_progress(progress, self._state.status.version)

    def _host_lost_before_ready(self) -> _ReplaceGpu | None:
        """A runner that failed before its GPU was ready loses the host, not the run; one that
        failed later fails the run (_RunnerFailed)."""
        failure = self._state.runner_failure
        if failure is None:
            return None
        if Fact.GPU_READY not in self._facts:
            return _ReplaceGpu(f"the runner failed on this host: {failure.message}")
        raise _RunnerFailed(failure)

    # ----------------------------------------------------------------------------------------
    # Status
    # ----------------------------------------------------------------------------------------

    @workflow.query
    def status(self) -> RunStatus:
        if self._legacy is not None:
            return self._legacy.status()
        return self._snapshot()

    @workflow.update
    async def wait_for_change(self, after_version: int, wait_s: float | None = None) -> RunStatus:
        """Long poll: answers once the version passes `after_version`, the execution ends, or
        the caller's `wait_s` runs out (then with the status unchanged), so no update outlives
        the watcher that asked. Without `wait_s` it waits as long as the execution lasts."""
        if self._legacy is not None:
            return await self._legacy.wait_for_change(after_version)

        def changed() -> bool:
            return self._state.status.version > after_version or self._closing

        self._watchers += 1
        try:
            if wait_s is None:
                await workflow.wait_condition(changed)
            else:
                await self._wait(changed, timedelta(seconds=wait_s), "the watcher's wait")
        finally:
            self._watchers -= 1
            self._watched_at = workflow.now()
        return self._snapshot()

    @workflow.query
    def progress_every_s(self) -> float:
        """How often this run wants its GPU's progress and heartbeats relayed: 0 (at the
        relay's own pace) while someone watches it, else UNWATCHED_PROGRESS_S, at most half
        of its training idle deadline. Asked by the relay; a progress signal is most of a
        training run's history, so an unwatched run costs a few events an hour."""
        if self._legacy is not None:
            return 0.0
        lingering = (
            self._watched_at is not None and workflow.now() - self._watched_at < WATCH_LINGER
        )
        if self._watchers or lingering:
            return 0.0
        return min(UNWATCHED_PROGRESS_S, self._request.deadlines.training_idle_s / 2)

    @wait_for_change.validator
    def _validate_wait_for_change(self, after_version: int, wait_s: float | None = None) -> None:
        if self._legacy is not None:
            self._legacy.validate_wait_for_change(after_version)
            return
        if wait_s is not None and not 0 < wait_s <= MAX_WATCH_WAIT_S:
            raise ValueError(f"wait_s must be above 0 and at most {MAX_WATCH_WAIT_S}, not {wait_s}")
        if self._closing:
            # Answered at once, a watcher would ask again at once and keep the hand-over
            # waiting; refused, it asks the next execution.
            raise ValueError("the run is closing or continuing as new: ask again")
        version = self._state.status.version
        if not 0 <= after_version <= version:
            raise ValueError(
                f"after_version must be between 0 and the run's version {version}, "
                f"not {after_version}"
            )

    def _snapshot(self) -> RunStatus:
        return self._state.status.model_copy(update={"cost_usd": self._cost_usd()}, deep=True)

    def _deadline(self) -> Deadline:
        status = self._state.status.status
        deadline = status_deadline(
            status, self._entered_at(status), self._request.deadlines, self._state.last_step_at
        )
        grace = self._state.deadline_grace_until
        if grace is not None and grace > deadline.at:
            summary = f"{deadline.summary} (waiting for the relay)"
            return replace(deadline, at=grace, summary=summary)
        return deadline

    def _learn(self, fact: Fact) -> None:
        self._facts.add(fact)
        target = derive_status(self._facts)
        current = self._state.status.status
        if target == current or current.terminal:
            return
        for status in statuses_between(current, target):
            self._enter(status)

    def _enter(self, status: RunStatusName) -> None:
        self._state.deadline_grace_until = self._state.relay_wait_started_at = None
        self._state.status.status = status
        self._state.status.history.append(StatusChange(status=status, at=workflow.now()))
        self._wake += 1
        self._announce(status)

    def _announce(self, status: RunStatusName) -> None:
        workflow.upsert_search_attributes([LORA_STATUS.value_set(status.value)])
        self._bump()
        self._webhooks.queue(
            "training.status", {"status": status.value, "version": self._state.status.version}
        )

    def _entered_at(self, status: RunStatusName) -> datetime:
        return next(c.at for c in reversed(self._state.status.history) if c.status == status)

    def _bump(self) -> None:
        self._state.status.version += 1
        workflow.set_current_details(self._details())

    def _details(self) -> str:
        """What the Temporal UI shows as the run's current details."""
        st = self._state.status
        lines = [f"**{st.status.value}** (GPU attempt {st.attempt})"]
        if st.progress is not None:
            p = st.progress
            epoch = f"epoch {p.epoch}/{p.total_epochs}, " if p.epoch and p.total_epochs else ""
            loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
            eta = f", ETA {int(p.eta_s)} s" if p.eta_s is not None else ""
            lines.append(f"{epoch}step {p.step}/{p.total} ({p.percent:.0f} %){loss}{eta}")
        if st.epochs:
            last = st.epochs[-1]
            loss = f", loss {last.loss:.4f}" if last.loss is not None else ""
            lines.append(f"epochs saved: {len(st.epochs)} (latest: epoch {last.epoch}{loss})")
            if last.samples and last.bucket:
                lines.append(f"latest sample: s3://{last.bucket}/{last.samples[-1].key}")
        if st.resumed:
            lines.append(st.resumed[-1])
        if st.gpu is not None:
            rate = f" at ${st.gpu.dollars_per_hour:.3f}/h" if st.gpu.dollars_per_hour else ""
            lines.append(f"GPU: {st.gpu.gpu_name or st.gpu.provider}{rate}")
        lines.append(f"cost so far: ${self._cost_usd():.4f}")
        if st.waiting_for_relay is not None:
            lines.append(f"waiting for the relay: {st.waiting_for_relay}")
        if st.error is not None:
            lines.append(f"error ({st.error.code}): {st.error.message}")
        return "  \n".join(lines)

    def _end(self, status: RunStatusName, error: RunError | None = None) -> None:
        self._state.status.error = error
        self._enter(status)
        payload: dict[str, Any] = {"status": status.value}
        if error is not None:
            payload["error"] = error.model_dump(mode="json")
        if self._state.status.result is not None:
            payload["model"] = self._state.status.result.model_dump(mode="json")
            payload["download_url"] = self._state.status.download_url
        if self._state.status.epochs:
            payload["epochs"] = [
                e.model_dump(mode="json", exclude={"state"}) for e in self._state.status.epochs
            ]
        self._webhooks.queue(_TERMINAL_WEBHOOKS[status], payload)

    def _end_with(self, exc: Exception) -> None:
        stage = self._state.status.status.value
        if isinstance(exc, _Stalled):
            self._end(
                RunStatusName.STALLED, RunError(code="stalled", message=str(exc), stage=stage)
            )
        elif isinstance(exc, _CostCap):
            cap = self._request.max_cost_usd
            self._end(
                RunStatusName.FAILED,
                RunError(
                    code="cost_cap",
                    message=str(exc)
                    or f"stopped before the run's cost cap of ${cap} was crossed "
                    f"(${self._cost_usd():.4f} spent)",
                    stage=stage,
                ),
            )
        elif isinstance(exc, _GpuNotReleased):
            self._state.status.gpu_not_released = str(exc)
            self._end(
                RunStatusName.FAILED,
                RunError(code="gpu_not_released", message=str(exc), stage=stage),
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
        elif isinstance(exc, ActivityError) and isinstance(exc.cause, ActivityTimeoutError):
            self._end(
                RunStatusName.FAILED,
                RunError(code="timeout", message=f"gave up: {exc.cause.message}", stage=stage),
            )
        else:
            workflow.logger.exception("unexpected error in run %s", self._run_id)
            self._end(
                RunStatusName.FAILED,
                RunError(
                    code="internal_error", message=f"{type(exc).__name__}: {exc}", stage=stage
                ),
            )

    def _finish(self, late_cancel: bool) -> RunStatus:
        """The execution's result, which always agrees with the run's final status."""
        status = self._state.status.status
        if status == RunStatusName.CANCELLED:
            raise asyncio.CancelledError()
        if late_cancel:
            if not workflow.patched(CANCEL_ANYWHERE):
                raise asyncio.CancelledError()
            # The outcome was reached (model verified, webhook sent) before the cancel came.
            workflow.logger.info("run %s: cancel after the run %s; kept", self._run_id, status)
            self._state.status.late_cancel_at = workflow.now()
            self._bump()
        if status == RunStatusName.COMPLETED:
            return self._snapshot()
        error = self._state.status.error
        assert error is not None
        raise ApplicationError(
            f"run {status.value}: {error.message}",
            error.model_dump(mode="json"),
            type=f"Run{status.value.capitalize()}",
            non_retryable=True,
        )

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    @staticmethod
    async def _wait(condition: Callable[[], bool], within: timedelta, summary: str) -> bool:
        """True when `condition` held within the time given, False when the time ran out."""
        try:
            await workflow.wait_condition(
                condition, timeout=max(within, timedelta(0)), timeout_summary=summary
            )
        except TimeoutError:
            return False
        return True

    async def _before_deadline(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run `work` under the current status's deadline. On timeout or cancel it is cancelled
        and waited for, so whatever it rented is visible to the release that follows."""
        task = asyncio.ensure_future(work)
        status = self._state.status.status
        deadline = self._deadline()
        try:
            done = await self._wait(task.done, deadline.at - workflow.now(), deadline.summary)
        except asyncio.CancelledError:
            await self._settle(task)
            raise
        if not done:
            if await self._settle(task):
                raise asyncio.CancelledError()  # the user's cancel came while it settled
            limit_s = int((deadline.at - self._entered_at(status)).total_seconds())
            raise _Stalled(f"{what} took longer than the {status.value} deadline ({limit_s} s)")
        task.result()

    async def _settle(self, task: asyncio.Future[None]) -> bool:
        """Cancel `task` and wait until it has ended; True when the run itself was cancelled
        meanwhile (that cancel arrives once, and must not be lost)."""
        self._giving_up = True
        task.cancel()
        run_cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    break
                if not workflow.patched(CANCEL_ANYWHERE):
                    break  # runs before the patch stopped waiting here
                run_cancelled = True
            except Exception:
                # A cancelled activity ends as ActivityError: it gave up, as asked.
                break
        return run_cancelled

    @staticmethod
    async def _shielded(work: Awaitable[T], *, cancel_ended_it_before: bool = False) -> bool:
        """Run `work` to the end even if the run is cancelled meanwhile; True if it was.

        Runs from before the cancel-anywhere patch replay as they ran: a cancel that came as the
        work finished escaped, and so did one during work that was not shielded then
        (`cancel_ended_it_before`: the final hand-over of webhooks and watchers)."""
        task = asyncio.ensure_future(work)
        cancelled = False
        while True:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                if (task.done() or cancel_ended_it_before) and not workflow.patched(
                    CANCEL_ANYWHERE
                ):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise
                cancelled = True
                continue
            return cancelled


def _cause_of(error: ActivityError) -> str:
    """What went wrong under an activity error, in a line: a timeout with the failure of the
    last attempt it cut short."""
    cause = error.cause
    if not isinstance(cause, FailureError):
        return str(cause or error)
    text = cause.message
    last = cause.cause
    if isinstance(cause, ActivityTimeoutError) and isinstance(last, FailureError):
        text = f"{text}; last attempt: {last.message}"
    return text.splitlines()[0] if text else type(cause).__name__
