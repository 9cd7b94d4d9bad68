"""A run is its id plus its first execution: a run that reuses the id of a terminated run never
adopts that run's GPU nor accepts its events, and the reaper gives the old GPU back while the new
run keeps its own. On the dev server, with the relay over real HTTP."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.providers.base import execution_tag, parse_label
from common.settings import Settings
from gpu_runner import protocol
from gpu_runner.protocol import GpuReadyData, JobSpec, make_event
from relay.app import create_app
from workflows.models import RelayedEvent, RunStatus, RunStatusName
from workflows.reaper import ReaperWorkflow
from workflows.training import TrainingWorkflow

from .http_support import serve_asgi
from .test_workflow import finish
from .workflow_support import (
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


def job_of(s3: Any, settings: Settings, handle: WorkflowHandle[Any, Any]) -> JobSpec:
    key = f"runs/{handle.id}/{handle.first_execution_run_id}/job-1.json"
    body = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    return JobSpec.model_validate_json(body)


async def post(relay: str, url: str, secret: str, run_id: str) -> httpx.Response:
    """A runner's gpu.ready, signed with `secret`, to the path of `url` on this relay."""
    event = make_event(run_id, 1, GpuReadyData(gpu_name="Test GPU"), "gpu.ready")
    body, headers = protocol.sign_event(secret, event)
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{relay}{urlsplit(url).path}", content=body, headers=headers)


async def test_a_reused_run_id_never_adopts_or_trusts_the_earlier_runs_gpu(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Any
) -> None:
    run_settings = settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    client, provider = dev_env.client, RecordingProvider(run_settings)
    images = put_dataset(s3, run_settings.bucket, "uploads/identity/")
    request = make_request(images, local_model(tmp_path), deadlines=SHORT_DEADLINES)
    run_id = f"reused-{uuid.uuid4().hex[:8]}"
    master = run_settings.require_master_secret()
    with serve_asgi(create_app(run_settings, client)) as relay:
        async with running_worker(client, run_settings, provider):
            first = await start_run(client, run_settings, request, run_id=run_id)
            await wait_for_status(first, RunStatusName.PENDING_GPU, timeout_s=30)
            first_job = job_of(s3, run_settings, first)
            # Terminated, the run cleans nothing up: its GPU keeps running.
            await first.terminate("the backend gave up on it")

            second = await start_run(client, run_settings, request, run_id=run_id)
            waiting = await wait_for_status(second, RunStatusName.PENDING_GPU, timeout_s=30)
            second_job = job_of(s3, run_settings, second)

            # A GPU of its own, labelled with its own execution.
            assert len(set(provider.created)) == 2, provider.created
            labels = {i.instance_id: parse_label(i.label) for i in provider.list_instances()}
            assert {label.execution for label in labels.values() if label} == {
                execution_tag(first.first_execution_run_id or ""),
                execution_tag(second.first_execution_run_id or ""),
            }
            # Each run's job names its own execution and signs with a secret of its own.
            assert first_job.events_url.endswith(
                f"/v1/runs/{run_id}/executions/{first.first_execution_run_id}/events"
            )
            assert first_job.webhook_secret != second_job.webhook_secret

            # The first GPU is told its run is over; its secret signs nothing for the second.
            stale = await post(relay, first_job.events_url, first_job.webhook_secret, run_id)
            assert stale.status_code == 410, stale.text
            assert "later run" in stale.json()["error"]
            forged = await post(relay, second_job.events_url, first_job.webhook_secret, run_id)
            assert forged.status_code == 401, forged.text
            # Through the older route (run id only), the relay cannot tell the runs apart; the
            # run ignores what it was not told came from its own GPU.
            older_secret = protocol.derive_run_secret(master, run_id)
            older = await post(relay, f"{relay}/v1/runs/{run_id}/events", older_secret, run_id)
            assert older.status_code == 202, older.text
            after = await second.execute_update(
                TrainingWorkflow.wait_for_change, args=[waiting.version, 1.0]
            )
            assert (after.status, after.version) == (RunStatusName.PENDING_GPU, waiting.version)
            # Its own GPU's events count.
            own = await post(relay, second_job.events_url, second_job.webhook_secret, run_id)
            assert own.status_code == 202, own.text
            await wait_for_status(second, RunStatusName.PENDING_IMAGES, timeout_s=30)

            # The reaper gives the terminated run's GPU back and keeps the open run's.
            reaper = await client.start_workflow(
                ReaperWorkflow.run,
                id=f"reaper-{uuid.uuid4().hex[:8]}",
                task_queue=run_settings.task_queue,
            )
            summary = await reaper.result()
            await check_replays(run_settings, reaper, record=False)
            first_instance, second_instance = provider.created
            assert summary.destroyed == [first_instance]
            assert summary.kept == [second_instance]

            await second.cancel()
            status, _ = await finish(second)
            await check_replays(run_settings, second, record=False)

    final: RunStatus = status
    assert final.status == RunStatusName.CANCELLED
    assert provider.list_instances() == []
    assert sorted(provider.destroyed) == sorted(provider.created)


async def test_the_workflow_ignores_events_relayed_for_another_execution(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any
) -> None:
    """The signal's execution is the relay's word on which run's secret verified the event."""
    provider = RecordingProvider(run_settings)
    request = request_factory()
    async with running_worker(dev_env.client, run_settings, provider):
        handle = await start_run(dev_env.client, run_settings, request)
        waiting = await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
        ready = make_event(handle.id, 1, GpuReadyData(gpu_name="x"), "gpu.ready")
        other = RelayedEvent(event=ready, execution="another-execution")
        await handle.signal(TrainingWorkflow.relayed_event, other)
        await handle.signal(TrainingWorkflow.runner_event, ready)  # no execution: older relay
        # Handled after those signals; answered unchanged at its wait if they were ignored.
        after = await handle.execute_update(
            TrainingWorkflow.wait_for_change, args=[waiting.version, 1.0]
        )
        assert (after.status, after.version) == (RunStatusName.PENDING_GPU, waiting.version)
        own = RelayedEvent(event=ready, execution=handle.first_execution_run_id or "")
        await handle.signal(TrainingWorkflow.relayed_event, own)
        await wait_for_status(handle, RunStatusName.PENDING_IMAGES, timeout_s=30)
        await handle.cancel()
        await finish(handle)
