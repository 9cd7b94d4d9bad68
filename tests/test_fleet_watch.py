"""The fleet watch (activities/fleet.py, workflows/fleet.py) on the dev server, in real time.

One listing per interval for the whole deployment; a run hears of its host only when the host
exited or went, asks the provider once to confirm, and replaces it. Its own checks (once
FIRST_INSTANCE_CHECK after it rents, then every INSTANCE_BACKSTOP) come after these tests' deaths.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.fleet import HOST_DOWN_SIGNAL
from activities.providers.base import Instance
from common.settings import Settings
from worker.main import ensure_fleet_watch, fleet_watch_id, keep_fleet_watch
from workflows.models import Deadlines, RunStatus
from workflows.training import INSTANCE_BACKSTOP, TrainingWorkflow

from .test_lifecycle import kill_instance, wait_until
from .workflow_support import (
    CODE_VERSION,
    RecordingProvider,
    check_replays,
    running_worker,
    started_in_training,
)

# Every deadline past the test: only the fleet watch can end attempt 1.
LONG_DEADLINES = Deadlines(
    pending_s=3600,
    pending_gpu_s=3600,
    pending_images_s=3600,
    pending_model_s=3600,
    training_idle_s=3600,
    training_total_s=7200,
)


class CountingProvider(RecordingProvider):
    """Counts the provider calls: one listing per watch pass, `get` only per run's check."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gets = 0
        self.listings = 0

    def get(self, instance_id: str) -> Instance | None:
        self.gets += 1
        return super().get(instance_id)

    def list_instances(self, label_prefix: str = "") -> list[Instance]:
        self.listings += 1
        return super().list_instances(label_prefix)

    def sees_dead(self, instance_id: str) -> bool:
        """The test's own look, not counted."""
        current = super().get(instance_id)
        return current is None or current.state in ("exited", "gone")


@pytest.fixture
def watched_settings(run_settings: Settings) -> Settings:
    return run_settings.model_copy(
        update={"fleet_watch_interval_s": 0.5, "relay_health_check": False}
    )


async def told_host_down(handle: Any) -> bool:
    """Whether the fleet watch's `host_down` reached the run (its history has the signal)."""
    async for event in handle.fetch_history_events():
        signalled = event.workflow_execution_signaled_event_attributes
        if signalled.signal_name == HOST_DOWN_SIGNAL:
            return True
    return False


@asynccontextmanager
async def fleet_watch(client: Client, settings: Settings) -> AsyncIterator[str]:
    watch_id = await ensure_fleet_watch(client, settings)
    try:
        yield watch_id
    finally:
        await client.get_workflow_handle(watch_id).terminate("test over")


def host_goes(how: str, provider: CountingProvider, instance_id: str) -> None:
    if how == "exits":
        kill_instance(provider, instance_id)
    else:
        # Gone from the provider's listing, as a host Vast took back.
        provider.destroy(instance_id)


@pytest.mark.parametrize("how", ["exits", "goes"])
async def test_a_host_that_dies_is_told_by_the_fleet_watch_and_replaced(
    dev_env: WorkflowEnvironment,
    watched_settings: Settings,
    request_factory: Any,
    how: str,
) -> None:
    settings, client = watched_settings, dev_env.client
    provider = CountingProvider(settings)
    async with running_worker(client, settings, provider), fleet_watch(client, settings):
        handle, _ = await started_in_training(
            client, settings, request_factory(deadlines=LONG_DEADLINES)
        )
        try:
            # Once the watch has listed the host (one gone before that is the run's own first
            # look's to find, FIRST_INSTANCE_CHECK after it rents).
            listed = provider.listings
            await wait_until(lambda: provider.listings > listed)
            gets_before = provider.gets
            host_goes(how, provider, provider.created[0])
            await wait_until(lambda: provider.sees_dead(provider.created[0]))
            died_at = time.monotonic()
            await wait_until(lambda: len(provider.created) == 2, timeout_s=60)
            seconds_to_replacement = time.monotonic() - died_at
            status: RunStatus = await handle.query(TrainingWorkflow.status)
            told = await told_host_down(handle)
        finally:
            await handle.terminate("test over")
        await check_replays(settings, handle, name=f"{CODE_VERSION}-host-{how}-told")

    assert told  # the watch, not the run's own first look (FIRST_INSTANCE_CHECK), found it
    assert status.attempt == 2
    assert len(status.gpu_failures) == 1
    assert ("exited" if how == "exits" else "gone") in status.gpu_failures[0]
    # Far inside the run's own backstop: the watch told it.
    assert seconds_to_replacement < INSTANCE_BACKSTOP.total_seconds() / 10
    # The run asked the provider about its host once: to confirm what the watch saw.
    assert provider.gets - gets_before == 1
    assert provider.listings >= 2


async def test_the_watch_goes_on_on_the_next_worker(
    dev_env: WorkflowEnvironment,
    watched_settings: Settings,
    request_factory: Any,
) -> None:
    settings, client = watched_settings, dev_env.client
    first = CountingProvider(settings)
    async with fleet_watch(client, settings) as watch_id:
        async with running_worker(client, settings, first):
            handle, _ = await started_in_training(
                client, settings, request_factory(deadlines=LONG_DEADLINES)
            )
            await wait_until(lambda: first.listings >= 2)
        # The first worker stopped; the same watch (one workflow) now runs on the second.
        second = CountingProvider(settings)
        try:
            async with running_worker(client, settings, second):
                await wait_until(lambda: second.listings >= 1, timeout_s=60)
                kill_instance(second, first.created[0])
                await wait_until(lambda: len(second.created) == 1, timeout_s=60)
                status: RunStatus = await handle.query(TrainingWorkflow.status)
                told = await told_host_down(handle)
        finally:
            await handle.terminate("test over")
        watch = client.get_workflow_handle(watch_id)
        described = await watch.describe()
    await check_replays(settings, watch, name=f"{CODE_VERSION}-fleet-watch")

    assert told and status.attempt == 2 and "exited" in status.gpu_failures[0]
    assert described.status == WorkflowExecutionStatus.RUNNING
    # A round is one activity: the watch's history stays a handful of events.
    assert described.history_length < 20


async def test_a_worker_starts_a_stopped_watch_again(
    dev_env: WorkflowEnvironment, watched_settings: Settings
) -> None:
    settings = watched_settings.model_copy(update={"fleet_watch_ensure_s": 0.2})
    client = dev_env.client
    watch = client.get_workflow_handle(fleet_watch_id(settings))
    runs: list[str] = []

    async def watch_runs_again() -> bool:
        try:
            described = await watch.describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:  # not started yet
                return False
            raise
        if described.status == WorkflowExecutionStatus.RUNNING and described.run_id not in runs:
            runs.append(described.run_id)
        return described.status == WorkflowExecutionStatus.RUNNING

    keeping = asyncio.create_task(keep_fleet_watch(client, settings))
    try:
        await wait_until_async(watch_runs_again)
        await watch.terminate("an operator stopped it")
        await wait_until_async(lambda: _new_run(watch_runs_again, runs))
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        await watch.terminate("test over")

    assert len(runs) == 2  # the terminated watch, then the one the worker started again


async def _new_run(running: Any, runs: list[str]) -> bool:
    return await running() and len(runs) == 2


async def wait_until_async(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
