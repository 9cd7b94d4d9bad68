"""The language-neutral contract: the checked-in JSON Schemas match the models and accept real
payloads, and docs/codec.md is enough to decode and encode the codec's payloads."""

from __future__ import annotations

import base64
import functools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.notify import UserWebhookInput, webhook_body
from common.converter import EncryptionCodec
from workflows import schemas
from workflows.models import (
    GpuInfo,
    ModelResult,
    Progress,
    RunError,
    RunStatus,
    RunStatusName,
    S3Location,
    S3Prefix,
    StatusChange,
    TrainingRequest,
    UserEventType,
    UserWebhook,
)

from .conftest import TEST_CODEC_KEY
from .workflow_support import CODE_VERSION

ROOT = Path(__file__).resolve().parent.parent
HISTORIES = ROOT / "tests" / "histories"
CODE_VERSION_PREFIX = f"{CODE_VERSION}-"


# --------------------------------------------------------------------------------------------
# The codec, implemented from docs/codec.md alone (no import of common.converter here)
# --------------------------------------------------------------------------------------------


def _decode_as_documented(payload: Payload, keys: dict[bytes, bytes]) -> Payload:
    if payload.metadata.get("encoding") != b"binary/encrypted":
        return payload
    key = keys[payload.metadata["encryption-key-id"]]
    nonce, sealed = payload.data[:12], payload.data[12:]
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return Payload.FromString(AESGCM(key).decrypt(nonce, ciphertext + tag, None))


def _encode_as_documented(payload: Payload, key_id: bytes, key: bytes) -> Payload:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, payload.SerializeToString(), None)
    return Payload(
        metadata={"encoding": b"binary/encrypted", "encryption-key-id": key_id},
        data=nonce + sealed,
    )


def _test_key() -> bytes:
    key = base64.b64decode(TEST_CODEC_KEY, validate=True)
    assert len(key) == 32
    return key


def _json_payload(value: Any) -> Payload:
    return Payload(
        metadata={"encoding": b"json/plain"},
        data=json.dumps(value, separators=(",", ":")).encode(),
    )


async def test_a_payload_the_python_codec_encrypted_decodes_from_the_documentation() -> None:
    request = TrainingRequest(images=S3Prefix(bucket="uploads", prefix="cats/"), model="civitai:1")
    [plain] = pydantic_data_converter.payload_converter.to_payloads([request])
    [encrypted] = await EncryptionCodec(_test_key(), key_id="k7").encode([plain])

    assert dict(encrypted.metadata) == {
        "encoding": b"binary/encrypted",
        "encryption-key-id": b"k7",
    }
    decoded = _decode_as_documented(encrypted, {b"k7": _test_key()})
    assert decoded == plain
    assert decoded.metadata["encoding"] == b"json/plain"
    assert TrainingRequest.model_validate_json(decoded.data) == request


async def test_a_payload_encrypted_from_the_documentation_decodes_in_the_python_codec() -> None:
    plain = _json_payload({"run_id": "run-1", "status": "pending"})
    encrypted = _encode_as_documented(plain, b"k1", _test_key())

    [decoded] = await EncryptionCodec(_test_key(), key_id="k1").decode([encrypted])
    assert decoded == plain


async def test_the_python_codec_passes_payloads_it_did_not_encrypt_through() -> None:
    plain = _json_payload({"run_id": "run-1"})
    [decoded] = await EncryptionCodec(_test_key()).decode([plain])
    assert decoded == plain
    assert _decode_as_documented(plain, {}) == plain


async def test_a_payload_under_another_key_id_is_refused_not_tried() -> None:
    encrypted = _encode_as_documented(_json_payload(1), b"k2", _test_key())
    with pytest.raises(ValueError, match="unknown key id"):
        await EncryptionCodec(_test_key(), key_id="k1").decode([encrypted])


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_checked_in_schema_matches_the_models(name: str) -> None:
    path = ROOT / "schemas" / name
    assert path.is_file(), f"{path} is missing: run `{schemas.REGENERATE}`"
    assert path.read_text(encoding="utf-8") == schemas.render(name), (
        f"schemas/{name} is stale (a model changed): run `{schemas.REGENERATE}` and commit it"
    )


def test_check_mode_names_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schemas.main(["--dir", str(tmp_path)]) == 0
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 0
    stale = tmp_path / "run-status.schema.json"
    stale.write_text("{}\n", encoding="utf-8")

    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    assert (
        f"{stale}: stale or missing; run `python -m workflows.schemas`" in capsys.readouterr().err
    )


def test_every_user_event_type_has_a_webhook_schema() -> None:
    covered = {schemas.webhook_event_type(body) for body in schemas.WEBHOOK_BODIES}
    assert covered == set(get_args(UserEventType))


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_schema_says_what_it_is(name: str) -> None:
    schema = json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("urn:loratrain:schema:")
    assert schema["title"] and schema["description"]


# --------------------------------------------------------------------------------------------
# Real payloads validate
# --------------------------------------------------------------------------------------------


# The keywords pydantic writes that only annotate; every other keyword must be checked.
def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _assert_valid(value: Any, name: str) -> None:
    errors = [e.message for e in _validator(name).iter_errors(value)]
    assert not errors, f"schemas/{name} rejects a real payload: {errors}"


def _assert_invalid(value: Any, name: str) -> None:
    assert not _validator(name).is_valid(value), f"schemas/{name} accepts {value!r}"


def _recorded_payloads(prefix: str = "") -> dict[str, list[tuple[str, Any]]]:
    """JSON payloads recorded from real runs (tests/histories), decoded per docs/codec.md,
    by what they are: workflow inputs, results and webhook children's inputs."""
    keys = {b"k1": _test_key()}
    found: dict[str, list[tuple[str, Any]]] = {"input": [], "result": [], "webhook": []}
    attributes = {
        "workflowExecutionStartedEventAttributes": ("input", "input"),
        "workflowExecutionCompletedEventAttributes": ("result", "result"),
        "startChildWorkflowExecutionInitiatedEventAttributes": ("webhook", "input"),
    }
    for path in sorted(HISTORIES.glob(f"{prefix}*.json")):
        history = json.loads(path.read_text())
        workflow_type = history["events"][0]["workflowExecutionStartedEventAttributes"][
            "workflowType"
        ]["name"]
        if workflow_type != "TrainingWorkflow":
            continue
        for event in history["events"]:
            for attribute, (kind, field) in attributes.items():
                if attribute not in event:
                    continue
                for raw in event[attribute].get(field, {}).get("payloads", []):
                    payload = Payload(
                        metadata={k: base64.b64decode(v) for k, v in raw["metadata"].items()},
                        data=base64.b64decode(raw.get("data", "")),
                    )
                    plain = _decode_as_documented(payload, keys)
                    assert plain.metadata["encoding"] == b"json/plain"
                    found[kind].append((path.name, json.loads(plain.data)))
    return found


def test_a_default_request_built_in_python_validates() -> None:
    request = TrainingRequest(images=S3Prefix(bucket="uploads", prefix="cats/"), model="civitai:1")
    [payload] = pydantic_data_converter.payload_converter.to_payloads([request])
    _assert_valid(json.loads(payload.data), "training-request.schema.json")
    # What a backend in another language would send: only what it sets.
    minimal = {"images": {"bucket": "uploads"}, "model": "civitai:1"}
    _assert_valid(minimal, "training-request.schema.json")
    _assert_invalid({**minimal, "modle": "typo"}, "training-request.schema.json")
    _assert_invalid({"images": {"bucket": "uploads"}}, "training-request.schema.json")


def test_a_full_request_validates() -> None:
    request = TrainingRequest(
        images=S3Prefix(bucket="uploads", prefix="cats/"),
        model="civitai:128713",
        webhook=UserWebhook(
            url="https://example.com/hooks",
            secret="whsec_" + base64.b64encode(b"0123456789abcdef").decode(),
            events=["training.completed", "training.failed"],
        ),
        civitai_api_key="key",
        max_cost_usd=5.0,
    )
    _assert_valid(request.model_dump(mode="json"), "training-request.schema.json")


def test_recorded_requests_validate() -> None:
    inputs = _recorded_payloads(CODE_VERSION_PREFIX)["input"]
    # A continued-as-new execution's input is its state, which holds the request.
    requests = [value.get("request", value) for _, value in inputs]
    assert len(requests) >= 10
    for request in requests:
        TrainingRequest.model_validate(request)
        _assert_valid(request, "training-request.schema.json")


def test_a_status_built_from_the_models_validates() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = RunStatus(
        run_id="run-1",
        status=RunStatusName.TRAINING,
        version=7,
        history=[StatusChange(status=RunStatusName.PENDING, at=at)],
        attempt=1,
        progress=Progress(step=10, total=20, epoch=1, total_epochs=2, percent=50.0, loss=0.2),
        gpu=GpuInfo(provider="local", instance_id="i-1", dollars_per_hour=0.3, started_at=at),
        cost_usd=0.01,
        epoch_losses=[0.3],
        result=ModelResult(
            location=S3Location(bucket="models", key="runs/run-1/lora.safetensors"),
            bytes=10,
            sha256="0" * 64,
        ),
    )
    [payload] = pydantic_data_converter.payload_converter.to_payloads([status])
    wire = json.loads(payload.data)
    _assert_valid(wire, "run-status.schema.json")
    # Output: every key is there, so a reader may rely on it.
    _assert_invalid({k: v for k, v in wire.items() if k != "progress"}, "run-status.schema.json")


def test_recorded_statuses_validate() -> None:
    results = _recorded_payloads(CODE_VERSION_PREFIX)["result"]
    assert len(results) >= 3
    for _, status in results:
        _assert_valid(status, "run-status.schema.json")


def _body(event_type: UserEventType, data: dict[str, Any], run_id: str = "run-1") -> Any:
    message = UserWebhookInput(
        run_id=run_id,
        url="https://example.com/hooks",
        secret="whsec_" + base64.b64encode(b"0123456789abcdef").decode(),
        msg_id=f"{run_id}:x:1",
        event_type=event_type,
        payload=data,
    )
    return json.loads(webhook_body(message, datetime(2026, 1, 2, tzinfo=UTC)))


def _presign(key: str) -> str:
    """What the worker's S3 client makes of a key for a training.epoch webhook."""
    return f"http://127.0.0.1:8333/loratrain/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256"


def test_recorded_webhook_bodies_validate() -> None:
    """Every webhook a recorded run queued, as activities/notify.py would POST it."""
    seen: set[str] = set()
    for name, recorded in _recorded_payloads()["webhook"]:
        message = UserWebhookInput.model_validate(recorded)
        occurred_at = message.occurred_at or datetime.now(UTC)
        body = json.loads(webhook_body(message, occurred_at, _presign))
        errors = [e.message for e in _validator("user-webhook.schema.json").iter_errors(body)]
        assert not errors, f"{name}: {body['type']} body rejected: {errors}"
        seen.add(body["type"])
    # No recorded run stalled with a webhook configured; see the next test.
    assert seen >= set(get_args(UserEventType)) - {"training.stalled"}, seen


def test_a_stalled_webhook_body_validates() -> None:
    error = RunError(code="stalled", message="no progress for 600 s", stage="training")
    data = {"status": "stalled", "error": error.model_dump(mode="json")}
    _assert_valid(_body("training.stalled", data), "user-webhook.schema.json")


def test_a_webhook_body_that_breaks_the_contract_is_refused() -> None:
    ok = _body("training.status", {"status": "training", "version": 3})
    _assert_valid(ok, "user-webhook.schema.json")
    _assert_invalid({**ok, "type": "training.epoch"}, "user-webhook.schema.json")
    _assert_invalid(
        _body("training.status", {"status": "dancing", "version": 3}), "user-webhook.schema.json"
    )
    _assert_invalid(_body("training.failed", {"status": "failed"}), "user-webhook.schema.json")
    _assert_invalid(
        _body("training.completed", {"status": "failed", "error": {"code": "x", "message": "y"}}),
        "user-webhook.schema.json",
    )
