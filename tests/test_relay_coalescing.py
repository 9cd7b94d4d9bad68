"""The relay coalesces progress and heartbeats per run; milestones go through at once, in order.

Over real HTTP (uvicorn on a loopback port) against a real Temporal dev server: a recording
workflow for the timing, and the real TrainingWorkflow for what a user sees in the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from common.settings import Settings
from gpu_runner import protocol
from gpu_runner.protocol import (
    EventType,
    HeartbeatData,
    ImagesReadyData,
    JobSpec,
    RunnerEvent,
    TrainingCompletedData,
    TrainingProgressData,
)
from relay.app import RELAYED_EVENT_SIGNAL, create_app
from workflows.models import RelayedEvent, RunStatus, RunStatusName
from workflows.training import TrainingWorkflow

from .http_support import serve_asgi
from .test_workflow import finish
from .workflow_support import (
    RecordingProvider,
    ScriptedEvents,
    running_worker,
    start_run,
    wait_for_status,
    watching,
)

INTERVAL_S = 0.5
# What a loaded CI machine may add to a deadline; a condition met earlier ends the wait at once.
SLACK_S = 5.0


@workflow.defn(sandboxed=False)  # a test stand-in; the sandbox would re-import this whole module
class CoalescingRecordingWorkflow:
    """Records the seq of every event the relay signals it, until told to finish."""

    @workflow.init
    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._finished = False

    @workflow.run
    async def run(self) -> list[int]:
        await workflow.wait_condition(lambda: self._finished)
        return self._seqs

    @workflow.signal
    def relayed_event(self, relayed: RelayedEvent) -> None:
        self._seqs.append(relayed.event.seq)

    @workflow.signal
    def finish(self) -> None:
        self._finished = True

    @workflow.query
    def events(self) -> list[int]:
        return self._seqs


@dataclass
class Runner:
    """A run's GPU side: signs its events with the run's secret and posts them to a relay."""

    run_id: str
    execution: str
    secret: str
    handle: WorkflowHandle[Any, Any]
    http: httpx.AsyncClient
    seq: int = 0

    def event(self, event_type: EventType, data: BaseModel) -> RunnerEvent:
        self.seq += 1
        return protocol.make_event(self.run_id, self.seq, data, event_type)

    async def post(self, relay: str, event: RunnerEvent) -> httpx.Response:
        body, headers = protocol.sign_event(self.secret, event)
        url = f"{relay}/v1/runs/{self.run_id}/executions/{self.execution}/events"
        return await self.http.post(url, content=body, headers=headers)

    async def progress(self, relay: str, step: int) -> httpx.Response:
        data = TrainingProgressData(step=step, total=100, loss=1.0 / step, eta_s=100.0 - step)
        return await self.post(relay, self.event("training.progress", data))

    async def received(self) -> list[int]:
        seqs: list[int] = await self.handle.query(CoalescingRecordingWorkflow.events)
        return seqs


async def relayed(client: Client, handle: WorkflowHandle[Any, Any]) -> list[RunnerEvent]:
    """The runner events the relay signalled to the run, in the order of its history."""
    events: list[RunnerEvent] = []
    async for history_event in handle.fetch_history_events():
        if not history_event.HasField("workflow_execution_signaled_event_attributes"):
            continue
        signalled = history_event.workflow_execution_signaled_event_attributes
        if signalled.signal_name != RELAYED_EVENT_SIGNAL:
            continue
        [arg] = await client.data_converter.decode(signalled.input.payloads, [RelayedEvent])
        assert isinstance(arg, RelayedEvent)
        events.append(arg.event)
    return events


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Poll until `condition` holds; the seconds it took. Fails after `timeout_s`."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@contextlib.contextmanager
def relay_with(settings: Settings, client: Client, interval_s: float) -> Iterator[str]:
    coalescing = settings.model_copy(update={"relay_progress_interval_s": interval_s})
    with serve_asgi(create_app(coalescing, client)) as base_url:
        yield base_url


@pytest.fixture
def relay_settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy(update={"task_queue": f"tq-{uuid.uuid4()}"})


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
async def runner(
    dev_env: WorkflowEnvironment, relay_settings: Settings, http: httpx.AsyncClient
) -> AsyncIterator[Runner]:
    """A running recording workflow (a fresh run id) and the runner of its execution."""
    async with Worker(
        dev_env.client,
        task_queue=relay_settings.task_queue,
        workflows=[CoalescingRecordingWorkflow],
    ):
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        handle = await dev_env.client.start_workflow(
            CoalescingRecordingWorkflow.run, id=run_id, task_queue=relay_settings.task_queue
        )
        execution = handle.first_execution_run_id
        assert execution is not None
        master = relay_settings.require_master_secret()
        secret = protocol.derive_run_secret(master, run_id, execution)
        yield Runner(run_id, execution, secret, handle, http)
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")


# --------------------------------------------------------------------------------------------
# The recording workflow: timing and order
# --------------------------------------------------------------------------------------------


async def test_a_burst_of_progress_is_at_most_one_signal_per_interval_carrying_the_last(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, INTERVAL_S) as relay:
        started = time.monotonic()
        answers = [await runner.progress(relay, step) for step in range(1, 21)]
        posted_s = time.monotonic() - started
        assert [a.status_code for a in answers] == [202] * 20, answers[-1].text
        await eventually(lambda: has_seq(runner, runner.seq), INTERVAL_S + SLACK_S)
        signalled = await relayed(dev_env.client, runner.handle)
    # The first at once (nothing sent for an interval), then the newest when the interval is
    # up: 2, unless posting 20 events took this machine longer than an interval.
    assert len(signalled) <= 1 + math.ceil(posted_s / INTERVAL_S)
    assert len(signalled) <= 2 or posted_s > INTERVAL_S
    assert signalled[0].seq == 1
    last = signalled[-1]
    assert last.seq == 20
    data = last.parsed()
    assert isinstance(data, TrainingProgressData)
    assert (data.step, data.loss, data.eta_s) == (20, 1.0 / 20, 80.0)


async def test_a_milestone_goes_through_at_once_after_the_progress_held_before_it(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    # An interval far longer than the test: only the milestone can have sent what was held.
    with relay_with(relay_settings, dev_env.client, 600) as relay:
        answers = [await runner.progress(relay, step) for step in range(1, 6)]
        milestone = runner.event("images.ready", ImagesReadyData(image_count=3, bytes=300))
        answers.append(await runner.post(relay, milestone))
        assert [a.status_code for a in answers] == [202] * 6, answers[-1].text
        # Signalled before its 202 (the history shows it once the workflow task that was in
        # flight completes), right after the progress held before it.
        await eventually(lambda: has_seq(runner, 6), SLACK_S)
        assert [e.seq for e in await relayed(dev_env.client, runner.handle)] == [1, 5, 6]


async def test_a_lone_progress_arrives_at_once(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    # Nothing sent for this run in the last interval: signalled before the answer, not when an
    # interval far longer than the test is up.
    with relay_with(relay_settings, dev_env.client, 600) as relay:
        assert (await runner.progress(relay, 1)).status_code == 202
        await eventually(lambda: has_seq(runner, 1), SLACK_S)


async def test_a_held_progress_arrives_when_the_interval_is_up(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, INTERVAL_S) as relay:
        first = await runner.progress(relay, 1)
        sent_first = time.monotonic()
        assert first.status_code == 202, first.text
        second = await runner.progress(relay, 2)
        assert second.status_code == 202, second.text
        await eventually(lambda: has_seq(runner, 2), INTERVAL_S + SLACK_S)
        waited_s = time.monotonic() - sent_first
    assert waited_s <= INTERVAL_S + SLACK_S
    assert await runner.received() == [1, 2]


async def test_a_redundant_heartbeat_goes_with_the_progress_that_covers_it(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, 600) as relay:
        await runner.progress(relay, 1)
        beat = runner.event("heartbeat", HeartbeatData(stage="training", step=7))
        assert (await runner.post(relay, beat)).status_code == 202
        assert (await runner.progress(relay, 9)).status_code == 202
        done = runner.event(
            "training.completed", TrainingCompletedData(epoch_losses=[0.1], best_epoch=1)
        )
        assert (await runner.post(relay, done)).status_code == 202
    # The heartbeat's step 7 is behind progress step 9: one signal carries what both said.
    assert await runner.received() == [1, 3, 4]


async def test_a_heartbeat_that_still_says_something_goes_before_the_milestone_too(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    """A held heartbeat ahead of the held progress (its step is later) is not covered by it:
    both are signalled before the milestone, none after it."""
    with relay_with(relay_settings, dev_env.client, 600) as relay:
        await runner.progress(relay, 1)
        assert (await runner.progress(relay, 2)).status_code == 202
        beat = runner.event("heartbeat", HeartbeatData(stage="training", step=40))
        assert (await runner.post(relay, beat)).status_code == 202
        done = runner.event(
            "training.completed", TrainingCompletedData(epoch_losses=[0.1], best_epoch=1)
        )
        assert (await runner.post(relay, done)).status_code == 202
        await eventually(lambda: has_seq(runner, 4), SLACK_S)
    assert await runner.received() == [1, 2, 3, 4]


async def test_a_relay_shutting_down_delivers_what_it_held(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, 600) as relay:
        assert (await runner.progress(relay, 1)).status_code == 202
        assert (await runner.progress(relay, 2)).status_code == 202
        beat = runner.event("heartbeat", HeartbeatData(stage="upload", retry=1))
        assert (await runner.post(relay, beat)).status_code == 202
        assert await runner.received() == [1]  # held for the interval
    # A relay that stops sends all it holds (an interval apart no longer matters), in order.
    await eventually(lambda: has_seq(runner, 3), SLACK_S)
    assert await runner.received() == [1, 2, 3]


async def test_the_runner_hears_that_its_run_closed_while_its_progress_was_held(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, INTERVAL_S) as relay:
        assert (await runner.progress(relay, 1)).status_code == 202
        assert (await runner.progress(relay, 2)).status_code == 202  # held
        await runner.handle.signal(CoalescingRecordingWorkflow.finish)
        await runner.handle.result()

        async def told_closed() -> bool:
            return (await runner.progress(relay, runner.seq + 1)).status_code == 410

        # The held signal fails in the background; the runner's next post hears why.
        await eventually(told_closed, INTERVAL_S + SLACK_S)


async def test_interval_zero_signals_every_event(
    dev_env: WorkflowEnvironment, relay_settings: Settings, runner: Runner
) -> None:
    with relay_with(relay_settings, dev_env.client, 0) as relay:
        answers = [await runner.progress(relay, step) for step in range(1, 6)]
    assert [a.status_code for a in answers] == [202] * 5
    assert await runner.received() == [1, 2, 3, 4, 5]


async def has_seq(runner: Runner, seq: int) -> bool:
    return seq in await runner.received()


# --------------------------------------------------------------------------------------------
# The real TrainingWorkflow: what a user sees
# --------------------------------------------------------------------------------------------


def job_of(s3: Any, settings: Settings, handle: WorkflowHandle[Any, Any]) -> JobSpec:
    key = f"runs/{handle.id}/{handle.first_execution_run_id}/job-1.json"
    body = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    return JobSpec.model_validate_json(body)


READY_EVENTS = 4  # gpu, images, model and files ready


@dataclass
class RelayedRun:
    """A real run in training whose GPU events the test posts to the relay, signed as its
    runner signs them."""

    handle: WorkflowHandle[Any, Any]
    script: ScriptedEvents
    post: Callable[[RunnerEvent], Awaitable[int]]

    @classmethod
    async def in_training(
        cls,
        relay: str,
        http: httpx.AsyncClient,
        client: Client,
        settings: Settings,
        request: Any,
        s3: Any,
    ) -> RelayedRun:
        handle = await start_run(client, settings, request)
        await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=30)
        job = job_of(s3, settings, handle)
        url = f"{relay}{urlsplit(job.events_url).path}"

        async def post(event: RunnerEvent) -> int:
            body, headers = protocol.sign_event(job.webhook_secret, event)
            return (await http.post(url, content=body, headers=headers)).status_code

        script = ScriptedEvents(handle.id)
        ready = script.happy_path("unused", b"x")[:READY_EVENTS]
        script.seq = READY_EVENTS
        assert [await post(e) for e in ready] == [202] * READY_EVENTS
        await wait_for_status(handle, RunStatusName.TRAINING, timeout_s=30)
        return cls(handle, script, post)


async def test_a_training_run_shows_the_last_step_of_a_coalesced_burst(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any, s3: Any
) -> None:
    """The workflow takes progress whose seqs skip the ones coalesced away, and a milestone
    after it, in order (a watch follows the run: it gets progress at the relay's pace)."""
    provider = RecordingProvider(run_settings)
    client = dev_env.client
    with relay_with(run_settings, client, INTERVAL_S) as relay:
        async with running_worker(client, run_settings, provider), httpx.AsyncClient() as http:
            run = await RelayedRun.in_training(
                relay, http, client, run_settings, request_factory(), s3
            )
            handle, script, post = run.handle, run.script, run.post

            async with watching(client, run_settings, handle.id):
                burst = [
                    script.next(
                        "training.progress",
                        TrainingProgressData(step=step, total=40, epoch=1, loss=1.0 / step),
                    )
                    for step in range(1, 21)
                ]
                started = time.monotonic()
                assert [await post(e) for e in burst] == [202] * 20
                posted_s = time.monotonic() - started

                async def shows_step_20() -> bool:
                    status: RunStatus = await handle.query(TrainingWorkflow.status)
                    return status.progress is not None and status.progress.step == 20

                await eventually(shows_step_20, INTERVAL_S + SLACK_S)
                status: RunStatus = await handle.query(TrainingWorkflow.status)
                assert status.progress is not None
                assert (status.progress.percent, status.progress.loss) == (50.0, 1.0 / 20)

                more = [
                    script.next(
                        "training.progress", TrainingProgressData(step=step, total=40, loss=0.01)
                    )
                    for step in (30, 40)
                ]
                completed = script.next(
                    "training.completed",
                    TrainingCompletedData(epoch_losses=[0.2, 0.1], best_epoch=2),
                )
                assert [await post(e) for e in [*more, completed]] == [202] * 3

                async def has_completed() -> bool:
                    return completed.seq in [e.seq for e in await relayed(client, handle)]

                await eventually(has_completed, SLACK_S)
                signalled = [e for e in await relayed(client, handle) if e.seq > READY_EVENTS]
                progress_signals = [e for e in signalled if e.type == "training.progress"]
                # Step 40 was held (step 30's interval had not passed, or it went alone) and went
                # out just before the milestone, which was signalled before its 202.
                assert [e.seq for e in signalled][-2:] == [more[-1].seq, completed.seq]
                # The burst's first, its last when the interval was up, then at most both of `more`.
                assert len(progress_signals) <= 1 + math.ceil(posted_s / INTERVAL_S) + 2
                assert len(progress_signals) < len(burst) + len(more)

                async def shows_the_losses() -> bool:
                    status: RunStatus = await handle.query(TrainingWorkflow.status)
                    return status.epoch_losses == [0.2, 0.1]

                await eventually(shows_the_losses, SLACK_S)
                status = await handle.query(TrainingWorkflow.status)
                assert status.progress is not None and status.progress.step == 40
                await handle.cancel()
                final, _ = await finish(handle)
        assert final.status == RunStatusName.CANCELLED
        assert sorted(provider.destroyed) == sorted(provider.created)


async def test_a_run_nobody_watches_gets_its_progress_at_its_own_pace_until_a_watch_comes(
    dev_env: WorkflowEnvironment, run_settings: Settings, request_factory: Any, s3: Any
) -> None:
    """Unwatched, a run in training asks for its progress every half of its idle deadline (150
    s here), so a steady stream of progress is one signal; a watch brings it back to the
    relay's interval within one recheck."""
    settings = run_settings.model_copy(
        update={"relay_progress_recheck_s": INTERVAL_S, "relay_max_events_per_minute": 1000}
    )
    client = dev_env.client
    with relay_with(settings, client, INTERVAL_S) as relay:
        async with (
            running_worker(client, settings, RecordingProvider(settings)),
            httpx.AsyncClient() as http,
        ):
            run = await RelayedRun.in_training(relay, http, client, settings, request_factory(), s3)
            handle, script, post = run.handle, run.script, run.post

            async def stream(steps: range) -> None:
                for step in steps:
                    progress = TrainingProgressData(step=step, total=1000, loss=0.1)
                    assert await post(script.next("training.progress", progress)) == 202
                    await asyncio.sleep(INTERVAL_S / 5)

            async def progress_signals() -> list[int]:
                return [
                    e.parsed().step  # type: ignore[union-attr]
                    for e in await relayed(client, handle)
                    if e.type == "training.progress"
                ]

            assert await handle.query("progress_every_s") == 150.0

            await stream(range(1, 31))  # 6 intervals of the relay's pace
            # The first at once, then the run's pace (one more if the relay's first question
            # was answered only after an interval had passed, on a loaded machine).
            unwatched = await progress_signals()
            assert unwatched[0] == 1 and len(unwatched) <= 2

            async with watching(client, settings, handle.id):

                async def shows(step: int) -> bool:
                    status: RunStatus = await handle.query(TrainingWorkflow.status)
                    return status.progress is not None and status.progress.step == step

                await stream(range(31, 61))
                await eventually(lambda: shows(60), INTERVAL_S + SLACK_S)
            watched = [step for step in await progress_signals() if step > 30]
            # Back at the relay's pace: far more than one, far fewer than every event.
            assert 2 <= len(watched) < 30
            await handle.terminate("test over")
