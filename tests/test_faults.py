"""Faults end right: a trainer alive without steps is a lost host, replaced while attempts remain;
a deadline that passes while our own relay is down waits for the relay instead of stalling a
healthy run. Time-skipping server, the real relay over HTTP for its health."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.testing import WorkflowEnvironment

from activities.relay import RelayActivities
from common.settings import Settings
from gpu_runner.protocol import TrainingProgressData
from relay.app import create_app
from workflows.models import RunStatus, RunStatusName
from workflows.training import RELAY_RECHECK, TrainingWorkflow

from .conftest import free_port
from .http_support import serve_asgi
from .test_lifecycle import reach_training, wait_until
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

IDLE_S = SHORT_DEADLINES.training_idle_s


async def test_a_trainer_alive_without_steps_loses_its_host_and_the_next_one_completes(
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
        # The trainer steps no more; its host still answers (heartbeats would, too).
        await env.sleep(IDLE_S + 60)
        await wait_until(lambda: len(provider.created) == 2)
        replaced: RunStatus = await handle.query(TrainingWorkflow.status)
        assert replaced.attempt == 2 and replaced.status == RunStatusName.PENDING_GPU
        key = upload_model(s3, run_settings, handle)
        await send_all(handle, ScriptedEvents(handle.id, attempt=2).happy_path(key, MODEL_BYTES))
        status, error = await finish(handle)
        await check_replays(run_settings, handle, name=f"{CODE_VERSION}-stuck-trainer-replaced")

    assert error is None and status.status == RunStatusName.COMPLETED
    (failure,) = status.gpu_failures
    assert f"no training step for {IDLE_S} s: its trainer is stuck" in failure
    assert provider.destroyed[0] == provider.created[0]
    assert_no_instance_left(provider)


async def test_a_relay_outage_longer_than_the_idle_deadline_does_not_stall_a_training_run(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
    s3: Any,
) -> None:
    env = time_skipping_env
    port = free_port()
    relayed = run_settings.model_copy(
        update={"relay_public_url": f"http://127.0.0.1:{port}", "relay_health_check": True}
    )
    provider = RecordingProvider(relayed)
    async with running_worker(env.client, relayed, provider):
        with serve_asgi(create_app(relayed, env.client), port=port):
            handle = await start_run(env.client, relayed, request_factory())
            await wait_for_status(handle, RunStatusName.PENDING_GPU)
            script = await reach_training(handle)
        # The relay is gone for three idle deadlines: no event can reach the run.
        await env.sleep(3 * IDLE_S)
        waiting: RunStatus = await handle.query(TrainingWorkflow.status)
        assert waiting.status == RunStatusName.TRAINING, waiting.error
        assert waiting.waiting_for_relay is not None
        assert f"127.0.0.1:{port}" in waiting.waiting_for_relay
        assert waiting.attempt == 1 and len(provider.created) == 1

        with serve_asgi(create_app(relayed, env.client), port=port):
            # Back: the next look at the deadline sees it, and the GPU's held-back events
            # get their grace.
            await env.sleep(2 * RELAY_RECHECK.total_seconds())
            back: RunStatus = await handle.query(TrainingWorkflow.status)
            assert back.status == RunStatusName.TRAINING and back.waiting_for_relay is None
            progress = TrainingProgressData(step=11, total=20, epoch=2, loss=0.1)
            await send_all(handle, [script.next("training.progress", progress)])
            key = upload_model(s3, relayed, handle)
            await send_all(handle, script.happy_path(key, MODEL_BYTES)[-2:])
            status, error = await finish(handle)
        await check_replays(relayed, handle, name=f"{CODE_VERSION}-waited-for-the-relay")

    assert error is None and status.status == RunStatusName.COMPLETED
    assert status.attempt == 1 and status.gpu_failures == []
    assert_no_instance_left(provider)


async def test_a_relay_that_is_up_lets_the_deadline_count(
    time_skipping_env: WorkflowEnvironment,
    run_settings: Settings,
    request_factory: Any,
) -> None:
    """The relay answers: the silence is the GPU's, and one attempt allowed means a stall."""
    env = time_skipping_env
    relayed = run_settings.model_copy(update={"relay_health_check": True})
    provider = RecordingProvider(relayed)
    with serve_asgi(create_app(relayed, env.client)) as relay_url:
        relayed = relayed.model_copy(update={"relay_public_url": relay_url})
        async with running_worker(env.client, relayed, provider):
            handle = await start_run(env.client, relayed, request_factory(max_gpu_attempts=1))
            await wait_for_status(handle, RunStatusName.PENDING_GPU)
            await reach_training(handle)
            status, _ = await finish(handle)

    assert status.status == RunStatusName.STALLED
    assert status.error is not None and "its trainer is stuck" in status.error.message
    assert status.waiting_for_relay is None
    assert_no_instance_left(provider)


async def test_the_relays_health_is_read_where_the_worker_reaches_it(
    dev_env: WorkflowEnvironment, settings: Settings
) -> None:
    """Up: the relay answers and is connected to Temporal. Down: nothing listens, or the relay
    cannot reach Temporal (its own, here: a dead address). LORA_RELAY_HEALTH_URL wins over the
    public URL, for a worker that cannot reach the public address."""
    checked = settings.model_copy(
        update={"relay_health_check": True, "relay_public_url": f"http://127.0.0.1:{free_port()}"}
    )
    down = await RelayActivities(checked).relay_health()
    assert not down.up and "unreachable" in down.detail

    with serve_asgi(create_app(checked, dev_env.client)) as relay_url:
        internal = checked.model_copy(update={"relay_health_url": f"{relay_url}/healthz"})
        assert (await RelayActivities(internal).relay_health()).up

    cut_off = checked.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    with serve_asgi(create_app(cut_off)) as relay_url:
        internal = checked.model_copy(update={"relay_health_url": f"{relay_url}/healthz"})
        health = await RelayActivities(internal).relay_health()
    assert not health.up and health.detail == "the relay is not connected to Temporal"


async def test_a_cancel_while_the_relay_is_asked_ends_the_run_cancelled(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    """The run's cancel arrives once: one that lands while a deadline asks the relay is the
    user's, not a relay that could not be asked. Dev server, real time: a 2 s idle deadline."""
    asked, release = threading.Event(), threading.Event()

    async def healthz(request: Request) -> Response:
        asked.set()
        await asyncio.to_thread(release.wait, 30)
        return JSONResponse({"ok": True, "temporal_connected": True})

    slow_relay = Starlette(routes=[Route("/healthz", healthz)])
    deadlines = SHORT_DEADLINES.model_copy(update={"training_idle_s": 2})
    with serve_asgi(slow_relay) as relay_url:
        relayed = run_settings.model_copy(
            update={"relay_health_check": True, "relay_health_url": f"{relay_url}/healthz"}
        )
        provider = RecordingProvider(relayed)
        async with running_worker(dev_env.client, relayed, provider):
            handle = await start_run(dev_env.client, relayed, request_factory(deadlines=deadlines))
            await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
            await reach_training(handle)
            try:
                await asyncio.to_thread(asked.wait, 60)
                assert asked.is_set(), "the idle deadline never asked the relay"
                await handle.cancel()
            finally:
                release.set()
            status, _ = await asyncio.wait_for(finish(handle), timeout=60)

    assert status.status == RunStatusName.CANCELLED
    assert status.attempt == 1 and status.gpu_failures == []
    assert_no_instance_left(provider)
