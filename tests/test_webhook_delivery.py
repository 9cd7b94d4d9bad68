"""User webhook deliveries: a bounded schedule that gives up, children that complete with what
happened (never FAILED for a receiver's answer), and a run's deliveries in `loratrain status`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from activities.notify import UserWebhookInput
from common.settings import Settings
from workflows.models import RunStatusName, UserWebhook, WebhookDelivery
from workflows.notify import DELIVERY_SCHEDULE, UserWebhookWorkflow

from .http_support import serve_asgi
from .test_cli import cli, cli_env, dev_address
from .test_workflow import finish
from .webhook_receiver import WebhookReceiver
from .workflow_support import (
    CODE_VERSION,
    SHORT_DEADLINES,
    SLEEPING_RUNNER,
    RecordingProvider,
    check_replays,
    local_model,
    make_request,
    put_dataset,
    running_worker,
    start_run,
    wait_for_status,
)

SECRET = "whsec_" + "ZGVsaXZlcnktdGVzdC1zZWNyZXQ="


def message(url: str, event_type: str = "training.status") -> UserWebhookInput:
    return UserWebhookInput(
        run_id="run-deliveries",
        url=url,
        secret=SECRET,
        msg_id=f"run-deliveries:x:{uuid.uuid4().hex[:6]}",
        event_type=event_type,  # type: ignore[arg-type]
        payload={"status": "training"},
    )


@pytest.mark.parametrize(
    ("answers", "state", "attempts"),
    [
        ([500, 503, 200], "delivered", 3),
        ([500] * len(DELIVERY_SCHEDULE), "gave_up", len(DELIVERY_SCHEDULE)),
        ([410], "refused", 1),
    ],
    ids=["delivered on the third attempt", "gave up after the schedule", "refused"],
)
async def test_a_delivery_follows_the_schedule_and_completes_with_what_happened(
    time_skipping_env: WorkflowEnvironment,
    settings: Settings,
    answers: list[int],
    state: str,
    attempts: int,
) -> None:
    receiver = WebhookReceiver(secret=SECRET, respond_with=list(answers), default_status=500)
    env = time_skipping_env
    with serve_asgi(receiver.app) as url:
        async with running_worker(env.client, settings, RecordingProvider(settings)):
            handle = await env.client.start_workflow(
                UserWebhookWorkflow.run,
                message(f"{url}/hooks"),
                id=f"delivery-{uuid.uuid4().hex[:8]}",
                task_queue=settings.task_queue,
            )
            result = await handle.result()
            described = await handle.describe()
            history = await handle.fetch_history()
            await check_replays(settings, handle, name=f"{CODE_VERSION}-webhook-{state}")

    assert isinstance(result, WebhookDelivery)
    assert (result.state, result.attempts) == (state, attempts)
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert len(receiver.events) == attempts
    assert all(e.verified for e in receiver.events)
    # One webhook-id for every attempt: receivers deduplicate on it.
    assert len({e.webhook_id for e in receiver.events}) == 1
    if state != "delivered":
        assert result.last_error is not None and f"HTTP {answers[-1]}" in result.last_error
    # The waits between attempts are the schedule's.
    timers = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]
    assert timers == [d for d in DELIVERY_SCHEDULE[:attempts] if d > timedelta(0)]


async def test_status_shows_a_runs_deliveries_sent_and_failing(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """A receiver that takes the first webhooks and then answers 500: `status` counts what was
    sent and names the failing delivery's error, as the run goes on."""
    run_settings = settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    receiver = WebhookReceiver(secret=SECRET, respond_with=[200], default_status=500)
    images = put_dataset(s3, run_settings.bucket, "uploads/deliveries/")
    provider = RecordingProvider(run_settings)
    with serve_asgi(receiver.app) as url:
        webhook = UserWebhook(url=f"{url}/hooks", secret=SECRET)
        request = make_request(
            images, local_model(tmp_path), deadlines=SHORT_DEADLINES, webhook=webhook
        )
        async with running_worker(dev_env.client, run_settings, provider):
            handle = await start_run(dev_env.client, run_settings, request)
            await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
            env = cli_env(run_settings, dev_address(dev_env))

            async def counted() -> dict[str, Any]:
                while True:
                    shown = await asyncio.to_thread(cli, ["status", handle.id, "--json"], env)
                    webhooks = json.loads(shown.output).get("webhooks") or {}
                    if webhooks.get("sent") == 1 and webhooks.get("failing") == 1:
                        return webhooks
                    await asyncio.sleep(0.2)

            webhooks = await asyncio.wait_for(counted(), timeout=60)
            text = await asyncio.to_thread(cli, ["status", handle.id], env)
            await handle.cancel()
            await finish(handle)

    assert "HTTP 500" in (webhooks["last_error"] or "")
    assert "webhooks" in text.output and "1 sent, 1 failing" in text.output, text.output
