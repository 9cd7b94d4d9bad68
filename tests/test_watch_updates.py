"""A watcher's long poll returns at the watcher's own wait: no update outlives its caller, so a
watcher attached for hours to a run that does not change never fills the server's limit of
in-flight updates per run (10)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from common.settings import Settings
from workflows.models import RunStatus, RunStatusName
from workflows.training import MAX_WATCH_WAIT_S, TrainingWorkflow

from .test_workflow import finish
from .workflow_support import (
    RecordingProvider,
    running_worker,
    start_run,
    wait_for_status,
)

# More polls than the server keeps in flight for one run.
POLLS = 12
WAIT_S = 0.5


async def test_each_wait_for_change_returns_at_its_callers_wait_on_a_quiet_run(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    provider = RecordingProvider(run_settings)
    request = request_factory()
    async with running_worker(dev_env.client, run_settings, provider):
        handle = await start_run(dev_env.client, run_settings, request)
        quiet = await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)

        for _ in range(POLLS):
            started = time.monotonic()
            async with asyncio.timeout(60):
                answered: RunStatus = await handle.execute_update(
                    TrainingWorkflow.wait_for_change, args=[quiet.version, WAIT_S]
                )
            assert time.monotonic() - started >= WAIT_S * 0.9
            assert answered.version == quiet.version  # unchanged: the watcher asks again

        for wrong in (0, -1, MAX_WATCH_WAIT_S + 1):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await handle.execute_update(
                    TrainingWorkflow.wait_for_change, args=[quiet.version, wrong]
                )
            assert "wait_s must be above 0" in str(refused.value.cause)

        # A change still answers at once, long before the wait.
        waiter = asyncio.create_task(
            handle.execute_update(TrainingWorkflow.wait_for_change, args=[quiet.version, 600.0])
        )
        await handle.cancel()
        changed: RunStatus = await asyncio.wait_for(waiter, timeout=30)
        status, _ = await asyncio.wait_for(finish(handle), timeout=60)

    assert changed.version > quiet.version
    assert status.status == RunStatusName.CANCELLED
