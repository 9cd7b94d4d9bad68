"""A whole run on the real parts: Temporal dev server, local S3 over HTTP, the relay over HTTP,
the local GPU provider starting the real runner process (with the sd-scripts stand-in as its
trainer), and a user webhook endpoint checking every signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.history.v1 import History
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from common.settings import Settings
from relay.app import create_app
from workflows.models import RunStatus, RunStatusName, UserWebhook
from workflows.training import TrainingWorkflow

from .http_support import serve_asgi
from .webhook_receiver import WebhookReceiver
from .workflow_support import (
    SEED_ORDER,
    RecordingProvider,
    check_replays,
    local_model,
    make_request,
    put_dataset,
    running_worker,
    start_run,
)

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "sd_scripts_standin"
USER_SECRET = "whsec_" + "dXNlci13ZWJob29rLXNlY3JldC1mb3ItdGVzdHM="
CIVITAI_KEY = "civitai-key-0123456789abcdef-do-not-leak"


@dataclass
class Stack:
    client: Client
    settings: Settings
    provider: RecordingProvider
    receiver: WebhookReceiver
    webhook_url: str


@pytest.fixture
async def stack(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Stack]:
    # The runner process reads its own LORA_RUNNER_* settings, passed through by the provider.
    monkeypatch.setenv("LORA_RUNNER_REQUIRE_GPU", "false")
    monkeypatch.setenv("LORA_RUNNER_WORKDIR", str(tmp_path / "gpu"))
    monkeypatch.setenv("LORA_RUNNER_SD_SCRIPTS_DIR", str(STANDIN))
    monkeypatch.setenv(
        "LORA_RUNNER_ACCELERATE_COMMAND", json.dumps([sys.executable, str(STANDIN / "accelerate")])
    )
    monkeypatch.setenv("LORA_RUNNER_TOKENIZER_CACHE_DIR", str(tmp_path / "tokenizers"))
    monkeypatch.setenv("LORA_RUNNER_RETRY_INITIAL_S", "0.2")
    monkeypatch.setenv("LORA_RUNNER_RETRY_MAX_S", "1")
    monkeypatch.setenv("LORA_RUNNER_DISK_MARGIN_BYTES", "0")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    receiver = WebhookReceiver(secret=USER_SECRET)
    with (
        serve_asgi(create_app(settings, dev_env.client)) as relay_url,
        serve_asgi(receiver.app) as hooks_url,
    ):
        run_settings = settings.model_copy(
            update={
                "relay_public_url": relay_url,
                "local_runner_command": [sys.executable, "-m", "gpu_runner"],
            }
        )
        provider = RecordingProvider(run_settings)
        async with running_worker(dev_env.client, run_settings, provider):
            yield Stack(dev_env.client, run_settings, provider, receiver, f"{hooks_url}/hooks")


async def watch(handle: WorkflowHandle[Any, Any]) -> list[RunStatusName]:
    """What `loratrain watch` sees: each version through the wait_for_change update."""
    seen: list[RunStatusName] = []
    version = 0
    while True:
        status: RunStatus = await handle.execute_update(TrainingWorkflow.wait_for_change, version)
        version = status.version
        if not seen or seen[-1] != status.status:
            seen.append(status.status)
        if status.status.terminal:
            return seen


async def test_run_completes_on_the_real_stack(stack: Stack, s3: Any, tmp_path: Path) -> None:
    images = put_dataset(s3, stack.settings.bucket, "uploads/cats/", count=4)
    request = make_request(
        images,
        local_model(tmp_path),
        webhook=UserWebhook(url=stack.webhook_url, secret=USER_SECRET),
        civitai_api_key=CIVITAI_KEY,
        training={"epochs": 3, "repeats": 1},
    )
    handle = await start_run(stack.client, stack.settings, request, run_id="completed-run-1")
    watcher = asyncio.create_task(watch(handle))
    final: RunStatus = await asyncio.wait_for(handle.result(), timeout=120)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert [c.status for c in final.history] == SEED_ORDER
    # A watcher may miss statuses that pass between two polls, never their order or the end.
    watched = await asyncio.wait_for(watcher, timeout=10)
    assert watched == [s for s in SEED_ORDER if s in watched]
    assert watched[-1] == RunStatusName.COMPLETED

    # The model object is in S3 and is what the runner said it uploaded.
    assert final.result is not None
    body = s3.get_object(Bucket=final.result.location.bucket, Key=final.result.location.key)
    data = body["Body"].read()
    assert hashlib.sha256(data).hexdigest() == final.result.sha256
    assert len(data) == final.result.bytes
    assert len(final.epoch_losses) == 3
    assert final.best_checkpoint == 1 + final.epoch_losses.index(min(final.epoch_losses))

    # The instance was destroyed exactly once and nothing of this run is left running.
    assert len(stack.provider.created) == 1
    assert stack.provider.destroyed == stack.provider.created
    assert stack.provider.list_instances() == []

    # The user got a signed training.status for every status and a training.completed.
    await stack.receiver.wait_for_async(len(SEED_ORDER), types=["training.status"], timeout_s=30)
    await stack.receiver.wait_for_async(1, types=["training.completed"], timeout_s=30)
    hooks = stack.receiver.accepted()
    assert all(h.verified for h in hooks), [h.verify_error for h in hooks]
    statuses = sorted(
        (h.json["data"]["version"], h.json["data"]["status"])
        for h in hooks
        if h.type == "training.status"
    )
    assert [s for _, s in statuses] == [s.value for s in SEED_ORDER]
    completed = [h for h in hooks if h.type == "training.completed"]
    assert len(completed) == 1
    assert completed[0].json["data"]["model"]["sha256"] == final.result.sha256
    assert completed[0].json["data"]["download_url"].startswith("http")

    # The Civitai key is nowhere in the raw history as the server stores it.
    history = await handle.fetch_history()
    raw = history.to_json() + History(events=history.events).SerializeToString().hex()
    assert CIVITAI_KEY not in raw
    assert CIVITAI_KEY.encode().hex() not in raw
    assert USER_SECRET not in raw

    await check_replays(stack.settings, handle)


async def test_bad_dataset_fails_before_any_gpu(stack: Stack, s3: Any, tmp_path: Path) -> None:
    bucket = stack.settings.bucket
    images = put_dataset(s3, bucket, "uploads/mixed/", count=2)
    s3.put_object(Bucket=bucket, Key="uploads/mixed/cat.gif", Body=b"GIF89a" + bytes(32))
    s3.put_object(Bucket=bucket, Key="uploads/mixed/fake.png", Body=b"not a png at all")
    request = make_request(
        images,
        local_model(tmp_path),
        webhook=UserWebhook(url=stack.webhook_url, secret=USER_SECRET),
    )
    handle = await start_run(stack.client, stack.settings, request, run_id="baddata-run-1")
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), timeout=60)

    assert isinstance(failure.value.cause, ApplicationError)
    status: RunStatus = await handle.query(TrainingWorkflow.status)
    assert status.status == RunStatusName.FAILED
    assert status.error is not None and status.error.code == "InvalidDataset"
    assert "cat.gif" in status.error.message and "fake.png" in status.error.message
    assert stack.provider.created == []
    hooks = await stack.receiver.wait_for_async(1, types=["training.failed"], timeout_s=30)
    assert hooks[0].verified
    assert "cat.gif" in hooks[0].json["data"]["error"]["message"]

    await check_replays(stack.settings, handle)
