"""The run's lifecycle under races, crashes and long runs (issue: 12-hour runs, cancels, deploys).

Time-dependent paths run on the time-skipping server; updates and the long run on the dev server.
Each test reproduces a way the first workflow version lost a run or leaked a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.storage import StorageActivities, VerifyUploadInput
from common.settings import Settings
from gpu_runner.protocol import HeartbeatData, JobSpec, RunFailedData, TrainingProgressData
from workflows.models import Deadlines, RunStatus, RunStatusName, S3Location, UserWebhook
from workflows.training import INSTANCE_CHECK_INTERVAL, TrainingWorkflow

from .conftest import free_port, s3_client_for
from .test_workflow import MODEL_BYTES, assert_no_instance_left, finish, send_all, upload_model
from .workflow_support import (
    CODE_VERSION,
    SEED_ORDER,
    SHORT_DEADLINES,
    RecordingProvider,
    ScriptedEvents,
    check_replays,
    local_model,
    make_request,
    put_dataset,
    relay_event,
    running_worker,
    start_run,
    wait_for_status,
)

USER_SECRET = "whsec_" + "bGlmZWN5Y2xlLXRlc3Qtc2VjcmV0"


def kill_instance(provider: RecordingProvider, instance_id: str) -> None:
    """The host dies: the instance's whole process group, without the provider knowing."""
    record = provider._record(instance_id)
    assert record is not None
    os.killpg(record.pid, signal.SIGKILL)


def provider_sees_dead(provider: RecordingProvider, instance_id: str) -> bool:
    current = provider.get(instance_id)
    return current is None or current.state in ("exited", "gone")


async def reach_training(handle: WorkflowHandle[Any, Any], attempt: int = 1) -> ScriptedEvents:
    script = ScriptedEvents(handle.id, attempt=attempt)
    await send_all(handle, script.happy_path("unused", MODEL_BYTES)[:5])
    await wait_for_status(handle, RunStatusName.TRAINING)
    return script


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# A GPU that dies after gpu.ready is replaced, and the run completes on the next one
# --------------------------------------------------------------------------------------------


async def test_instance_dying_in_training_is_replaced_and_the_run_completes(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        await reach_training(handle)
        kill_instance(provider, provider.created[0])
        # Dead as the provider sees it (a killed group takes a moment to go on a busy machine).
        await wait_until(lambda: provider_sees_dead(provider, provider.created[0]))
        died_at = await env.get_current_time()
        # The instance is checked every INSTANCE_CHECK_INTERVAL in every status.
        await env.sleep(2 * INSTANCE_CHECK_INTERVAL.total_seconds() + 5)
        await wait_until(lambda: len(provider.created) == 2)
        replaced: RunStatus = await handle.query(TrainingWorkflow.status)
        assert replaced.attempt == 2 and replaced.status == RunStatusName.PENDING_GPU
        back_to_pending_gpu = replaced.history[-1].at
        key = upload_model(s3, run_settings, handle)
        await send_all(handle, ScriptedEvents(handle.id, attempt=2).happy_path(key, MODEL_BYTES))
        status, error = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-gpu-replaced-in-training")

    assert error is None, error
    assert status.status == RunStatusName.COMPLETED and status.attempt == 2
    seconds_to_replacement = (back_to_pending_gpu - died_at).total_seconds()
    # The next check after the host is seen dead: one interval, two if the kill raced a check.
    assert seconds_to_replacement <= 2 * INSTANCE_CHECK_INTERVAL.total_seconds() + 1
    assert len(status.gpu_failures) == 1 and "exited" in status.gpu_failures[0]
    history = [c.status for c in status.history]
    assert history == [*SEED_ORDER[:5], *SEED_ORDER[1:]]
    assert len(provider.created) == 2
    assert_no_instance_left(provider)


# --------------------------------------------------------------------------------------------
# Liveness: heartbeats without a step are a stall
# --------------------------------------------------------------------------------------------


async def test_hung_trainer_loses_its_host_within_the_idle_limit_despite_heartbeats(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
) -> None:
    """With one GPU attempt allowed, the lost host ends the run (tests/test_faults.py: with
    more, it is replaced)."""
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    idle_s = SHORT_DEADLINES.training_idle_s
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory(max_gpu_attempts=1))
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        script = await reach_training(handle)
        last_step_at = await env.get_current_time()
        # Alive but stuck: a heartbeat every minute, always at step 10, until the run ends.
        for _ in range(idle_s // 60 + 3):
            await env.sleep(60)
            current: RunStatus = await handle.query(TrainingWorkflow.status)
            if current.status.terminal:
                break
            await send_all(
                handle, [script.next("heartbeat", HeartbeatData(stage="training", step=10))]
            )
        status, _ = await finish(handle)

    assert status.status == RunStatusName.STALLED
    assert status.error is not None
    assert status.error.message == (
        "no GPU finished the run after 1 attempts: attempt 1 (local): "
        f"no training step for {idle_s} s: its trainer is stuck"
    )
    stalled_after = (status.history[-1].at - last_step_at).total_seconds()
    assert idle_s - 1 <= stalled_after <= idle_s + INSTANCE_CHECK_INTERVAL.total_seconds() + 1
    assert_no_instance_left(provider)


async def test_heartbeats_with_advancing_steps_keep_training_alive(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    idle_s = SHORT_DEADLINES.training_idle_s
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        script = await reach_training(handle)
        for step in range(11, 11 + 2 * idle_s // 60):
            await env.sleep(60)
            await send_all(
                handle, [script.next("heartbeat", HeartbeatData(stage="training", step=step))]
            )
        alive: RunStatus = await handle.query(TrainingWorkflow.status)
        assert alive.status == RunStatusName.TRAINING
        await handle.cancel()
        await finish(handle)
    assert_no_instance_left(provider)


# --------------------------------------------------------------------------------------------
# Cancels and deadlines during allocation and during compensation
# --------------------------------------------------------------------------------------------


class SlowCreateProvider(RecordingProvider):
    """The provider's create takes until the test lets it finish (a slow cloud API)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.create_started = threading.Event()
        self.create_may_finish = threading.Event()

    def create(self, label: str, job_url: str, requirements: Any, **options: Any) -> Any:
        self.create_started.set()
        # Bounded, so a test that failed before letting it go cannot hang the worker's shutdown.
        if not self.create_may_finish.wait(timeout=120):
            raise RuntimeError("the test never let the create finish")
        return super().create(label, job_url, requirements, **options)


async def wait_for_history(
    handle: WorkflowHandle[Any, Any],
    found: Callable[[list[HistoryEvent]], Awaitable[bool]],
    what: str,
    timeout_s: float = 60.0,
) -> None:
    """Poll the run's history (in real time: nothing is skipped) until `found` holds."""
    deadline = time.monotonic() + timeout_s
    while not await found(list((await handle.fetch_history()).events)):
        assert time.monotonic() < deadline, f"no {what} in the history within {timeout_s} s"
        await asyncio.sleep(0.05)


async def cancel_requested(events: list[HistoryEvent]) -> bool:
    requested = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED
    return any(e.event_type == requested for e in events)


async def allocation_cancel_requested(events: list[HistoryEvent]) -> bool:
    """The run asked its allocation to stop. Only then may the slow create finish: an activity
    that completes while the workflow task asking to cancel it is in flight makes the
    time-skipping test server reject that task ("ACTIVITY_UNKNOWN") and stop the run."""
    requested = EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED
    return any(e.event_type == requested for e in events)


def timer_fired(
    client: Client, summary_prefix: str
) -> Callable[[list[HistoryEvent]], Awaitable[bool]]:
    """A history check: a timer whose summary starts with `summary_prefix` has fired."""

    async def fired(events: list[HistoryEvent]) -> bool:
        timers = set()
        for event in events:
            summary = event.user_metadata.summary
            if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED and summary.data:
                (text,) = await client.data_converter.decode([summary], [str])
                if text.startswith(summary_prefix):
                    timers.add(event.event_id)
        return any(
            e.event_type == EventType.EVENT_TYPE_TIMER_FIRED
            and e.timer_fired_event_attributes.started_event_id in timers
            for e in events
        )

    return fired


async def test_cancel_during_allocation_leaves_no_instance(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    provider = SlowCreateProvider(run_settings)
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        try:
            handle = await start_run(client, run_settings, request_factory())
            await wait_until(provider.create_started.is_set)
            await handle.cancel()
            # The cancel is in the run's history while the instance is still being created.
            await wait_for_history(handle, cancel_requested, "cancel request")
            await wait_for_history(handle, allocation_cancel_requested, "allocation cancel")
        finally:
            provider.create_may_finish.set()
        status, _ = await finish(handle)

    assert status.status == RunStatusName.CANCELLED
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def test_pending_deadline_during_allocation_leaves_no_instance(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    provider = SlowCreateProvider(run_settings)
    deadlines = SHORT_DEADLINES.model_copy(update={"pending_s": 3})
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        try:
            handle = await start_run(client, run_settings, request_factory(deadlines=deadlines))
            await wait_until(provider.create_started.is_set)
            # The pending deadline's timer fires while the instance is still being created.
            await wait_for_history(
                handle, timer_fired(client, "stall deadline: pending "), "pending deadline"
            )
            await wait_for_history(handle, allocation_cancel_requested, "allocation cancel")
        finally:
            provider.create_may_finish.set()
        status, _ = await finish(handle)

    assert status.status == RunStatusName.STALLED
    assert status.error is not None
    assert status.error.message == "preparing the run took longer than the pending deadline (3 s)"
    assert status.error.stage == "pending"
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


class FlakyDestroyProvider(RecordingProvider):
    """The provider's destroy fails a few times before it works (an API having a bad minute)."""

    def __init__(self, settings: Settings, failures: int) -> None:
        super().__init__(settings)
        self.failures_left = failures
        self.destroy_calls = 0

    def destroy(self, instance_id: str) -> bool:
        self.destroy_calls += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("provider API unavailable")
        return super().destroy(instance_id)


async def test_cancel_during_compensation_still_destroys_the_gpu(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    env = time_skipping_env
    provider = FlakyDestroyProvider(run_settings, failures=3)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        script = ScriptedEvents(handle.id)
        await send_all(handle, script.happy_path("unused", MODEL_BYTES)[:1])
        await wait_for_status(handle, RunStatusName.PENDING_IMAGES)
        # pendingImages outlives its deadline: the run stalls and starts giving the GPU back.
        await env.sleep(SHORT_DEADLINES.pending_images_s + 5)
        await wait_until(lambda: provider.destroy_calls >= 1)
        await handle.cancel()  # arrives while the destroy is being retried
        status, _ = await finish(handle)

    assert status.status == RunStatusName.STALLED
    assert provider.destroy_calls == 4
    assert_no_instance_left(provider)


# --------------------------------------------------------------------------------------------
# Runner failure, reused run ids, unreadable uploads
# --------------------------------------------------------------------------------------------


async def test_runner_failure_in_training_fails_the_run_and_is_recorded(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        script = await reach_training(handle)
        failure = RunFailedData(stage="training", code="trainer_crashed", message="CUDA OOM")
        await send_all(handle, [script.next("run.failed", failure)])
        status, _ = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-runner-failed-in-training")

    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "trainer_crashed"
    assert_no_instance_left(provider)


async def test_reused_run_id_trains_on_its_own_dataset_and_is_not_held_by_old_webhooks(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    s3: Any,
    tmp_path: Path,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    # Nobody listens here: the first run's webhooks keep retrying for a day.
    webhook = UserWebhook(url=f"http://127.0.0.1:{free_port()}/hooks", secret=USER_SECRET)
    model = local_model(tmp_path)
    run_id = f"reused-{os.getpid()}-{time.monotonic_ns()}"
    counts = {}
    executions: list[str] = []
    async with running_worker(env.client, run_settings, provider):
        for count in (2, 5):
            images = put_dataset(s3, run_settings.bucket, f"uploads/set{count}/", count=count)
            request = make_request(images, model, deadlines=SHORT_DEADLINES, webhook=webhook)
            handle = await start_run(env.client, run_settings, request, run_id=run_id)
            await wait_for_status(handle, RunStatusName.PENDING_GPU)
            key = upload_model(s3, run_settings, handle)
            await send_all(handle, ScriptedEvents(run_id).happy_path(key, MODEL_BYTES))
            status, error = await asyncio.wait_for(finish(handle), timeout=60)
            assert error is None and status.status == RunStatusName.COMPLETED
            zip_key = f"runs/{run_id}/{handle.first_execution_run_id}/images.zip"
            head = s3.head_object(Bucket=run_settings.bucket, Key=zip_key)
            counts[count] = int(head["Metadata"]["image-count"])
            # This run's own webhook children exist, apart from the previous run's.
            child = env.client.get_workflow_handle(
                f"{run_id}/{handle.first_execution_run_id}/webhook/1"
            )
            assert (await child.describe()).id == child.id
            executions.append(handle.first_execution_run_id)
        # Their retries would hold the shared time-skipping server's clock for a day.
        for execution in executions:
            for number in range(1, 30):
                with contextlib.suppress(RPCError):
                    await env.client.get_workflow_handle(
                        f"{run_id}/{execution}/webhook/{number}"
                    ).terminate("test over")

    assert counts == {2: 2, 5: 5}
    # One instance per run (the label names the run id, so the local ids repeat), none left.
    assert len(provider.created) == len(provider.destroyed) == 2
    assert provider.list_instances() == []


async def test_operators_see_the_runs_details_in_the_temporal_ui(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        await reach_training(handle)
        # What the UI's "current details" shows: the SDK's built-in metadata query.
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        await handle.cancel()
        await finish(handle)

    details = metadata.current_details
    assert details.startswith("**training** (GPU attempt 1)"), details
    assert "step 10/20 (50 %), loss 0.2000" in details
    assert "GPU: Test GPU" in details and "cost so far: $" in details
    assert metadata.definition.type == "TrainingWorkflow"


def _expires_s(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


async def test_the_gpus_urls_live_as_long_as_needed_and_the_job_is_deleted_at_the_end(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    deadlines = SHORT_DEADLINES
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        [job_url] = provider.job_urls
        async with httpx.AsyncClient() as http:
            spec = JobSpec.model_validate_json((await http.get(job_url)).content)
        key = upload_model(s3, run_settings, handle)
        await send_all(handle, ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES))
        status, _ = await finish(handle)

    assert status.status == RunStatusName.COMPLETED
    # The job outlives the boot deadline; the upload URL, only the attempt's possible training.
    assert _expires_s(job_url) == deadlines.pending_gpu_s + 600
    runtime_s = deadlines.pending_images_s + deadlines.pending_model_s + deadlines.training_total_s
    assert _expires_s(spec.upload.url) == deadlines.pending_gpu_s + runtime_s
    # The job held the run's secret (and a Civitai key when needed): gone once the run closed.
    prefix = f"runs/{handle.id}/{handle.first_execution_run_id}/"
    left = s3.list_objects_v2(Bucket=run_settings.bucket, Prefix=prefix).get("Contents", [])
    assert [o["Key"] for o in left if o["Key"][len(prefix) :].startswith("job")] == []
    async with httpx.AsyncClient() as http:
        assert (await http.get(job_url)).status_code == 404


def test_unreadable_upload_fails_at_once_instead_of_retrying(settings: Settings, s3: Any) -> None:
    s3.put_object(Bucket=settings.bucket, Key="runs/r/model.safetensors", Body=MODEL_BYTES)
    wrong = settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    storage = StorageActivities(s3_client_for(wrong), wrong)
    with pytest.raises(ApplicationError) as raised:
        storage.verify_upload(
            VerifyUploadInput(
                run_id="r",
                output=S3Location(bucket=settings.bucket, key="runs/r/model.safetensors"),
                bytes=len(MODEL_BYTES),
                sha256="0" * 64,
            )
        )
    assert raised.value.non_retryable
    assert raised.value.type == "UploadUnreadable"
    assert "SignatureDoesNotMatch" in raised.value.message or "403" in raised.value.message


# --------------------------------------------------------------------------------------------
# Updates: never keep a run open, always answered
# --------------------------------------------------------------------------------------------


async def test_wait_for_change_ahead_of_the_run_is_refused_and_waiters_get_answers_at_close(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    provider = RecordingProvider(run_settings)
    async with running_worker(dev_env.client, run_settings, provider):
        handle = await start_run(dev_env.client, run_settings, request_factory())
        current = await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(TrainingWorkflow.wait_for_change, current.version + 100)
        assert "after_version" in str(refused.value.cause)

        # A watcher waiting on the latest version is answered when the run closes.
        now: RunStatus = await handle.query(TrainingWorkflow.status)
        waiter = await handle.start_update(
            TrainingWorkflow.wait_for_change,
            now.version,
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
        )
        await handle.cancel()  # only once the update is accepted, i.e. waiting in the run
        answered = await asyncio.wait_for(waiter.result(), timeout=30)
        status, _ = await asyncio.wait_for(finish(handle), timeout=30)

    assert answered.version > now.version
    assert status.status == RunStatusName.CANCELLED
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert_no_instance_left(provider)


# --------------------------------------------------------------------------------------------
# Bounded history: a long, progress-heavy run with a watcher continues as new
# --------------------------------------------------------------------------------------------

LONG_RUN_SIGNALS = int(os.environ.get("LT_SIGNALS", "6000"))


class Watcher:
    """A `loratrain watch`: long polls by run id (so it follows continue-as-new)."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.handle = client.get_workflow_handle(run_id)
        self.answers = 0

    async def follow(self) -> None:
        version = 0
        while True:
            try:
                status = await self.handle.execute_update(
                    TrainingWorkflow.wait_for_change, version, result_type=RunStatus
                )
            except (RPCError, WorkflowUpdateFailedError):
                await asyncio.sleep(1)  # between two executions: ask the next one
                continue
            self.answers += 1
            version = status.version
            await asyncio.sleep(0.5)  # a display refreshes a few times a second at most


async def _pause_while_handing_over(handle: WorkflowHandle[Any, Any], budget: int) -> None:
    """The sender pauses once the run is due to continue as new, until it has.

    A real runner sends an event every few seconds at most (the relay caps a run at 30 a minute),
    and the server takes a hand-over only from a workflow task that saw every signal; this
    sender fires hundreds a second, so it leaves the gap a runner would leave anyway.
    """
    described = await handle.describe()
    if (described.history_length or 0) < budget:
        return
    deadline = time.monotonic() + 60
    while (await handle.describe()).run_id == described.run_id:
        assert time.monotonic() < deadline, "the run did not continue as new within 60 s"
        await asyncio.sleep(0.1)


async def test_long_progress_heavy_run_with_a_watcher_keeps_every_history_bounded(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any, s3: Any
) -> None:
    client, provider = dev_env.client, RecordingProvider(run_settings)
    request = request_factory(deadlines=Deadlines(training_idle_s=3600))
    async with running_worker(client, run_settings, provider):
        handle = await start_run(client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
        script = await reach_training(handle)
        watcher = Watcher(client, handle.id)
        watching = asyncio.create_task(watcher.follow())
        latest = client.get_workflow_handle(
            handle.id, first_execution_run_id=handle.first_execution_run_id, result_type=RunStatus
        )
        # A few senders at a time, as a runner and its retries would: most signals get a
        # workflow task of their own, the costly case for history.
        for start in range(0, LONG_RUN_SIGNALS, 2):
            batch = [
                script.next(
                    "training.progress",
                    TrainingProgressData(step=step, total=LONG_RUN_SIGNALS, loss=1 / step),
                )
                for step in range(start + 1, start + 3)
            ]
            await asyncio.gather(*(relay_event(latest, e) for e in batch))
            if start % 100 == 0:
                await _pause_while_handing_over(latest, request.continue_as_new_after_events)
        key = upload_model(s3, run_settings, handle)
        await send_all(latest, script.happy_path(key, MODEL_BYTES)[-2:])
        final: RunStatus = await asyncio.wait_for(latest.result(), timeout=120)
        watching.cancel()
        answers = watcher.answers

    assert final.status == RunStatusName.COMPLETED
    assert final.progress is not None and final.progress.step == LONG_RUN_SIGNALS
    assert [c.status for c in final.history] == SEED_ORDER
    assert answers > 0
    executions = [e async for e in client.list_workflows(f"WorkflowId = '{handle.id}'")]
    lengths = []
    for execution in executions:
        one = client.get_workflow_handle(handle.id, run_id=execution.run_id)
        history = await one.fetch_history()
        lengths.append(len(history.events))
    print(
        f"\n{LONG_RUN_SIGNALS} signals, {answers} watcher answers, history events per "
        f"execution: {sorted(lengths)}"
    )
    assert len(executions) >= 2, "the run never continued as new"
    assert max(lengths) < 10_000
    # The user sees one run: one execution that is not a hand-over.
    open_or_final = [e for e in executions if e.status != WorkflowExecutionStatus.CONTINUED_AS_NEW]
    assert len(open_or_final) == 1
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def test_a_run_continues_as_new_with_its_gpu_progress_and_webhooks(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    request = request_factory(continue_as_new_after_events=200)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        script = await reach_training(handle)
        latest = env.client.get_workflow_handle(
            handle.id, first_execution_run_id=handle.first_execution_run_id
        )
        for step in range(11, 311):
            if step % 25 == 0:
                # Runners pause between events (the relay caps a run at 30 a minute); the
                # server takes a hand-over only from a workflow task that saw every signal.
                # A fixed pause is too short on a loaded machine, where each refused hand-over
                # replays a longer history: wait for it, as a runner's gap would.
                await _pause_while_handing_over(latest, request.continue_as_new_after_events)
            progress = TrainingProgressData(step=step, total=400, loss=1 / step)
            await relay_event(latest, script.next("training.progress", progress))
        key = upload_model(s3, run_settings, handle)
        await send_all(latest, script.happy_path(key, MODEL_BYTES)[-2:])
        final = RunStatus.model_validate(await asyncio.wait_for(latest.result(), timeout=60))
        first = env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
        first_history = await first.fetch_history()
        await check_replays(
            run_settings, first, name=f"{CODE_VERSION}-continued-as-new-first-execution"
        )
        await check_replays(
            run_settings, latest, name=f"{CODE_VERSION}-continued-as-new-last-execution"
        )

    assert final.status == RunStatusName.COMPLETED
    assert final.progress is not None and final.progress.step == 310
    assert [c.status for c in final.history] == SEED_ORDER
    # The hand-over waits for a workflow task with no unseen signal: a little past the budget.
    assert len(first_history.events) < 600
    assert first_history.events[-1].HasField("workflow_execution_continued_as_new_event_attributes")
    assert len(provider.created) == 1
    assert_no_instance_left(provider)
