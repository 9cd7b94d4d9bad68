"""A cancel at every workflow task of a whole run (a GPU replaced, a continue-as-new, a verified
model) leaves nothing behind, and every view of the run tells the same outcome.

The worker holds the Nth workflow task of a run (counted over all its executions) until the
cancel request is in the run's history, so the cancel lands right after that task, for every N:
not at moments a test picked. A cancel that lands after the run reached `completed` is recorded
and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
)
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from common.settings import SEARCH_ATTRIBUTE, Settings
from gpu_runner.protocol import RunFailedData, TrainingProgressData
from workflows.models import RunStatus, RunStatusName, UserWebhook
from workflows.training import CANCEL_ANYWHERE, TrainingWorkflow

from .http_support import serve_asgi
from .test_workflow import MODEL_BYTES
from .webhook_receiver import WebhookReceiver
from .workflow_support import (
    CODE_VERSION,
    SHORT_DEADLINES,
    SLEEPING_RUNNER,
    RecordingProvider,
    ScriptedEvents,
    check_replays,
    dev_server,
    local_model,
    make_request,
    put_dataset,
    relay_event,
    running_worker,
    start_run,
)

USER_SECRET = "whsec_" + "Y2FuY2VsLWFueXdoZXJlLXNlY3JldA=="
LORA_STATUS = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE)
# The server suggests a hand-over this early, so a short scripted run continues as new once.
SUGGEST_CONTINUE_AS_NEW_AT = 60
# Runs cancelled at the same time (each at its own task).
CONCURRENT_RUNS = 6
HOLD_LIMIT_S = 60.0


# --------------------------------------------------------------------------------------------
# A worker that holds the Nth workflow task of a run until the test lets it go
# --------------------------------------------------------------------------------------------


@dataclass
class Hold:
    at_task: int
    # Or hold the first task whose commands schedule this activity (a point, not a count).
    scheduling: str | None = None
    tasks: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Holds:
    """Which task of which run to hold; counts each run's new workflow tasks (not replays,
    queries or evictions) across its executions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_run: dict[str, Hold] = {}

    def hold(self, run_id: str, at_task: int, scheduling: str | None = None) -> Hold:
        with self._lock:
            self._by_run[run_id] = Hold(at_task, scheduling)
            return self._by_run[run_id]

    def after(
        self,
        run_id: str,
        activation: WorkflowActivation,
        completion: WorkflowActivationCompletion,
    ) -> None:
        if activation.is_replaying:
            return
        kinds = {job.WhichOneof("variant") for job in activation.jobs}
        if kinds <= {"query_workflow", "remove_from_cache"}:
            return
        with self._lock:
            hold = self._by_run.get(run_id)
            if hold is None:
                return
            hold.tasks += 1
            if hold.scheduling is not None:
                scheduled = {
                    c.schedule_activity.activity_type
                    for c in completion.successful.commands
                    if c.HasField("schedule_activity")
                }
                if hold.scheduling not in scheduled or hold.held.is_set():
                    return
            elif hold.tasks != hold.at_task:
                return
        hold.held.set()
        # The task's commands are decided; they reach the server once the cancel is in.
        assert hold.release.wait(HOLD_LIMIT_S), f"run {run_id}: task {hold.at_task} never released"


class _HoldingInstance(WorkflowInstance):
    def __init__(self, inner: WorkflowInstance, run_id: str, holds: Holds) -> None:
        self._inner, self._run_id, self._holds = inner, run_id, holds

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        completion = self._inner.activate(act)
        self._holds.after(self._run_id, act, completion)
        return completion

    def get_serialization_context(self, command_info: Any) -> Any:
        return self._inner.get_serialization_context(command_info)

    def get_external_store_context(self, command_info: Any) -> Any:
        return self._inner.get_external_store_context(command_info)

    def get_info(self) -> Any:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()


class HoldingRunner(WorkflowRunner):
    """The SDK's sandboxed runner, with each instance's activations counted by `holds`."""

    def __init__(self, holds: Holds) -> None:
        self._inner = SandboxedWorkflowRunner()
        self._holds = holds

    def prepare_workflow(self, defn: Any) -> None:
        self._inner.prepare_workflow(defn)

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _HoldingInstance(self._inner.create_instance(det), det.info.workflow_id, self._holds)

    def set_worker_level_failure_exception_types(
        self, types: Sequence[type[BaseException]]
    ) -> None:
        self._inner.set_worker_level_failure_exception_types(types)


# --------------------------------------------------------------------------------------------
# One run: a GPU whose runner fails before it is ready, a replacement that trains through a
# continue-as-new, a verified model; cancelled after its Nth task
# --------------------------------------------------------------------------------------------


class LabelledProvider(RecordingProvider):
    """The local provider, remembering the label of every instance it created."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.labels: list[str] = []

    def create(self, label: str, job_url: str, requirements: Any, **options: Any) -> Any:
        instance = super().create(label, job_url, requirements, **options)
        self.labels.append(label)
        return instance

    def created_for(self, run_id: str) -> int:
        return sum(1 for label in list(self.labels) if f":{run_id}:" in label)

    def left_for(self, run_id: str) -> list[str]:
        return [i.label for i in self.list_instances() if f":{run_id}:" in i.label]


async def until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def play_the_gpus(
    client: Client,
    provider: LabelledProvider,
    s3: Any,
    settings: Settings,
    first: WorkflowHandle[Any, Any],
) -> None:
    """What the two GPUs of the run send, each once it exists; ends when the run closes."""
    run_id = first.id
    latest = client.get_workflow_handle(
        run_id, first_execution_run_id=first.first_execution_run_id, result_type=RunStatus
    )
    await until(lambda: provider.created_for(run_id) >= 1, "the first GPU")
    failed = RunFailedData(stage="gpu", code="no_cuda", message="no CUDA device on this host")
    await relay_event(latest, ScriptedEvents(run_id).next("run.failed", failed))

    await until(lambda: provider.created_for(run_id) >= 2, "the replacement GPU")
    key = f"runs/{run_id}/{first.first_execution_run_id}/model/lora.safetensors"
    s3.put_object(Bucket=settings.bucket, Key=key, Body=MODEL_BYTES)
    script = ScriptedEvents(run_id, attempt=2)
    happy = script.happy_path(key, MODEL_BYTES)
    for event in happy[:5]:
        await relay_event(latest, event)
    # Progress until the server suggests a hand-over and the run has continued as new.
    step = 20
    while (await latest.describe()).run_id == first.first_execution_run_id:
        step += 1
        progress = script.next("training.progress", TrainingProgressData(step=step, total=10_000))
        await relay_event(latest, progress)
    for event in happy[-2:]:  # training.completed, model.uploaded: numbered after the progress
        again = script.next(event.type, event.parsed())
        await relay_event(latest, again)


@dataclass
class Outcome:
    at_task: int
    held: bool
    status: RunStatus
    execution: WorkflowExecutionStatus | None
    search_attribute: str | None
    executions: int
    instances_created: int
    instances_left: list[str]
    job_keys_left: list[str]
    final_webhooks: list[str]


async def cancel_after_task(
    n: int,
    client: Client,
    settings: Settings,
    provider: LabelledProvider,
    holds: Holds,
    s3: Any,
    request_for: Callable[[str], Any],
    receiver: WebhookReceiver,
    scheduling: str | None = None,
) -> Outcome:
    run_id = f"cancel-at-{n}-{uuid.uuid4().hex[:8]}"
    hold = holds.hold(run_id, n, scheduling)
    first = await start_run(client, settings, request_for(run_id), run_id=run_id)
    latest = client.get_workflow_handle(run_id, result_type=RunStatus)

    async def cancel_when_held() -> None:
        await until(hold.held.is_set, f"task {n}", timeout_s=120)
        await latest.cancel()  # in the run's history once this returns
        hold.release.set()

    gpus = asyncio.create_task(play_the_gpus(client, provider, s3, settings, first))
    canceller = asyncio.create_task(cancel_when_held())
    try:
        with contextlib.suppress(WorkflowFailureError):
            await asyncio.wait_for(latest.result(), timeout=120)
    finally:
        hold.release.set()
        for task in (gpus, canceller):
            task.cancel()
        await asyncio.gather(gpus, canceller, return_exceptions=True)

    status: RunStatus = await latest.query(TrainingWorkflow.status)
    described = await latest.describe()
    executions = [e async for e in client.list_workflows(f"WorkflowId = '{run_id}'")]
    listed = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"runs/{run_id}/").get(
        "Contents", []
    )
    terminal = ("training.completed", "training.cancelled", "training.failed", "training.stalled")
    await until(
        lambda: any(e.path == f"/hooks/{run_id}" and e.type in terminal for e in receiver.events),
        f"the final webhook of {run_id}",
    )
    await replay_every_execution(client, settings, run_id, [e.run_id for e in executions], status)
    return Outcome(
        at_task=n,
        held=hold.held.is_set(),
        status=status,
        execution=described.status,
        search_attribute=described.typed_search_attributes.get(LORA_STATUS),
        executions=len(executions),
        instances_created=provider.created_for(run_id),
        instances_left=provider.left_for(run_id),
        job_keys_left=[o["Key"] for o in listed if "/job" in o["Key"]],
        final_webhooks=[
            str(e.type)
            for e in receiver.events
            if e.path == f"/hooks/{run_id}" and e.type in terminal
        ],
    )


@contextlib.asynccontextmanager
async def worker_in_its_own_thread(
    client: Client, settings: Settings, provider: LabelledProvider, holds: Holds
) -> AsyncIterator[None]:
    """The holding worker on an event loop of its own: a held task blocks that loop (debug mode
    runs activations inline and so has no deadlock timeout), never the test's."""
    started, stopping = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        own = await Client.connect(
            client.service_client.config.target_host,
            namespace=client.namespace,
            data_converter=client.data_converter,
        )
        options = {"workflow_runner": HoldingRunner(holds), "debug_mode": True}
        async with running_worker(own, settings, provider, **options):
            started.set()
            await asyncio.to_thread(stopping.wait)

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:
            failure.append(e)
            started.set()

    thread = threading.Thread(target=main, name="holding-worker", daemon=True)
    thread.start()
    await asyncio.to_thread(started.wait, 60)
    assert not failure, failure
    try:
        yield
    finally:
        stopping.set()
        await asyncio.to_thread(thread.join, 60)
    assert not failure, failure


def patches_in(history: WorkflowHistory) -> list[str]:
    """The ids of the patch markers the execution recorded."""
    found = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            for payload in event.marker_recorded_event_attributes.details["patch-data"].payloads:
                found.append(json.loads(payload.data)["id"])
    return found


async def replay_every_execution(
    client: Client, settings: Settings, run_id: str, execution_ids: list[str], final: RunStatus
) -> None:
    """Every execution of the run replays on today's code; with LORA_RECORD_HISTORIES=1 the
    first of each kind that took the patched path joins the corpus."""
    for number, execution_id in enumerate(reversed(execution_ids), start=1):
        handle = client.get_workflow_handle(run_id, run_id=execution_id)
        history = await handle.fetch_history()
        patched = CANCEL_ANYWHERE in patches_in(history)
        if patched and final.status == RunStatusName.COMPLETED:
            kind = "late-cancel-kept-completed"
        elif patched:
            before = final.history[-2].status.value if len(final.history) > 1 else "start"
            kind = f"cancelled-in-{before}-execution-{number}"
        elif final.late_cancel_at is None and final.status == RunStatusName.COMPLETED:
            kind = f"completed-after-replacement-execution-{number}"
        else:
            kind = None
        await check_replays(
            settings,
            handle,
            record=kind is not None,
            name=f"{CODE_VERSION}-cancel-anywhere-{kind}",
        )


@pytest.fixture(scope="module")
async def suggesting_env(base_settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of this module's own that suggests continue-as-new after a short history."""
    async with dev_server(
        base_settings,
        {"limit.historyCount.suggestContinueAsNew": str(SUGGEST_CONTINUE_AS_NEW_AT)},
    ) as env:
        yield env


async def test_a_cancel_after_any_workflow_task_leaves_nothing_and_every_view_agrees(
    suggesting_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Any
) -> None:
    run_settings = settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    client, provider, holds = suggesting_env.client, LabelledProvider(run_settings), Holds()
    images = put_dataset(s3, run_settings.bucket, "uploads/cancel-anywhere/")
    model = local_model(tmp_path)
    receiver = WebhookReceiver(secret=USER_SECRET)
    outcomes: list[Outcome] = []
    with serve_asgi(receiver.app) as receiver_url:

        def request_for(run_id: str) -> Any:
            webhook = UserWebhook(url=f"{receiver_url}/hooks/{run_id}", secret=USER_SECRET)
            return make_request(
                images, model, deadlines=SHORT_DEADLINES, webhook=webhook, max_gpu_attempts=2
            )

        async with worker_in_its_own_thread(client, run_settings, provider, holds):
            n = 1
            while not outcomes or outcomes[-1].held:
                batch = range(n, n + CONCURRENT_RUNS)
                outcomes += await asyncio.gather(
                    *(
                        cancel_after_task(
                            i, client, run_settings, provider, holds, s3, request_for, receiver
                        )
                        for i in batch
                    )
                )
                n += CONCURRENT_RUNS
            # Where a run's task count varies (signals batched or not), the sweep may step
            # over the few tasks after the outcome; this run is held exactly there.
            late = await cancel_after_task(
                0,
                client,
                run_settings,
                provider,
                holds,
                s3,
                request_for,
                receiver,
                scheduling="release_run_gpus",
            )

    problems = []
    expected_execution = {
        RunStatusName.CANCELLED: WorkflowExecutionStatus.CANCELED,
        RunStatusName.COMPLETED: WorkflowExecutionStatus.COMPLETED,
    }
    for o in [*outcomes, late]:
        final = o.status.status
        webhook = f"training.{final.value}"
        if not (
            final in expected_execution
            and o.execution == expected_execution[final]
            and o.search_attribute == final.value
            and o.instances_left == []
            and o.job_keys_left == []
            and o.final_webhooks == [webhook]
            and (final == RunStatusName.COMPLETED or o.held)
            and (o.status.late_cancel_at is not None)
            == (final == RunStatusName.COMPLETED and o.held)
        ):
            problems.append(o)
    assert problems == [], "\n".join(repr(p) for p in problems)

    held = [o for o in outcomes if o.held]
    # The cancels covered the whole run: before any GPU, between the two GPUs, across the
    # hand-over, and after the model was verified.
    assert min(o.at_task for o in held) == 1
    assert any(o.instances_created == 0 for o in held)
    assert any(o.instances_created == 2 and o.executions == 1 for o in held)
    assert any(o.executions == 2 and o.status.status == RunStatusName.CANCELLED for o in held)
    # Held as the run decided its outcome: the cancel lands in the cleanup, and changes nothing.
    assert late.held and late.status.status == RunStatusName.COMPLETED
    assert late.status.late_cancel_at is not None
    # A run no cancel reached completed on two GPUs and two executions.
    last = outcomes[-1]
    assert last.status.status == RunStatusName.COMPLETED and last.executions == 2
    assert last.instances_created == 2
