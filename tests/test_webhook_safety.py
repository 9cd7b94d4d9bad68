"""User webhooks never reach what the worker must not call (SSRF), and a refusal harms no run."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.notify import NotifyActivities, refusal_reason
from common.settings import Settings
from tests.http_support import serve_asgi
from tests.test_notify import SECRET, message
from tests.webhook_receiver import WebhookReceiver
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


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every request the activity asks httpx to send; one to a refused address fails the test
    before any connection is made."""
    requests: list[str] = []
    real_send = httpx.AsyncClient.send

    async def send(client: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        requests.append(str(request.url))
        if request.url.host not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a request to {request.url} was about to leave this machine")
        return await real_send(client, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    return requests


@pytest.fixture
async def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the running loop resolves to chosen addresses, without asking any DNS server."""
    answers: dict[str, list[str]] = {}
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return await real_getaddrinfo(host, port, *args, **kwargs)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in answers[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return answers


@pytest.mark.parametrize(
    ("address", "embedded", "form"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1", "IPv4-mapped"),
        ("::ffff:10.1.2.3", "10.1.2.3", "IPv4-mapped"),
        ("::127.0.0.1", "127.0.0.1", "IPv4-compatible"),
        ("::192.168.0.1", "192.168.0.1", "IPv4-compatible"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254", "NAT64"),
        ("64:ff9b::7f00:1", "127.0.0.1", "NAT64"),
        ("64:ff9b:1::a00:1", "10.0.0.1", "local-use NAT64"),
        ("2002:a00:1::1", "10.0.0.1", "6to4"),
        ("2002:7f00:1::", "127.0.0.1", "6to4"),
        # Teredo: the server is bits 32-64, the client the last 32 bits inverted.
        ("2001:0:808:808::f5ff:fffe", "10.0.0.1", "Teredo client"),
        ("2001:0:a00:1::f7f7:f7f7", "10.0.0.1", "Teredo server"),
        ("2001:0:808:808::80ff:fffe", "127.0.0.1", "Teredo client"),
    ],
)
def test_an_ipv6_address_embedding_a_private_ipv4_is_refused_naming_it(
    address: str, embedded: str, form: str
) -> None:
    reason = refusal_reason(address)

    assert reason is not None
    assert f"embeds {embedded} ({form}), a non-public address" in reason


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",
        "fe80::1",
        "fd00:ec2::254",
        "100.100.100.200",
        "::ffff:169.254.169.254",
        "::169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:808:808::5601:5601",  # Teredo client 169.254.169.254
        "2001:0:a9fe:a9fe::f7f7:f7f7",  # Teredo server 169.254.169.254
    ],
)
def test_link_local_and_metadata_addresses_are_refused_even_where_private_ones_are_allowed(
    address: str,
) -> None:
    reason = refusal_reason(address, allow_private=True)

    assert reason is not None
    assert "link-local" in reason or "cloud metadata" in reason
    assert refusal_reason(address) is not None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.10", "172.16.0.1", "fd12::1", "::ffff:127.0.0.1"],
)
def test_loopback_and_private_addresses_are_allowed_in_the_embedded_stack_only(
    address: str,
) -> None:
    assert refusal_reason(address, allow_private=True) is None
    assert "non-public address" in (refusal_reason(address) or "")


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "2001:4860:4860::8888",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "::ffff:8.8.8.8",
    ],
)
def test_public_addresses_are_accepted(address: str) -> None:
    # Checked only: no traffic goes to these.
    assert refusal_reason(address) is None
    assert refusal_reason(address, allow_private=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hooks",
        "https://10.0.0.1/hooks",
        "https://169.254.169.254/latest/meta-data/",
        "https://localhost/hooks",
        "https://[::1]/hooks",
        "https://[::ffff:127.0.0.1]/hooks",
        "https://[64:ff9b::a00:1]/hooks",
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


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one decimal number
        "http://[fe80::1]:8080/hooks",
    ],
)
async def test_the_embedded_stack_refuses_metadata_and_link_local_urls_and_sends_nothing(
    settings: Settings, sent: list[str], url: str
) -> None:
    assert settings.webhook_allow_private_addresses  # as `loratrain dev` runs the worker

    with pytest.raises(ApplicationError) as refused:
        await NotifyActivities(settings).send_user_webhook(message(url))

    assert refused.value.type == "WebhookRefused"
    assert refused.value.non_retryable
    assert "link-local" in refused.value.message or "cloud metadata" in refused.value.message
    assert sent == []


async def test_the_embedded_stack_refuses_a_name_resolving_to_a_metadata_address(
    settings: Settings, sent: list[str], resolver: dict[str, list[str]]
) -> None:
    # One bad address among good ones is enough: the connection could go to any of them.
    resolver["hooks.example"] = ["127.0.0.1", "fd00:ec2::254"]

    with pytest.raises(ApplicationError) as refused:
        await NotifyActivities(settings).send_user_webhook(message("http://hooks.example/x"))

    assert refused.value.type == "WebhookRefused" and refused.value.non_retryable
    assert "hooks.example resolves to fd00:ec2::254" in refused.value.message
    assert "cloud metadata" in refused.value.message
    assert sent == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_embedded_stack_still_delivers_to_a_receiver_on_this_machine(
    settings: Settings, sent: list[str], receiver: tuple[WebhookReceiver, str], host: str
) -> None:
    hooks, base_url = receiver
    port = base_url.rsplit(":", 1)[1]

    await NotifyActivities(settings).send_user_webhook(message(f"http://{host}:{port}/hooks"))

    [event] = hooks.events
    assert event.verified, event.verify_error
    assert event.headers["host"] == f"{host}:{port}"


async def test_a_name_whose_first_address_refuses_connections_is_delivered_to_the_next(
    settings: Settings,
    sent: list[str],
    receiver: tuple[WebhookReceiver, str],
    resolver: dict[str, list[str]],
) -> None:
    hooks, base_url = receiver
    port = base_url.rsplit(":", 1)[1]
    # The receiver listens on 127.0.0.1 only, as many local servers do.
    resolver["receiver.example"] = ["::1", "127.0.0.1"]

    await NotifyActivities(settings).send_user_webhook(
        message(f"http://receiver.example:{port}/hooks")
    )

    [event] = hooks.events
    assert event.verified, event.verify_error
    assert event.headers["host"] == f"receiver.example:{port}"
    assert sent == [f"http://[::1]:{port}/hooks", f"http://127.0.0.1:{port}/hooks"]


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
