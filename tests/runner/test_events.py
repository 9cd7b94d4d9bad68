"""EventSender against the recording relay over real HTTP: order, seqs, retries, coalescing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from gpu_runner.events import EventSender
from gpu_runner.protocol import (
    GpuReadyData,
    HeartbeatData,
    ImagesReadyData,
    TrainingProgressData,
    derive_run_secret,
)
from tests.http_support import serve_asgi
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET

RUN_ID = "run-events"


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, recorder.events_url(base, RUN_ID)


@asynccontextmanager
async def sender_for(
    events_url: str, *, orphan_timeout_s: float = 10, secret: str | None = None
) -> AsyncIterator[EventSender]:
    async with httpx.AsyncClient(timeout=2) as client:
        sender = EventSender(
            run_id=RUN_ID,
            attempt=2,
            events_url=events_url,
            secret=secret or derive_run_secret(MASTER_SECRET, RUN_ID),
            client=client,
            orphan_timeout_s=orphan_timeout_s,
            retry_initial_s=0.01,
            retry_max_s=0.05,
        )
        sender.start()
        try:
            yield sender
        finally:
            await sender.close()


def progress(step: int) -> TrainingProgressData:
    return TrainingProgressData(step=step, total=100)


async def test_delivers_in_order_with_contiguous_seqs(relay: tuple[RecordingRelay, str]) -> None:
    recorder, url = relay
    async with sender_for(url) as sender:
        sender.emit("gpu.ready", GpuReadyData(gpu_name="H100"))
        sender.emit("images.ready", ImagesReadyData(image_count=3, bytes=10))
        sender.emit("heartbeat", HeartbeatData(stage="model", bytes_done=1, bytes_total=2))
        assert await sender.flush(5)
    assert recorder.types(heartbeats=True) == ["gpu.ready", "images.ready", "heartbeat"]
    assert [e.seq for e in recorder.events] == [1, 2, 3]
    assert {e.attempt for e in recorder.events} == {2}
    assert recorder.bad_signatures == 0


async def test_relay_down_for_a_while_loses_nothing(relay: tuple[RecordingRelay, str]) -> None:
    recorder, url = relay
    recorder.fail_next(4)
    async with sender_for(url) as sender:
        sender.emit("gpu.ready", GpuReadyData())
        sender.emit("images.ready", ImagesReadyData(image_count=3, bytes=10))
        assert await sender.flush(5)
        recorder.fail_for(0.3)
        sender.emit("heartbeat", HeartbeatData(stage="model"))
        sender.emit("images.ready", ImagesReadyData(image_count=4, bytes=11))
        assert await sender.flush(5)
    assert recorder.types(heartbeats=True) == [
        "gpu.ready", "images.ready", "heartbeat", "images.ready"
    ]  # fmt: skip
    assert [e.seq for e in recorder.events] == [1, 2, 3, 4]
    retried = [a for a in recorder.answers if a.status == 503]
    assert len(retried) >= 5


async def test_newest_progress_replaces_a_waiting_one(relay: tuple[RecordingRelay, str]) -> None:
    recorder, url = relay
    recorder.fail_for(0.3)
    async with sender_for(url) as sender:
        sender.emit("training.progress", progress(1))  # in flight, retried while the relay is down
        await asyncio.sleep(0.05)
        started = time.monotonic()
        for step in range(2, 200):
            sender.emit("training.progress", progress(step))
        assert time.monotonic() - started < 0.1  # emitting never waits for the relay
        sender.emit("heartbeat", HeartbeatData(stage="training"))
        assert await sender.flush(5)
    steps = [e.data["step"] for e in recorder.of_type("training.progress")]
    assert steps == [1, 199]
    assert [e.seq for e in recorder.events] == [1, 2, 3]


async def test_refused_event_is_dropped_and_the_rest_go_on(
    relay: tuple[RecordingRelay, str],
) -> None:
    recorder, url = relay
    recorder.reject("images.ready", 400)
    async with sender_for(url) as sender:
        sender.emit("gpu.ready", GpuReadyData())
        sender.emit("images.ready", ImagesReadyData(image_count=3, bytes=10))
        sender.emit("heartbeat", HeartbeatData(stage="model"))
        assert await sender.flush(5)
        assert sender.dropped == 1 and not sender.gave_up.is_set()
    assert recorder.types(heartbeats=True) == ["gpu.ready", "heartbeat"]
    # The refused event used up seq 2.
    assert [e.seq for e in recorder.events] == [1, 3]


async def test_bad_signature_is_refused_by_the_relay(relay: tuple[RecordingRelay, str]) -> None:
    recorder, url = relay
    other = derive_run_secret(MASTER_SECRET, "another-run")
    async with sender_for(url, secret=other) as sender:
        sender.emit("gpu.ready", GpuReadyData())
        assert await sender.flush(5)
        assert sender.dropped == 1
    assert recorder.bad_signatures == 1 and recorder.events == []


async def test_410_closes_the_sender_at_once(relay: tuple[RecordingRelay, str]) -> None:
    recorder, url = relay
    recorder.close_on("images.ready")
    async with sender_for(url) as sender:
        sender.emit("gpu.ready", GpuReadyData())
        sender.emit("images.ready", ImagesReadyData(image_count=3, bytes=10))
        sender.emit("heartbeat", HeartbeatData(stage="model"))
        await asyncio.wait_for(sender.gave_up.wait(), 5)
        assert sender.give_up_reason == "closed"
        sender.emit("heartbeat", HeartbeatData(stage="model"))  # ignored from now on
        assert await sender.flush(1)
    assert recorder.types(heartbeats=True) == ["gpu.ready"]
    assert [a.status for a in recorder.answers] == [202, 410]


async def test_gives_up_when_nothing_is_delivered_for_the_orphan_timeout() -> None:
    async with sender_for("http://127.0.0.1:9/v1/runs/x/events", orphan_timeout_s=0.5) as sender:
        started = time.monotonic()
        sender.emit("gpu.ready", GpuReadyData())
        await asyncio.wait_for(sender.gave_up.wait(), 5)
        assert sender.give_up_reason == "orphaned"
        assert 0.4 < time.monotonic() - started < 2


async def test_orphaned_even_when_refused_events_leave_nothing_to_send(
    relay: tuple[RecordingRelay, str],
) -> None:
    recorder, url = relay
    recorder.reject("gpu.ready", 404)
    async with sender_for(url, orphan_timeout_s=0.4) as sender:
        sender.emit("gpu.ready", GpuReadyData())
        await asyncio.wait_for(sender.gave_up.wait(), 5)
        assert sender.give_up_reason == "orphaned"
