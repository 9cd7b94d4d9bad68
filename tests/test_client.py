"""`client.LoraClient` as a Python backend uses it, on the real dev server and local S3: the
errors a caller acts on are named, an upload happens once, and a run Temporal ended reads so.
The CLI tests cover the same client through `loratrain`."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from client import (
    InvalidRunId,
    LoraClient,
    ModelNotReady,
    RunAlreadyExists,
    RunNotFound,
    TemporalUnreachable,
    WorkerNotAnswering,
    dataset_files,
)
from common.settings import Settings
from workflows.models import RunStatusName, S3Prefix, TrainingRequest

from .conftest import free_port
from .images import PNG


def folder_of_images(root: Path) -> Path:
    folder = root / "cat"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(PNG + bytes([i]))
        (folder / f"{i}.txt").write_text(f"a photo of mycat {i}")
    (folder / "notes.md").write_text("not part of the dataset")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


def cat_request(settings: Settings, run_id: str) -> TrainingRequest:
    return TrainingRequest(
        images=S3Prefix(bucket=settings.bucket, prefix=f"uploads/{run_id}/"),
        model="/models/sd15.safetensors",
    )


async def test_an_address_where_nothing_listens_is_temporal_unreachable(
    settings: Settings,
) -> None:
    nowhere = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})

    with pytest.raises(TemporalUnreachable) as raised:
        await LoraClient.connect(nowhere, timeout_s=5)

    assert str(raised.value) == f"cannot reach Temporal at {nowhere.temporal_address}"


async def test_an_unknown_run_is_run_not_found_for_every_call(
    dev_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    client = LoraClient(dev_env.client, settings)
    run_id = f"no-such-{uuid.uuid4().hex[:8]}"

    for call in (
        client.status(run_id),
        client.cancel(run_id),
        client.download(run_id, tmp_path),
        client.logs(run_id),
        client.wait(run_id),
    ):
        with pytest.raises(RunNotFound) as raised:
            await call
        assert str(raised.value) == f"no run {run_id!r} in namespace 'default'"
    with pytest.raises(RunNotFound):
        async for _ in client.watch(run_id):
            pass


async def test_start_uploads_the_folder_once_and_never_reuses_an_id(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """No worker polls this task queue: the run is started, not trained."""
    client = LoraClient(dev_env.client, settings)
    folder = folder_of_images(tmp_path)
    run_id = f"client-{uuid.uuid4().hex[:8]}"
    uploads: list[tuple[int, str]] = []

    started = await client.start(
        cat_request(settings, run_id),
        run_id,
        upload_folder=folder,
        on_upload=lambda count, where: uploads.append((count, where)),
    )

    assert started == run_id
    assert [p.name for p in dataset_files(folder).skipped] == ["notes.md"]
    assert uploads == [(4, f"s3://{settings.bucket}/uploads/{run_id}/")]
    listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"uploads/{run_id}/")
    assert sorted(o["Key"].rsplit("/", 1)[-1] for o in listing["Contents"]) == [
        "0.png",
        "0.txt",
        "1.png",
        "1.txt",
    ]

    with pytest.raises(RunAlreadyExists) as raised:
        await client.start(
            cat_request(settings, run_id),
            run_id,
            upload_folder=folder,
            on_upload=lambda count, where: uploads.append((count, where)),
        )
    assert raised.value.execution_status == "running"
    assert len(uploads) == 1, "nothing is uploaded into an existing run's prefix"

    with pytest.raises(InvalidRunId):
        await client.start(cat_request(settings, run_id), "no spaces allowed")

    await dev_env.client.get_workflow_handle(run_id).terminate("test over")


async def test_a_run_without_a_worker_or_ended_by_temporal_says_so(
    dev_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    impatient = settings.model_copy(update={"query_timeout_s": 1})
    client = LoraClient(dev_env.client, impatient)
    run_id = await client.start(cat_request(settings, "unused"))

    with pytest.raises(WorkerNotAnswering) as raised:
        await client.status(run_id)
    assert raised.value.task_queue == settings.task_queue
    assert "did not answer its status query within 1 s" in str(raised.value)

    outcome = await client.cancel(run_id)
    assert (outcome.requested, outcome.execution_status) == (True, "running")
    await dev_env.client.get_workflow_handle(run_id).terminate("operator ended it")

    statuses = [st async for st in client.watch(run_id)]
    assert [(st.status, st.execution_status) for st in statuses] == [
        (RunStatusName.PENDING, "terminated")
    ]
    assert (await client.wait(run_id)).execution_status == "terminated"
    again = await client.cancel(run_id)
    assert (again.requested, again.execution_status) == (False, "terminated")
    with pytest.raises(ModelNotReady) as not_ready:
        await client.download(run_id, tmp_path)
    assert str(not_ready.value) == f"run {run_id} has no model to download (terminated)"
    described = await dev_env.client.get_workflow_handle(run_id).describe()
    assert described.status == WorkflowExecutionStatus.TERMINATED
