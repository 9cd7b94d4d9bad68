"""TrainingWorkflow on the time-skipping server with the real activities (local S3, local GPUs).

Runner events are sent as signals here; the relay path is covered by the integration test.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment

from activities.providers.base import Instance
from common.settings import Settings
from gpu_runner.protocol import RunFailedData, RunnerEvent
from gpu_runner.trainers.sd_scripts import disk_needed_gb, vram_needed_gb
from workflows.models import GpuRequirements, RunStatus, RunStatusName, S3Prefix
from workflows.training import TrainingWorkflow

from .fake_civitai import checkpoint_bytes
from .workflow_support import (
    CODE_VERSION,
    PNG,
    SEED_ORDER,
    SHORT_DEADLINES,
    RecordingProvider,
    ScriptedEvents,
    check_replays,
    local_model,
    make_request,
    relay_event,
    running_worker,
    start_run,
    wait_for_status,
)

MODEL_BYTES = b"trained-lora-weights" * 100


@pytest.fixture
def provider(run_settings: Settings) -> RecordingProvider:
    return RecordingProvider(run_settings)


def assert_no_instance_left(provider: RecordingProvider) -> None:
    assert provider.list_instances() == []
    assert sorted(provider.destroyed) == sorted(set(provider.created))
    for instance_id in provider.created:
        current = provider.get(instance_id)
        assert current is None or current.state in ("exited", "gone")


async def finish(handle: WorkflowHandle[Any, Any]) -> tuple[RunStatus, BaseException | None]:
    try:
        await handle.result()
        error = None
    except WorkflowFailureError as e:
        error = e.cause
    return await handle.query(TrainingWorkflow.status), error


async def send_all(handle: WorkflowHandle[Any, Any], events: list[RunnerEvent]) -> None:
    for event in events:
        await relay_event(handle, event)


async def start_and_reach(
    client: Any, settings: Settings, request: Any, status: RunStatusName, ready_events: int
) -> tuple[WorkflowHandle[Any, Any], ScriptedEvents]:
    """Start a run, play the first `ready_events` of a happy path, wait until it is in `status`."""
    handle = await start_run(client, settings, request)
    await wait_for_status(handle, RunStatusName.PENDING_GPU)
    script = ScriptedEvents(handle.id)
    await send_all(handle, script.happy_path("unused", MODEL_BYTES)[:ready_events])
    await wait_for_status(handle, status)
    return handle, script


def upload_model(s3: Any, settings: Settings, handle: WorkflowHandle[Any, Any]) -> str:
    """Upload where the run's job told the runner to: under the run's first execution."""
    key = f"runs/{handle.id}/{handle.first_execution_run_id}/model/lora.safetensors"
    s3.put_object(Bucket=settings.bucket, Key=key, Body=MODEL_BYTES)
    return key


# Events that move a run from pendingGpu into the named status.
READY_EVENTS = {
    RunStatusName.PENDING_GPU: 0,
    RunStatusName.PENDING_IMAGES: 1,
    RunStatusName.PENDING_MODEL: 2,
    RunStatusName.TRAINING: 4,
}


@pytest.mark.parametrize("stalled_in", list(READY_EVENTS))
async def test_stall_in_each_gpu_status_ends_stalled_with_gpu_destroyed(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
    request_factory: Any,
    stalled_in: RunStatusName,
) -> None:
    client = time_skipping_env.client
    # A stuck trainer is a lost host, replaced like a GPU that never boots: with one attempt
    # allowed, the run stalls where it stuck (tests/test_faults.py replaces it).
    attempts = 1 if stalled_in == RunStatusName.TRAINING else 2
    async with running_worker(client, run_settings, provider):
        handle, _ = await start_and_reach(
            client,
            run_settings,
            request_factory(max_gpu_attempts=attempts),
            stalled_in,
            READY_EVENTS[stalled_in],
        )
        status, error = await finish(handle)
        await check_replays(
            run_settings, handle, name=f"{CODE_VERSION}-stalled-in-{stalled_in.value}"
        )

    assert status.status == RunStatusName.STALLED
    assert status.error is not None and status.error.code == "stalled"
    assert status.error.stage == stalled_in.value
    assert isinstance(error, ApplicationError) and error.type == "RunStalled"
    # A GPU that never became ready is replaced once (max_gpu_attempts=2) before the stall.
    expected_instances = 2 if stalled_in == RunStatusName.PENDING_GPU else 1
    assert len(provider.created) == expected_instances
    assert_no_instance_left(provider)
    assert [c.status for c in status.history][-1] == RunStatusName.STALLED


async def test_stall_while_pending_when_no_gpu_can_be_rented(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    tmp_path: Path,
) -> None:
    broken = run_settings.model_copy(
        update={"local_runner_command": [str(tmp_path / "no-such-runner")]}
    )
    provider = RecordingProvider(broken)
    client = time_skipping_env.client
    async with running_worker(client, broken, provider):
        handle = await start_run(client, broken, request_factory())
        status, error = await finish(handle)
        await check_replays(broken, handle, name=f"{CODE_VERSION}-stalled-in-pending")

    assert status.status == RunStatusName.STALLED
    assert status.error is not None and status.error.stage == "pending"
    assert isinstance(error, ApplicationError) and error.type == "RunStalled"
    assert provider.created == []
    assert_no_instance_left(provider)


async def test_runner_failure_ends_failed_with_runner_message(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
    request_factory: Any,
) -> None:
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        handle, script = await start_and_reach(
            client, run_settings, request_factory(), RunStatusName.TRAINING, 4
        )
        failure = RunFailedData(
            stage="training",
            code="loss_diverged",
            message="loss became NaN at step 7",
            log_tail=["steps: 58%", "loss=nan"],
        )
        await send_all(handle, [script.next("run.failed", failure)])
        status, error = await finish(handle)

    assert status.status == RunStatusName.FAILED
    assert status.error is not None
    assert status.error.message == "loss became NaN at step 7"
    assert status.error.code == "loss_diverged"
    assert status.error.log_tail == ["steps: 58%", "loss=nan"]
    assert isinstance(error, ApplicationError) and error.type == "RunFailed"
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def test_cancel_during_training_ends_cancelled_with_gpu_destroyed(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
    request_factory: Any,
) -> None:
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        handle, _ = await start_and_reach(
            client, run_settings, request_factory(), RunStatusName.TRAINING, 5
        )
        await handle.cancel()
        status, error = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-cancelled-in-training")

    assert isinstance(error, CancelledError)
    assert status.status == RunStatusName.CANCELLED
    assert status.progress is not None and status.progress.step == 10
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def run_with_events(
    env: WorkflowEnvironment,
    settings: Settings,
    provider: RecordingProvider,
    request: Any,
    s3: Any,
    arrange: Any,
) -> RunStatus:
    client = env.client
    async with running_worker(client, settings, provider):
        handle = await start_run(client, settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        key = upload_model(s3, settings, handle)
        events = ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES)
        await send_all(handle, arrange(events))
        status, error = await finish(handle)
        await check_replays(settings, handle, name=f"{CODE_VERSION}-completed-run")
    assert error is None, error
    return status


async def test_duplicated_and_shuffled_events_reach_the_same_final_state(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    in_order = await run_with_events(
        time_skipping_env,
        run_settings,
        RecordingProvider(run_settings),
        request_factory(),
        s3,
        lambda events: events,
    )

    def duplicated_and_shuffled(events: list[RunnerEvent]) -> list[RunnerEvent]:
        tripled = events * 3
        random.Random(7).shuffle(tripled)
        return tripled

    provider = RecordingProvider(run_settings)
    shuffled = await run_with_events(
        time_skipping_env, run_settings, provider, request_factory(), s3, duplicated_and_shuffled
    )

    def outcome(status: RunStatus) -> dict[str, Any]:
        return status.model_dump(
            include={"status", "progress", "epoch_losses", "best_checkpoint", "attempt"}
        ) | {"result": status.result and status.result.model_dump(exclude={"location"})}

    assert in_order.status == RunStatusName.COMPLETED
    assert outcome(shuffled) == outcome(in_order)
    # The status still walks the seed's order, whatever order the events came in.
    assert [c.status for c in shuffled.history] == SEED_ORDER
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def test_events_that_wake_the_run_cancel_no_timer(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    """Each event that moves the run wakes its loop; the loop's timer stands and is waited on
    again, so an event costs one workflow task and no timer is cancelled once the GPU is rented
    (a cancel that races the timer firing stops the run on the time-skipping server)."""
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        key = upload_model(s3, run_settings, handle)
        events = ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES)
        for event in events[:-1]:
            await relay_event(handle, event)
            await wait_for_status(handle, event_status(event))
        await relay_event(handle, events[-1])
        status, error = await finish(handle)
        history = await handle.fetch_history()

    assert error is None and status.status == RunStatusName.COMPLETED
    rented_at = next(
        e.event_id
        for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name == "allocate_gpu"
    )
    started = {
        e.timer_started_event_attributes.timer_id: e.event_id
        for e in history.events
        if e.HasField("timer_started_event_attributes")
    }
    cancelled = [
        e.timer_canceled_event_attributes.timer_id
        for e in history.events
        if e.HasField("timer_canceled_event_attributes")
    ]
    assert [t for t in cancelled if started[t] > rented_at] == []
    # One timer per wake-up that was not an event's, not one per event.
    after_rental = [t for t, at in started.items() if at > rented_at]
    assert len(after_rental) <= 2, after_rental


async def test_the_gpu_is_sized_for_the_models_family(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    tmp_path: Path,
) -> None:
    """An SDXL checkpoint (named like any file: its header says SDXL) with the request asking
    for 4 GB: the offer search is asked for what SDXL's defaults need, not 4 GB."""
    model = tmp_path / "random-base.safetensors"
    model.write_bytes(checkpoint_bytes("sdxl"))
    request = request_factory(gpu=GpuRequirements(min_vram_gb=4, disk_gb=10)).model_copy(
        update={"model": str(model)}
    )
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        await handle.cancel()
        status, _ = await finish(handle)

    assert status.status == RunStatusName.CANCELLED
    (asked,) = provider.requirements
    config = request.training.for_family("sdxl")
    assert asked.min_vram_gb == vram_needed_gb("sdxl", None, config) > 4
    assert asked.disk_gb == disk_needed_gb("sdxl", config, model.stat().st_size) > 10


def event_status(event: RunnerEvent) -> RunStatusName:
    """The status a run shows once the happy path's `event` arrived."""
    return {
        "gpu.ready": RunStatusName.PENDING_IMAGES,
        "images.ready": RunStatusName.PENDING_MODEL,
        "model.ready": RunStatusName.PENDING_MODEL,
    }.get(event.type, RunStatusName.TRAINING)


class RaisingAfterCreateProvider(RecordingProvider):
    """Creates the instance, then fails the call: the provider answered garbage, say."""

    def create(self, label: str, job_url: str, requirements: Any, **options: Any) -> Instance:
        super().create(label, job_url, requirements, **options)
        raise ApplicationError(
            "provider answered garbage", type="ProviderError", non_retryable=True
        )


async def test_instance_created_by_a_failing_allocation_is_not_left_behind(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
) -> None:
    provider = RaisingAfterCreateProvider(run_settings)
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        handle = await start_run(client, run_settings, request_factory())
        status, _ = await finish(handle)

    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "ProviderError"
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(20)

# Each bad dataset: the files under the prefix, the settings changed, the names the error must list.
BAD_DATASETS: dict[str, tuple[dict[str, bytes], dict[str, Any], list[str]]] = {
    "empty prefix": ({}, {}, ["no images under"]),
    "a GIF": ({"ok.png": PNG, "cat.gif": GIF}, {}, ["cat.gif"]),
    "not really a PNG": ({"ok.png": PNG, "fake.png": b"plain text"}, {}, ["fake.png"]),
    "a PNG that does not decode": (
        {"ok.png": PNG, "broken.png": PNG[:16] + bytes(64)},
        {},
        ["broken.png", "cannot be decoded"],
    ),
    "too many files": (
        {f"img{i}.png": PNG for i in range(4)},
        {"max_images": 3},
        ["4 images", "limit of 3"],
    ),
    "a file over the limit": (
        {"ok.png": PNG, "huge.png": PNG + bytes(4096)},
        {"max_image_bytes": 1024},
        ["huge.png"],
    ),
    "several problems at once": (
        {"ok.png": PNG, "a.gif": GIF, "b.png": b"text", "c.bmp": b"BM" + bytes(8)},
        {},
        ["a.gif", "b.png", "c.bmp"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
async def test_bad_dataset_fails_the_run_before_any_gpu(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    s3: Any,
    tmp_path: Path,
    case: str,
) -> None:
    files, limits, named = BAD_DATASETS[case]
    prefix = "uploads/bad/"
    for name, body in files.items():
        s3.put_object(Bucket=run_settings.bucket, Key=prefix + name, Body=body)
    limited = run_settings.model_copy(update=limits)
    provider = RecordingProvider(limited)
    request = make_request(
        S3Prefix(bucket=limited.bucket, prefix=prefix),
        local_model(tmp_path),
        deadlines=SHORT_DEADLINES,
    )
    async with running_worker(time_skipping_env.client, limited, provider):
        handle = await start_run(time_skipping_env.client, limited, request)
        status, error = await finish(handle)
        if case == "a PNG that does not decode":  # found while zipping, since v4
            await check_replays(limited, handle, name=f"{CODE_VERSION}-bad-dataset")

    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "InvalidDataset"
    for name in named:
        assert name in status.error.message, status.error.message
    assert isinstance(error, ApplicationError) and error.type == "RunFailed"
    assert provider.created == []
    assert [c.status for c in status.history] == [RunStatusName.PENDING, RunStatusName.FAILED]
