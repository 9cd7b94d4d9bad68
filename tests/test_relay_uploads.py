"""The relay's upload URLs for saved epochs: presigned PUTs under the run's own prefix, for a
request signed with that run's secret by its current GPU attempt while the run is open; nothing
else gets one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from common.settings import Settings
from gpu_runner import protocol
from gpu_runner.protocol import UploadUrls, UploadUrlsRequest
from relay.app import create_app
from tests.http_support import serve_asgi
from workflows.models import RunStatus, RunStatusName


@workflow.defn(sandboxed=False)  # a test stand-in; the sandbox would re-import this module
class OnAttemptTwo:
    """A run that answers `status` as a run on its second GPU attempt does."""

    @workflow.init
    def __init__(self) -> None:
        self._done = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self._done)

    @workflow.signal
    def finish(self) -> None:
        self._done = True

    @workflow.query
    def status(self) -> RunStatus:
        return RunStatus(
            run_id=workflow.info().workflow_id, status=RunStatusName.TRAINING, attempt=2
        )


@dataclass
class Run:
    id: str
    execution: str
    handle: WorkflowHandle[Any, Any]


@pytest.fixture
def relay_settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy(update={"task_queue": f"tq-{uuid.uuid4()}"})


@pytest.fixture
async def run(dev_env: WorkflowEnvironment, relay_settings: Settings) -> AsyncIterator[Run]:
    async with Worker(
        dev_env.client, task_queue=relay_settings.task_queue, workflows=[OnAttemptTwo]
    ):
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        handle = await dev_env.client.start_workflow(
            OnAttemptTwo.run, id=run_id, task_queue=relay_settings.task_queue
        )
        assert handle.first_execution_run_id is not None
        yield Run(run_id, handle.first_execution_run_id, handle)
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.signal(OnAttemptTwo.finish)


def signed(secret: str, request: UploadUrlsRequest | bytes) -> tuple[bytes, dict[str, str]]:
    body = request if isinstance(request, bytes) else request.model_dump_json().encode()
    return body, protocol.sign_payload(secret, "uploads-1", body, datetime.now(UTC))


async def test_the_current_attempt_gets_one_put_per_file_under_the_runs_epoch_folder(
    dev_env: WorkflowEnvironment, relay_settings: Settings, run: Run, s3: Any
) -> None:
    master = relay_settings.require_master_secret()
    secret = protocol.derive_run_secret(master, run.id, run.execution)
    asked = UploadUrlsRequest(
        run_id=run.id, attempt=2, epoch=7, files=["lora.safetensors", "samples/00.png"]
    )
    async with httpx.AsyncClient(timeout=30) as http:
        with serve_asgi(create_app(relay_settings, dev_env.client)) as relay:
            url = f"{relay}/v1/runs/{run.id}/executions/{run.execution}/uploads"
            body, headers = signed(secret, asked)
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 200, response.text
            urls = UploadUrls.model_validate_json(response.content)
            prefix = f"runs/{run.id}/{run.execution}/epochs/0007"
            assert urls.keys == {
                "lora.safetensors": f"{prefix}/lora.safetensors",
                "samples/00.png": f"{prefix}/samples/00.png",
            }
            assert urls.expires_in_s == relay_settings.epoch_upload_url_ttl_s
            # The URLs write exactly those keys, and only those.
            put = await http.put(urls.urls["samples/00.png"], content=b"png bytes")
            assert put.status_code == 200
            stored = s3.get_object(Bucket=urls.bucket, Key=f"{prefix}/samples/00.png")
            assert stored["Body"].read() == b"png bytes"
            elsewhere = urls.urls["lora.safetensors"].replace("lora.safetensors", "other.bin", 1)
            assert (await http.put(elsewhere, content=b"x")).status_code == 403

            # Another run's secret, the id-only secret, a body for another run, a path outside
            # the epoch folder, a replaced attempt: refused, with the reason.
            forged = protocol.derive_run_secret(master, "another-run", run.execution)
            for secret_used, request, status, reason in [
                (forged, asked, 401, "signature"),
                (protocol.derive_run_secret(master, run.id), asked, 401, "signature"),
                (secret, asked.model_copy(update={"run_id": "another-run"}), 400, "another-run"),
                (secret, b'{"run_id": "x", "files": ["../job-1.json"]}', 400, "not an upload"),
                (secret, asked.model_copy(update={"attempt": 1}), 410, "was replaced"),
            ]:
                body, headers = signed(secret_used, request)
                refused = await http.post(url, content=body, headers=headers)
                assert refused.status_code == status, refused.text
                assert reason in refused.json()["error"]

            # Once the run is closed no GPU gets a URL for it.
            await run.handle.terminate("test over")
            body, headers = signed(secret, asked)
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 410, response.text
