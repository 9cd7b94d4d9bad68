"""send_user_webhook against a real HTTP receiver that verifies Standard Webhooks signatures."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from activities.notify import NotifyActivities, UserWebhookInput
from common.settings import Settings
from gpu_runner.protocol import sign_payload
from tests.conftest import free_port
from tests.http_support import serve_asgi
from tests.webhook_receiver import WebhookReceiver

Receiver = tuple[WebhookReceiver, str]
SECRET = "whsec_" + base64.b64encode(b"user-secret-0123456789abcdef!!").decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = WebhookReceiver(secret=SECRET)
    with serve_asgi(hooks.app) as base_url:
        yield hooks, f"{base_url}/hooks/lora?token=abc"


def message(url: str, **overrides: Any) -> UserWebhookInput:
    fields: dict[str, Any] = {
        "run_id": "run-42",
        "url": url,
        "secret": SECRET,
        "msg_id": "run-42:3",
        "event_type": "training.completed",
        "payload": {
            "status": "completed",
            "model": {"bucket": "b", "key": "runs/run-42/lora.safetensors"},
        },
        "occurred_at": datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC),
    }
    return UserWebhookInput(**{**fields, **overrides})


async def test_user_gets_a_validly_signed_webhook(settings: Settings, receiver: Receiver) -> None:
    hooks, url = receiver

    await NotifyActivities(settings).send_user_webhook(message(url))

    [event] = hooks.events
    assert event.verified, event.verify_error
    assert event.path == "/hooks/lora"
    assert event.webhook_id == "run-42:3"
    assert event.headers["content-type"] == "application/json"
    assert event.json == {
        "type": "training.completed",
        "run_id": "run-42",
        "timestamp": "2025-05-06T07:08:09Z",
        "data": {
            "status": "completed",
            "model": {"bucket": "b", "key": "runs/run-42/lora.safetensors"},
        },
    }
    assert SECRET not in event.body.decode()


async def test_retried_delivery_keeps_the_webhook_id_so_receivers_can_dedupe(
    settings: Settings, receiver: Receiver
) -> None:
    hooks, url = receiver
    hooks.respond_with = [503]
    notify = NotifyActivities(settings)

    with pytest.raises(ApplicationError):
        await notify.send_user_webhook(message(url))
    await notify.send_user_webhook(message(url))

    assert [e.answered for e in hooks.events] == [503, 200]
    assert {e.webhook_id for e in hooks.events} == {"run-42:3"}
    assert hooks.events[0].body == hooks.events[1].body
    assert [e.webhook_id for e in hooks.accepted()] == ["run-42:3"]


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_server_errors_are_retryable(
    settings: Settings, receiver: Receiver, status: int
) -> None:
    hooks, url = receiver
    hooks.default_status = status

    with pytest.raises(ApplicationError) as caught:
        await NotifyActivities(settings).send_user_webhook(message(url))

    assert not caught.value.non_retryable
    assert caught.value.type == "WebhookDeliveryFailed"
    assert f"answered HTTP {status}" in caught.value.message
    assert "token=abc" not in caught.value.message  # query strings may hold tokens


@pytest.mark.parametrize("status", [400, 404, 410, 301])
async def test_client_errors_are_rejected_for_good(
    settings: Settings, receiver: Receiver, status: int
) -> None:
    hooks, url = receiver
    hooks.default_status = status

    with pytest.raises(ApplicationError) as caught:
        await NotifyActivities(settings).send_user_webhook(message(url))

    assert caught.value.non_retryable
    assert caught.value.type == "WebhookRejected"
    assert f"answered HTTP {status}" in caught.value.message
    assert len(hooks.events) == 1


async def test_unreachable_endpoint_is_retryable(settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there

    with pytest.raises(ApplicationError) as caught:
        await NotifyActivities(settings).send_user_webhook(message(url))

    assert not caught.value.non_retryable
    assert caught.value.type == "WebhookDeliveryFailed"
    assert SECRET not in caught.value.message


async def test_receiver_detects_a_bad_signature(receiver: Receiver) -> None:
    hooks, url = receiver
    body = json.dumps({"type": "training.status", "data": {}}).encode()
    forged = sign_payload(
        "whsec_" + base64.b64encode(b"another-secret-entirely!").decode(), "m1", body
    )
    tampered = sign_payload(SECRET, "m2", body)

    async with httpx.AsyncClient() as client:
        await client.post(url, content=body, headers=forged)
        await client.post(url, content=body + b" ", headers=tampered)
        await client.post(url, content=body, headers={"content-type": "application/json"})
        await client.post(url, content=body, headers=sign_payload(SECRET, "m4", body))

    events = await hooks.wait_for_async(4)
    assert [e.verified for e in events] == [False, False, False, True]
    assert all(e.verify_error for e in events[:3])
