"""The reaper: instances of closed or unknown runs are destroyed, those of open runs never are.

ReaperWorkflow runs on the time-skipping server with the real activities and real local
instances (sleeping child processes); the schedule that starts it needs the dev server.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    WorkflowFailureError,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.providers.base import Instance, instance_label
from activities.providers.procfs import read_stat
from common.settings import Settings
from worker.main import (
    REAPER_INTERVAL,
    REAPER_SCHEDULE_ID,
    ensure_reaper_schedule,
)
from workflows.models import GpuRequirements
from workflows.reaper import REAP_INCOMPLETE, ReaperSummary, ReaperWorkflow

from .workflow_support import RecordingProvider, check_replays, running_worker


@workflow.defn(name="FinishedRun")
class FinishedRun:
    """Stands in for a training run that has already ended."""

    @workflow.run
    async def run(self) -> None:
        return None


@workflow.defn(name="OpenRun")
class OpenRun:
    """Stands in for a training run still in progress, until told to finish."""

    def __init__(self) -> None:
        self._finish = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self._finish)

    @workflow.signal
    def finish(self) -> None:
        self._finish = True


@pytest.fixture
async def provider(run_settings: Settings) -> AsyncIterator[RecordingProvider]:
    provider = RecordingProvider(run_settings)
    yield provider
    # Whatever a test left running (a kept instance, a failed assertion) stops here.
    for instance in provider.list_instances():
        provider.destroy(instance.instance_id)


def rent(provider: RecordingProvider, run_id: str, attempt: int = 1) -> Instance:
    label = instance_label(provider.settings.deployment_name, run_id, attempt)
    return provider.create(label, "http://unused.invalid/job", GPU)


GPU = GpuRequirements()


def process_alive(provider: RecordingProvider, instance_id: str) -> bool:
    record = provider._record(instance_id)
    assert record is not None
    stat = read_stat(record.pid)
    return stat is not None and stat.running and stat.start_ticks == record.start_ticks


@asynccontextmanager
async def stand_in_runs(client: Client, task_queue: str) -> AsyncIterator[None]:
    """A worker for the stand-in runs, on its own queue (the reaper only looks runs up by id)."""
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[FinishedRun, OpenRun],
        # Test-only workflows defined next to pytest: no sandbox needed for them.
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        yield


async def reap(client: Client, settings: Settings, reaper_id: str | None = None) -> ReaperSummary:
    handle = await client.start_workflow(
        ReaperWorkflow.run,
        id=reaper_id or f"reaper-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
    )
    summary = await handle.result()
    await check_replays(settings, handle, record=reaper_id is not None)
    return summary


async def test_reaper_destroys_instances_of_closed_and_unknown_runs_and_keeps_open_ones(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
) -> None:
    client = time_skipping_env.client
    no_skipping = time_skipping_env.auto_time_skipping_disabled
    runs_queue = f"{run_settings.task_queue}-runs"
    unknown_run = f"run-unknown-{uuid.uuid4().hex[:8]}"
    finished_run = f"run-finished-{uuid.uuid4().hex[:8]}"
    open_run = f"run-open-{uuid.uuid4().hex[:8]}"

    # Real time here: skipping it would time the open run out (the test server's default
    # 10-year execution timeout is the only timer it has).
    async with (
        stand_in_runs(client, runs_queue),
        running_worker(client, run_settings, provider),
    ):
        await client.execute_workflow(FinishedRun.run, id=finished_run, task_queue=runs_queue)
        open_handle = await client.start_workflow(OpenRun.run, id=open_run, task_queue=runs_queue)

        unknown = rent(provider, unknown_run)
        finished = [rent(provider, finished_run, 1), rent(provider, finished_run, 2)]
        still_training = rent(provider, open_run)
        # Not labelled loratrain:<deployment>:<run>:<attempt>: not ours to judge, never destroyed.
        foreign = provider.create("someone-else:box", "http://unused.invalid/job", GPU)
        # Another deployment's orphan on the same account: its own reaper's business.
        neighbours = provider.create(
            instance_label("another.deployment", unknown_run, 1), "http://unused.invalid/job", GPU
        )
        assert all(process_alive(provider, i.instance_id) for i in provider.list_instances())

        with no_skipping():
            summary = await reap(client, run_settings, "reaper-pass-1")

        orphans = sorted([unknown.instance_id] + [i.instance_id for i in finished])
        assert sorted(summary.destroyed) == orphans
        assert summary.kept == [still_training.instance_id]
        assert summary.instances_seen == 4
        assert summary.already_gone == [] and summary.unsettled == []
        assert sorted(provider.destroyed) == orphans
        for instance_id in orphans:
            current = provider.get(instance_id)
            assert current is not None and current.state == "gone"
            assert not process_alive(provider, instance_id)
        current = provider.get(still_training.instance_id)
        assert current is not None and current.state == "running"
        assert process_alive(provider, still_training.instance_id)
        assert process_alive(provider, foreign.instance_id)
        assert process_alive(provider, neighbours.instance_id)

        # The open run's GPU is kept pass after pass, until the run closes.
        with no_skipping():
            again = await reap(client, run_settings)
        assert again.kept == [still_training.instance_id] and again.destroyed == []
        await open_handle.signal(OpenRun.finish)
        await open_handle.result()
        with no_skipping():
            closed = await reap(client, run_settings)

    assert closed.destroyed == [still_training.instance_id]
    assert not process_alive(provider, still_training.instance_id)
    assert sorted(provider.destroyed) == sorted([*orphans, still_training.instance_id])
    left = sorted(i.instance_id for i in provider.list_instances())
    assert left == sorted([foreign.instance_id, neighbours.instance_id])


async def test_reaper_with_nothing_to_do_destroys_nothing(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
) -> None:
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        summary = await reap(client, run_settings)
    assert summary == ReaperSummary()
    assert provider.destroyed == []


class FailingDestroyProvider(RecordingProvider):
    """Destroying one instance keeps failing (the provider's API is down for it, say)."""

    def __init__(self, settings: Settings, failing: set[str]) -> None:
        super().__init__(settings)
        self.failing = failing

    def destroy(self, instance_id: str) -> bool:
        if instance_id in self.failing:
            raise ApplicationError(f"provider refused to destroy {instance_id}", type="Down")
        return super().destroy(instance_id)


async def test_a_failing_destroy_fails_the_pass_after_reaping_everything_else(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
) -> None:
    client = time_skipping_env.client
    stuck = rent(provider, f"run-a-{uuid.uuid4().hex[:8]}")
    reaped = rent(provider, f"run-b-{uuid.uuid4().hex[:8]}")
    failing = FailingDestroyProvider(run_settings, {stuck.instance_id})
    async with running_worker(client, run_settings, failing):
        with pytest.raises(WorkflowFailureError) as raised:
            await reap(client, run_settings)

    error = raised.value.cause
    assert isinstance(error, ApplicationError) and error.type == REAP_INCOMPLETE
    summary = ReaperSummary.model_validate(error.details[0])
    assert summary.destroyed == [reaped.instance_id]
    assert summary.unsettled == [stuck.instance_id]
    assert failing.destroyed == [reaped.instance_id]
    assert process_alive(provider, stuck.instance_id)


async def test_reaper_schedule_is_created_once_and_runs_the_reaper(
    dev_env: WorkflowEnvironment,
    run_settings: Settings,
    provider: RecordingProvider,
) -> None:
    client = dev_env.client
    try:
        first = await ensure_reaper_schedule(client, run_settings)
        await first.pause(note="paused by an operator")
        # Idempotent: a second worker start updates the schedule and keeps the operator's pause.
        handle = await ensure_reaper_schedule(client, run_settings)
        assert handle.id == REAPER_SCHEDULE_ID
        schedules = [s.id async for s in await client.list_schedules()]
        assert schedules.count(REAPER_SCHEDULE_ID) == 1

        description = await handle.describe()
        schedule = description.schedule
        assert schedule.spec.intervals == [ScheduleIntervalSpec(every=REAPER_INTERVAL)]
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert schedule.state.paused and schedule.state.note == "paused by an operator"
        action = schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert action.workflow == "ReaperWorkflow"
        assert action.task_queue == run_settings.task_queue

        # What the schedule starts really reaps: an instance whose run never existed goes.
        await handle.unpause()
        orphan = rent(provider, f"run-gone-{uuid.uuid4().hex[:8]}")
        async with running_worker(client, run_settings, provider):
            await handle.trigger()
            await wait_until(lambda: provider.destroyed == [orphan.instance_id])
        assert not process_alive(provider, orphan.instance_id)
    finally:
        await client.get_schedule_handle(REAPER_SCHEDULE_ID).delete()


async def wait_until(condition: Any, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def in_words(interval: timedelta) -> str:
    """'minute', '5 minutes', '30 seconds': how the README says an interval."""
    seconds = int(interval.total_seconds())
    count, unit = (seconds // 60, "minute") if seconds % 60 == 0 else (seconds, "second")
    return unit if count == 1 else f"{count} {unit}s"


def test_the_readme_says_how_often_the_reaper_runs() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    said = re.findall(r"Temporal Schedule `loratrain-reaper`, every ([^,]+),", readme)
    assert said == [in_words(REAPER_INTERVAL)], "README.md: the reaper's interval"
