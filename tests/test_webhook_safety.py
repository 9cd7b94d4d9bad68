"""User webhooks never reach what the worker must not call (SSRF), and a refusal harms no run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.notify import NotifyActivities
from tests.http_support import serve_asgi
from tests.test_notify import SECRET, message
from tests.webhook_receiver import WebhookReceiver
from worker.settings import Settings
from workflows.models import RunStatusName, UserWebhook

from .test_workflow import MODEL_BYTES, assert_no_instance_left, finish, send_all, upload_model
from .workflow_support import (
    SHORT_DEADLINES,
    SLEEPING_RUNNER,
    RecordingProvider,
    ScriptedEvents,
    local_model,
    make_request,
    put_dataset,
    running_worker,
    start_run,
    wait_for_status,
)


@pytest.fixture
def strict(settings: Settings) -> Settings:
    """Production rules: https only, public addresses only."""
    return settings.model_copy(
        update={"webhook_allow_http": False, "webhook_allow_private_addresses": False}
    )


@pytest.fixture
def receiver() -> Iterator[tuple[WebhookReceiver, str]]:
    hooks = WebhookReceiver(secret=SECRET)
    with serve_asgi(hooks.app) as base_url:
        yield hooks, base_url


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hooks",
        "https://10.0.0.1/hooks",
        "https://169.254.169.254/latest/meta-data/",
        "https://localhost/hooks",
        "https://[::1]/hooks",
    ],
)
async def test_webhooks_to_loopback_private_and_link_local_addresses_are_refused(
    strict: Settings, url: str
) -> None:
    with pytest.raises(ApplicationError) as refused:
        await NotifyActivities(strict).send_user_webhook(message(url))
    assert refused.value.type == "WebhookRefused"
    assert refused.value.non_retryable
    assert "non-public address" in refused.value.message


async def test_a_name_resolving_to_loopback_is_refused_and_nothing_is_sent(
    strict: Settings, receiver: tuple[WebhookReceiver, str]
) -> None:
    hooks, base_url = receiver
    port = base_url.rsplit(":", 1)[1]
    # localhost resolves to the very receiver that is listening: it must hear nothing.
    strict_http = strict.model_copy(update={"webhook_allow_http": True})
    with pytest.raises(ApplicationError) as refused:
        await NotifyActivities(strict_http).send_user_webhook(
            message(f"http://localhost:{port}/hooks")
        )
    assert refused.value.type == "WebhookRefused"
    assert hooks.events == []


async def test_plain_http_is_refused_outside_the_embedded_stack(strict: Settings) -> None:
    with pytest.raises(ApplicationError) as refused:
        await NotifyActivities(strict).send_user_webhook(message("http://hooks.example/x"))
    assert refused.value.type == "WebhookRefused"
    assert "only https" in refused.value.message


async def test_a_redirect_to_loopback_is_not_followed(
    settings: Settings, receiver: tuple[WebhookReceiver, str]
) -> None:
    hooks, target = receiver

    async def redirect(request: Request) -> Response:
        return RedirectResponse(f"{target}/hooks", status_code=307, headers={"x": "y" * 300})

    app = Starlette(routes=[Route("/hooks", redirect, methods=["POST"])])
    with serve_asgi(app) as base_url, pytest.raises(ApplicationError) as refused:
        await NotifyActivities(settings).send_user_webhook(message(f"{base_url}/hooks"))
    assert refused.value.type == "WebhookRejected" and refused.value.non_retryable
    assert "redirects are not followed" in refused.value.message
    assert hooks.events == []


async def test_a_refused_webhook_leaves_the_run_unaffected(
    time_skipping_env: WorkflowEnvironment, strict: Settings, s3: Any, tmp_path: Path
) -> None:
    run_settings = strict.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    provider = RecordingProvider(run_settings)
    images = put_dataset(s3, run_settings.bucket, "uploads/cats/")
    request = make_request(
        images,
        local_model(tmp_path),
        deadlines=SHORT_DEADLINES,
        webhook=UserWebhook(url="https://169.254.169.254/latest/meta-data/", secret=SECRET),
    )
    client = time_skipping_env.client
    async with running_worker(client, run_settings, provider):
        handle = await start_run(client, run_settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU)
        key = upload_model(s3, run_settings, handle)
        await send_all(handle, ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES))
        status, error = await finish(handle)

    assert error is None, error
    assert status.status == RunStatusName.COMPLETED
    assert_no_instance_left(provider)
