"""Cost edges: no GPU is rented past the budget, nothing is billed while the upload is verified,
billing counts from the host's creation, and a destroy that never converges is reported with the
instance id while the reaper keeps at it."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from activities.providers.base import Instance
from common.settings import Settings
from gpu_runner.protocol import RunFailedData
from workflows.models import Deadlines, GpuRequirements, RunStatusName
from workflows.reaper import ReaperWorkflow
from workflows.training import DESTROY_LIMIT

from .test_workflow import MODEL_BYTES, assert_no_instance_left, finish, send_all, upload_model
from .workflow_support import (
    CODE_VERSION,
    SHORT_DEADLINES,
    RecordingProvider,
    ScriptedEvents,
    check_replays,
    running_worker,
    start_run,
    wait_for_status,
)


class PricedProvider(RecordingProvider):
    """Local instances billed at `dollars_per_hour`, created `create_s` before the answer."""

    def __init__(self, settings: Settings, dollars_per_hour: float, create_s: float = 0) -> None:
        super().__init__(settings)
        self.dollars_per_hour = dollars_per_hour
        self.create_s = create_s
        self.created_at: list[datetime] = []

    def create(self, label: str, job_url: str, requirements: Any, **options: Any) -> Instance:
        created_at = datetime.now(UTC)
        instance = super().create(label, job_url, requirements, **options)
        self.created_at.append(created_at)
        time.sleep(self.create_s)  # a slow API: the host exists, and is billed, meanwhile
        return instance.model_copy(
            update={"dollars_per_hour": self.dollars_per_hour, "created_at": created_at}
        )


class UndestroyableProvider(RecordingProvider):
    """A provider whose destroy call fails every time (an API that keeps answering 500)."""

    def destroy(self, instance_id: str) -> bool:
        raise RuntimeError(f"HTTP 500 destroying {instance_id}")


def runner_failed() -> RunFailedData:
    return RunFailedData(stage="gpu", code="no_cuda", message="no CUDA device on this host")


async def test_no_replacement_gpu_is_rented_when_the_budget_left_cannot_pay_for_it(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    """$1/h host, $3/h allowed, $0.20 cap: after 8 minutes $0.067 is left, less than two minutes
    of a $3/h GPU, so the host that fails then is not replaced."""
    env, provider = time_skipping_env, PricedProvider(run_settings, dollars_per_hour=1.0)
    request = request_factory(
        max_cost_usd=0.2,
        gpu=GpuRequirements(max_dollars_per_hour=3.0),
        deadlines=SHORT_DEADLINES.model_copy(update={"pending_gpu_s": 3600}),
    )
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        await env.sleep(8 * 60)
        await send_all(handle, [ScriptedEvents(handle.id).next("run.failed", runner_failed())])
        status, _ = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-no-rental-past-budget")

    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "cost_cap"
    assert status.error.message.startswith("not renting GPU attempt 2: $0.1")
    assert "a GPU at up to $3.0/h would cross it" in status.error.message
    assert len(provider.created) == 1
    assert_no_instance_left(provider)


async def test_the_gpu_is_given_back_before_the_upload_is_verified(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env, provider = time_skipping_env, RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, provider):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        key = upload_model(s3, run_settings, handle)
        await send_all(handle, ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES))
        status, _ = await finish(handle)
        history = await handle.fetch_history()

    assert status.status == RunStatusName.COMPLETED
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled.index("deallocate_gpu") < scheduled.index("verify_upload"), scheduled
    assert status.gpu is not None and len(provider.destroyed) == 1
    assert_no_instance_left(provider)


async def test_billing_starts_when_the_host_was_created_not_when_the_rental_returned(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    """On the dev server (real time): the provider's API answers 2 s after creating the host."""
    provider = PricedProvider(run_settings, dollars_per_hour=1.0, create_s=2)
    async with running_worker(dev_env.client, run_settings, provider):
        handle = await start_run(dev_env.client, run_settings, request_factory())
        status = await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
        await handle.cancel()
        await finish(handle)

    assert status.gpu is not None and status.gpu.started_at == provider.created_at[0]


async def test_a_destroy_that_never_converges_fails_the_run_naming_the_instance(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    env = time_skipping_env
    stuck = UndestroyableProvider(run_settings)
    async with running_worker(env.client, run_settings, stuck):
        handle = await start_run(env.client, run_settings, request_factory())
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        # The host fails before it is ready: it is to be replaced, but will not go.
        await send_all(handle, [ScriptedEvents(handle.id).next("run.failed", runner_failed())])
        status, _ = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-gpu-not-released")
    (instance_id,) = stuck.created

    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "gpu_not_released"
    limit_min = int(DESTROY_LIMIT.total_seconds() // 60)
    assert status.error.message.startswith(
        f"GPU instance {instance_id} (local) could not be destroyed within {limit_min} min"
    )
    assert f"HTTP 500 destroying {instance_id}" in status.error.message
    assert status.error.message.endswith("the reaper keeps trying")
    assert status.gpu_not_released is not None and len(stuck.created) == 1

    # Once the provider answers again, the reaper destroys what the closed run left.
    working = RecordingProvider(run_settings)
    async with running_worker(env.client, run_settings, working):
        reaper = await env.client.start_workflow(
            ReaperWorkflow.run,
            id=f"reaper-{uuid.uuid4().hex[:8]}",
            task_queue=run_settings.task_queue,
        )
        summary = await reaper.result()
    assert summary.destroyed == [instance_id]
    assert working.list_instances() == []


async def test_an_undestroyable_gpu_at_the_end_is_reported_and_the_outcome_stands(
    time_skipping_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    """A cancelled run whose GPU will not go: still cancelled (the user's word), and the status
    names the GPU left for the reaper."""
    env = time_skipping_env
    stuck = UndestroyableProvider(run_settings)
    request = request_factory(deadlines=Deadlines(pending_gpu_s=3600))
    async with running_worker(env.client, run_settings, stuck):
        handle = await start_run(env.client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        await handle.cancel()
        status, _ = await finish(handle)
    working = RecordingProvider(run_settings)  # what the reaper would do once it answers
    for instance in working.list_instances():
        working.destroy(instance.instance_id)

    assert status.status == RunStatusName.CANCELLED
    assert status.gpu_not_released is not None
    assert status.gpu_not_released.startswith(f"GPU instance {stuck.created[0]} could not be")
