"""The relay over real HTTP (uvicorn on a loopback port) against a real Temporal dev server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from common.converter import codec_from_settings
from common.settings import Settings
from gpu_runner import protocol
from gpu_runner.protocol import ImagesReadyData, RunnerEvent
from relay.app import RECONNECT_INTERVAL_S, create_app
from tests.conftest import free_port
from tests.http_support import serve_asgi


@workflow.defn(sandboxed=False)  # a test stand-in; the sandbox would re-import this whole module
class RecordingWorkflow:
    """Records the seq of every runner event it is signalled, until told to finish."""

    @workflow.init
    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._finished = False

    @workflow.run
    async def run(self) -> list[int]:
        await workflow.wait_condition(lambda: self._finished)
        return self._seqs

    @workflow.signal
    def runner_event(self, event: RunnerEvent) -> None:
        self._seqs.append(event.seq)

    @workflow.signal
    def finish(self) -> None:
        self._finished = True

    @workflow.query
    def events(self) -> list[int]:
        return self._seqs


@dataclass
class Run:
    id: str
    secret: str
    handle: WorkflowHandle[Any, Any]

    async def received(self) -> list[int]:
        seqs: list[int] = await self.handle.query(RecordingWorkflow.events)
        return seqs


@pytest.fixture
def relay_settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy(update={"task_queue": f"tq-{uuid.uuid4()}"})


@pytest.fixture
def master(relay_settings: Settings) -> str:
    return relay_settings.require_master_secret()


@pytest.fixture
async def run(
    dev_env: WorkflowEnvironment, relay_settings: Settings, master: str
) -> AsyncIterator[Run]:
    """A running RecordingWorkflow (id = a fresh run id) with a worker for the test's duration."""
    async with Worker(
        dev_env.client, task_queue=relay_settings.task_queue, workflows=[RecordingWorkflow]
    ):
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        handle = await dev_env.client.start_workflow(
            RecordingWorkflow.run, id=run_id, task_queue=relay_settings.task_queue
        )
        yield Run(run_id, protocol.derive_run_secret(master, run_id), handle)
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")


@pytest.fixture
def relay(dev_env: WorkflowEnvironment, relay_settings: Settings) -> Iterator[str]:
    with serve_asgi(create_app(relay_settings, dev_env.client)) as base_url:
        yield base_url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def event(run_id: str, seq: int = 1) -> RunnerEvent:
    return protocol.make_event(
        run_id, seq, ImagesReadyData(image_count=3, bytes=1234), "images.ready"
    )


def events_url(base_url: str, run_id: str) -> str:
    return f"{base_url}/v1/runs/{run_id}/events"


async def post_event(
    http: httpx.AsyncClient,
    base_url: str,
    run_id: str,
    body: bytes,
    headers: dict[str, str],
) -> httpx.Response:
    response = await http.post(events_url(base_url, run_id), content=body, headers=headers)
    assert response.headers["content-type"] == "application/json"
    return response


# --------------------------------------------------------------------------------------------
# Delivered
# --------------------------------------------------------------------------------------------


async def test_signed_events_reach_the_workflow(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    for seq in (1, 2):
        sent = event(run.id, seq)
        body, headers = protocol.sign_event(run.secret, sent)
        response = await post_event(http, relay, run.id, body, headers)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": True, "id": sent.webhook_id}
        assert headers["webhook-id"] == sent.webhook_id
    assert await run.received() == [1, 2]


async def test_body_of_exactly_the_limit_is_accepted(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    padded = event(run.id).model_copy(
        update={"type": "heartbeat", "data": {"stage": "images", "note": ""}}
    )
    overhead = len(protocol.encode_event(padded))
    padded = padded.model_copy(
        update={"data": {"stage": "images", "note": "x" * (protocol.MAX_EVENT_BYTES - overhead)}}
    )
    body, headers = protocol.sign_event(run.secret, padded)
    assert len(body) == protocol.MAX_EVENT_BYTES
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 202, response.text
    assert await run.received() == [1]


async def test_relay_connects_its_own_client_at_startup(
    dev_env: WorkflowEnvironment, relay_settings: Settings, run: Run, http: httpx.AsyncClient
) -> None:
    settings = relay_settings.model_copy(
        update={"temporal_address": dev_env.client.service_client.config.target_host}
    )
    with serve_asgi(create_app(settings)) as base_url:
        health = await http.get(f"{base_url}/healthz")
        assert health.status_code == 200
        assert health.json()["temporal_connected"] is True
        body, headers = protocol.sign_event(run.secret, event(run.id))
        response = await post_event(http, base_url, run.id, body, headers)
    assert response.status_code == 202, response.text
    assert await run.received() == [1]


# --------------------------------------------------------------------------------------------
# Signature (401)
# --------------------------------------------------------------------------------------------


async def test_signature_with_a_wrong_secret_is_401(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    forged = protocol.derive_run_secret("not-the-master-secret", run.id)
    body, headers = protocol.sign_event(forged, event(run.id))
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    assert await run.received() == []


async def test_signature_with_another_runs_secret_is_401(
    relay: str, run: Run, master: str, http: httpx.AsyncClient
) -> None:
    other_secret = protocol.derive_run_secret(master, "some-other-run")
    body, headers = protocol.sign_event(other_secret, event(run.id))
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 401
    assert await run.received() == []


@pytest.mark.parametrize("age", [timedelta(minutes=10), timedelta(minutes=-10)])
async def test_signature_outside_the_tolerance_is_401(
    relay: str, run: Run, http: httpx.AsyncClient, age: timedelta
) -> None:
    body, headers = protocol.sign_event(run.secret, event(run.id), at=datetime.now(UTC) - age)
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 401
    assert "timestamp" in response.json()["error"]
    assert await run.received() == []


MALFORMED_HEADERS: dict[str, dict[str, str | None]] = {
    "no signature headers": {
        "webhook-id": None,
        "webhook-timestamp": None,
        "webhook-signature": None,
    },
    "no webhook-signature": {"webhook-signature": None},
    "no webhook-id": {"webhook-id": None},
    "no webhook-timestamp": {"webhook-timestamp": None},
    "version only": {"webhook-signature": "v1"},
    "not base64": {"webhook-signature": "v1,!!!"},
    "no comma": {"webhook-signature": "v1c2lnbmF0dXJl"},
    "too many commas": {"webhook-signature": "v1,a,b"},
    "unknown version": {"webhook-signature": "v2,c2lnbmF0dXJl"},
    "empty": {"webhook-signature": ""},
    "timestamp not a number": {"webhook-timestamp": "yesterday"},
    "timestamp huge": {"webhook-timestamp": "9" * 40},
}


@pytest.mark.parametrize("changes", MALFORMED_HEADERS.values(), ids=MALFORMED_HEADERS.keys())
async def test_malformed_signature_headers_are_401(
    relay: str, run: Run, http: httpx.AsyncClient, changes: dict[str, str | None]
) -> None:
    body, headers = protocol.sign_event(run.secret, event(run.id))
    for name, value in changes.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"].startswith("invalid signature")
    assert await run.received() == []


@pytest.mark.parametrize("bad_run_id", ["-starts-with-dash", "x" * 200, "has space", "a:b"])
async def test_a_path_that_is_not_a_run_id_is_401(
    relay: str, master: str, http: httpx.AsyncClient, bad_run_id: str
) -> None:
    secret = protocol.derive_run_secret(master, bad_run_id)
    body = b'{"run_id": "x"}'
    headers = protocol.sign_payload(secret, f"{bad_run_id}:1", body)
    response = await post_event(http, relay, bad_run_id, body, headers)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid signature: not a valid run id"}


async def test_unsigned_caller_learns_nothing_about_runs(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    body = protocol.encode_event(event("no-such-run"))
    unknown = await post_event(http, relay, "no-such-run", body, {})
    known = await post_event(http, relay, run.id, protocol.encode_event(event(run.id)), {})
    assert unknown.status_code == known.status_code == 401
    assert unknown.json() == known.json()


# --------------------------------------------------------------------------------------------
# Body (400)
# --------------------------------------------------------------------------------------------


async def test_signed_body_that_is_not_json_is_400(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    body = b"this is not json"
    headers = protocol.sign_payload(run.secret, f"{run.id}:1", body)
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith("body is not JSON")
    assert await run.received() == []


@pytest.mark.parametrize(
    "payload",
    [
        {"run_id": "RUN", "seq": 0, "type": "gpu.ready", "at": "2024-01-01T00:00:00Z"},
        {"run_id": "RUN", "seq": 1, "type": "coffee.ready", "at": "2024-01-01T00:00:00Z"},
        {"run_id": "RUN", "seq": 1, "type": "images.ready", "at": "now", "data": {}},
        [1, 2, 3],
        "just a string",
    ],
    ids=["seq 0", "unknown type", "bad data and time", "array", "string"],
)
async def test_signed_json_that_is_not_an_event_is_400(
    relay: str, run: Run, http: httpx.AsyncClient, payload: Any
) -> None:
    if isinstance(payload, dict):
        payload["run_id"] = run.id
    body = json.dumps(payload).encode()
    headers = protocol.sign_payload(run.secret, f"{run.id}:1", body)
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith("body is not a valid event")
    assert await run.received() == []


async def test_event_for_another_run_is_400(relay: str, run: Run, http: httpx.AsyncClient) -> None:
    # Validly signed with this run's secret, but the event names another run.
    body, headers = protocol.sign_event(run.secret, event("other-run"))
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 400
    assert "other-run" in response.json()["error"]
    assert await run.received() == []


async def test_webhook_id_that_disagrees_with_the_event_is_400(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    sent = event(run.id, seq=1)
    body = protocol.encode_event(sent)
    other_id = sent.model_copy(update={"seq": 2}).webhook_id
    headers = protocol.sign_payload(run.secret, other_id, body)
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 400
    assert "webhook-id" in response.json()["error"]
    assert await run.received() == []


# --------------------------------------------------------------------------------------------
# Size (413), checked before anything else
# --------------------------------------------------------------------------------------------


def oversized(run: Run) -> tuple[bytes, dict[str, str]]:
    big = event(run.id).model_copy(
        update={"type": "heartbeat", "data": {"stage": "images", "note": "x" * 70_000}}
    )
    return protocol.sign_event(run.secret, big)


async def test_body_over_the_limit_is_413(relay: str, run: Run, http: httpx.AsyncClient) -> None:
    body, headers = oversized(run)
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 413
    assert await run.received() == []


async def test_chunked_body_over_the_limit_is_413(
    relay: str, run: Run, http: httpx.AsyncClient
) -> None:
    body, headers = oversized(run)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = await http.post(events_url(relay, run.id), content=chunks(), headers=headers)
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert await run.received() == []


async def test_size_is_checked_before_the_signature(relay: str, http: httpx.AsyncClient) -> None:
    response = await post_event(http, relay, "no-such-run", b"x" * 70_000, {})
    assert response.status_code == 413


async def test_malformed_content_length_is_400_not_500(relay: str) -> None:
    host, port = relay.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/runs/r1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n"
        b"Connection: close\r\n\r\n{}"
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400"


# --------------------------------------------------------------------------------------------
# Run (404 / 410)
# --------------------------------------------------------------------------------------------


async def test_unknown_run_is_404(relay: str, master: str, http: httpx.AsyncClient) -> None:
    run_id = f"never-started-{uuid.uuid4().hex[:8]}"
    body, headers = protocol.sign_event(protocol.derive_run_secret(master, run_id), event(run_id))
    response = await post_event(http, relay, run_id, body, headers)
    assert response.status_code == 404
    assert run_id in response.json()["error"]


async def test_closed_run_is_410(relay: str, run: Run, http: httpx.AsyncClient) -> None:
    await run.handle.signal(RecordingWorkflow.finish)
    assert await run.handle.result() == []
    body, headers = protocol.sign_event(run.secret, event(run.id))
    response = await post_event(http, relay, run.id, body, headers)
    assert response.status_code == 410
    assert response.json() == {"error": "run is closed", "status": "COMPLETED"}


# --------------------------------------------------------------------------------------------
# Temporal unreachable (503), and recovering from it
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_forwarder(port: int, target_host: str) -> AsyncIterator[None]:
    """A plain TCP proxy on 127.0.0.1:port to target_host: Temporal 'coming back'."""
    host, target_port = target_host.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_temporal_unreachable_is_503_until_it_comes_back(
    dev_env: WorkflowEnvironment, relay_settings: Settings, run: Run, http: httpx.AsyncClient
) -> None:
    port = free_port()  # nothing listens here until the forwarder starts
    settings = relay_settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
    body, headers = protocol.sign_event(run.secret, event(run.id))
    with serve_asgi(create_app(settings)) as base_url:
        health = await http.get(f"{base_url}/healthz")
        assert health.status_code == 200
        assert health.json()["temporal_connected"] is False

        response = await post_event(http, base_url, run.id, body, headers)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert "unreachable" in response.json()["error"]
        # Unsigned callers still get 401 first: no Temporal needed to reject them.
        unsigned = await post_event(http, base_url, run.id, body, {})
        assert unsigned.status_code == 401

        await asyncio.sleep(RECONNECT_INTERVAL_S + 0.1)
        async with tcp_forwarder(port, dev_env.client.service_client.config.target_host):
            response = await post_event(http, base_url, run.id, body, headers)
        assert response.status_code == 202, response.text
    assert await run.received() == [1]


# --------------------------------------------------------------------------------------------
# Every answer is JSON
# --------------------------------------------------------------------------------------------


async def test_healthz(relay: str, http: httpx.AsyncClient) -> None:
    response = await http.get(f"{relay}/healthz")
    assert response.status_code == 200
    assert response.json()["ok"] is True


async def test_unknown_path_and_method_answer_json(relay: str, http: httpx.AsyncClient) -> None:
    missing = await http.get(f"{relay}/v2/nothing")
    assert missing.status_code == 404
    assert "error" in missing.json()
    wrong_method = await http.get(events_url(relay, "r1"))
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


# --------------------------------------------------------------------------------------------
# Codec server for the Temporal UI
# --------------------------------------------------------------------------------------------


def payload_json(payload: Payload) -> dict[str, Any]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


async def test_codec_encode_then_decode_round_trips(
    relay: str, relay_settings: Settings, http: httpx.AsyncClient
) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"civitai_api_key": "secret"}')
    encoded = await http.post(
        f"{relay}/codec/encode",
        json={"payloads": [payload_json(plain)]},
        headers={"x-namespace": "default"},
    )
    assert encoded.status_code == 200, encoded.text
    [encrypted] = encoded.json()["payloads"]
    assert base64.b64decode(encrypted["metadata"]["encoding"]) == b"binary/encrypted"
    assert b"secret" not in base64.b64decode(encrypted["data"])

    decoded = await http.post(f"{relay}/codec/decode", json={"payloads": [encrypted]})
    assert decoded.status_code == 200, decoded.text
    assert decoded.json() == {"payloads": [payload_json(plain)]}


async def test_codec_decodes_what_the_workers_encrypt(
    relay: str, relay_settings: Settings, http: httpx.AsyncClient
) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')
    [encrypted] = await codec_from_settings(relay_settings).encode([plain])
    unencrypted = Payload(metadata={"encoding": b"json/plain"}, data=b"1")
    response = await http.post(
        f"{relay}/codec/decode",
        json={"payloads": [payload_json(encrypted), payload_json(unencrypted)]},
    )
    assert response.status_code == 200
    assert response.json() == {"payloads": [payload_json(plain), payload_json(unencrypted)]}


def tampered() -> dict[str, Any]:
    return {
        "payloads": [
            {
                "metadata": {
                    "encoding": base64.b64encode(b"binary/encrypted").decode(),
                    "encryption-key-id": base64.b64encode(b"k1").decode(),
                },
                "data": base64.b64encode(b"\x00" * 40).decode(),
            }
        ]
    }


@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        b"\xff\xfe",
        b'{"payloads": "nope"}',
        b'{"payloads": [{"data": "!!!not base64"}]}',
        b'{"unexpected": 1}',
        json.dumps(tampered()).encode(),
    ],
    ids=[
        "not json",
        "not utf-8",
        "payloads not a list",
        "data not base64",
        "unknown field",
        "tampered",
    ],
)
async def test_codec_decode_of_garbage_is_400(
    relay: str, http: httpx.AsyncClient, body: bytes
) -> None:
    response = await http.post(
        f"{relay}/codec/decode", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]


async def test_codec_cors_preflight_from_the_temporal_ui(
    relay: str, relay_settings: Settings, http: httpx.AsyncClient
) -> None:
    origin = relay_settings.codec_cors_origins[0]
    preflight = await http.options(
        f"{relay}/codec/decode",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-namespace,authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert {"content-type", "x-namespace", "authorization"} <= allowed

    actual = await http.post(
        f"{relay}/codec/decode", json={"payloads": []}, headers={"origin": origin}
    )
    assert actual.status_code == 200
    assert actual.json() == {"payloads": []}
    assert actual.headers["access-control-allow-origin"] == origin


async def test_codec_cors_refuses_other_origins(relay: str, http: httpx.AsyncClient) -> None:
    preflight = await http.options(
        f"{relay}/codec/decode",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers


async def test_events_endpoint_has_no_cors(relay: str, run: Run, http: httpx.AsyncClient) -> None:
    preflight = await http.options(
        events_url(relay, run.id),
        headers={"origin": "http://127.0.0.1:8233", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_missing_master_secret_fails_at_startup(relay_settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="LORA_WEBHOOK_MASTER_SECRET"):
        create_app(relay_settings.model_copy(update={"webhook_master_secret": None}))


async def test_codec_with_a_token_refuses_callers_without_it(
    dev_env: WorkflowEnvironment, relay_settings: Settings, http: httpx.AsyncClient
) -> None:
    guarded = relay_settings.model_copy(update={"codec_auth_token": SecretStr("operator-token")})
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')
    [encrypted] = await codec_from_settings(relay_settings).encode([plain])
    body = {"payloads": [payload_json(encrypted)]}
    with serve_asgi(create_app(guarded, dev_env.client)) as base_url:
        anonymous = await http.post(f"{base_url}/codec/decode", json=body)
        wrong = await http.post(
            f"{base_url}/codec/decode", json=body, headers={"authorization": "Bearer guess"}
        )
        operator = await http.post(
            f"{base_url}/codec/decode",
            json=body,
            headers={"authorization": "Bearer operator-token"},
        )
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert "payloads" not in anonymous.json()
    assert operator.status_code == 200
    assert operator.json() == {"payloads": [payload_json(plain)]}
