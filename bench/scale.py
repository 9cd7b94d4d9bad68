"""P6: many concurrent runs on one worker process and one dev server, driven by scripted runners
(no GPU runner or trainer processes: the local provider starts `sleep`) that post signed events
to the relay over HTTP and send training progress every 10 s.

For each progress event it measures event -> status: from posting the event to
`LoraClient.status` showing that step (a describe and the status query: what `loratrain status`
or a Python backend reads); the pending stage is awaited with `LoraClient.watch` (long polls of
`wait_for_change`, as `loratrain watch`). The worker runs as
`loratrain worker` in a process of its own, so its RSS is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from temporalio.client import Client

from bench.common import (
    CODEC_KEY,
    MASTER_SECRET,
    ROOT,
    S3_KEY_ID,
    S3_SECRET,
    Row,
    bench_settings,
    child_pid,
    cpu_seconds,
    local_s3,
    percentile,
    s3_client,
    signed_request,
)
from bench.latency import relay_process
from client import LoraClient
from common.settings import Settings
from gpu_runner import protocol
from gpu_runner.protocol import TrainingProgressData
from tests.workflow_support import (
    ScriptedEvents,
    dev_server,
    local_model,
    make_request,
    put_dataset,
)
from workflows.models import RunStatus, RunStatusName

PROGRESS_INTERVAL_S = 10.0
# Runs start at this rate (users start runs over time, not all in one instant), and each sends
# progress until the last one has started, so every run of a level is open at the same time.
# 4 a second is what this 2-core machine's intake carries with the rest of the level beside
# it: at 10 a second the starts' workflow and activity tasks came faster than the dev server
# and the worker took them (2026-12-05: 297 of 1,000 runs' first status query unanswered for
# 10 s, the machine's 2 cores full). A service with 1,000 runs of an hour open starts one
# every 3.6 s.
STARTS_PER_S = 4.0
MODEL_BYTES = b"lora-weights" * 1000
# One run in this many is followed as `loratrain watch` follows a run (a user looking at it),
# and its event -> status is what is measured; the rest train unwatched (their runs want
# progress every few minutes, so the relay holds most of it back).
WATCHED_EVERY = 20


@dataclass
class Outcome:
    """What one load level produced."""

    runs: int
    completed: int = 0
    stalled: int = 0
    other: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    # The same, for events posted after the level's last start was due: `runs` open at once,
    # no more starting (the last ones' intake may take a few seconds more).
    open_latencies: list[float] = field(default_factory=list)
    post_latencies: list[float] = field(default_factory=list)  # until the relay's 202
    all_started_at: float = float("inf")  # monotonic time the last run's start was due
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)  # CPU seconds / wall, per process

    def summary(self) -> str:
        p99 = percentile(self.latencies, 99) * 1000 if self.latencies else float("nan")
        ends = f"{self.completed}/{self.runs} completed, {self.stalled} stalled"
        if self.other:
            ends += f", other ends: {', '.join(sorted(set(self.other)))}"
        post99 = percentile(self.post_latencies, 99) * 1000 if self.post_latencies else 0.0
        open99 = percentile(self.open_latencies, 99) * 1000 if self.open_latencies else 0.0
        return (
            f"{self.runs} runs: {ends}; worker RSS peak {self.peak_rss_mb:.0f} MB;"
            f" event->status p99 {p99:.0f} ms (of which relay's 202 p99 {post99:.0f} ms),"
            f" {open99:.0f} ms once all had started; {self.wall_s:.0f} s"
        )

    def cpu(self) -> str:
        used = ", ".join(f"{name} {cores:.2f}" for name, cores in self.cores.items())
        return f"cores busy at {self.runs} run(s): {used}"

    @property
    def healthy(self) -> bool:
        """Issue 15's targets: every run completes, the worker under 500 MB, and event ->
        status p99 under 1 s up to 300 runs, under 2 s at 1,000."""
        p99_target_s = 1.0 if self.runs <= 300 else 2.0
        return (
            self.completed == self.runs
            and self.stalled == 0
            and self.peak_rss_mb < 500
            and bool(self.latencies)
            and percentile(self.latencies, 99) < p99_target_s
        )


@contextlib.contextmanager
def worker_process(settings: Settings, temporal_address: str, log_path: Path) -> Iterator[int]:
    """`loratrain worker` with the local provider starting `sleep` as each run's "GPU"."""
    # As deployed (the image's `pip install .` compiles bytecode): this machine's environment
    # sets PYTHONDONTWRITEBYTECODE=1, under which every run's workflow sandbox compiles the
    # workflow module from source again (a tenth of the worker's CPU while runs start).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LORA_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        {
            "PYTHONPYCACHEPREFIX": str(Path(settings.state_dir) / "pycache"),
            "LORA_STATE_DIR": str(settings.state_dir),
            "LORA_TEMPORAL_ADDRESS": temporal_address,
            "LORA_TASK_QUEUE": settings.task_queue,
            "LORA_CODEC_KEY": CODEC_KEY,
            "LORA_WEBHOOK_MASTER_SECRET": MASTER_SECRET,
            "LORA_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
            "LORA_S3_ACCESS_KEY_ID": S3_KEY_ID,
            "LORA_S3_SECRET_ACCESS_KEY": S3_SECRET,
            "LORA_BUCKET": settings.bucket,
            "LORA_RELAY_PUBLIC_URL": settings.relay_public_url,
            "LORA_GPU_PROVIDER": "local",
            "LORA_LOCAL_RUNNER_COMMAND": json.dumps(["sleep", "3600"]),
        }
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        # Runs the worker had no time to finish leave their "GPU" (a `sleep`) behind.
        for pid in _working_under(Path(settings.state_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _working_under(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(directory):
            found.append(int(entry.name))
    return found


def rss_mb(pid: int) -> float:
    """The process's resident memory now; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _post(relay_url: str, execution: str, event: protocol.RunnerEvent) -> None:
    """As the run's runner posts: to its job's events URL, signed with its job's secret, on a
    connection of its own. A bare HTTP/1.1 request over asyncio streams: a thousand runs share
    this one process, and with one httpx client for them all (a pool of 32 connections, then
    one per run) the posts queued in this process for up to 15 s (p99) while runs started, at
    0.28 of a core; these take 0.09 and the relay answers in 0.4 s (p99). A GPU posts from a
    machine of its own."""
    request = signed_request(relay_url, event, execution, close=True)
    url = urlsplit(relay_url)
    assert url.hostname is not None and url.port is not None
    for _ in range(30):  # as the runner does: 503, 429 and broken connections are retried
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            try:
                writer.write(request)
                answer = await asyncio.wait_for(reader.read(), 30)  # until the relay closes
            finally:
                writer.close()
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        status_line, _, rest = answer.partition(b"\r\n")
        if not status_line.startswith(b"HTTP/"):  # closed without an answer: send again
            await asyncio.sleep(0.1)
            continue
        status = int(status_line.split()[1])
        if status == 202:
            return
        if status not in (429, 503):
            raise RuntimeError(f"relay answered {status_line!r}: {rest[-200:]!r}")
        await asyncio.sleep(1)
    raise RuntimeError(f"run {event.run_id}: the relay did not take event {event.seq}")


def ramp_s(runs: int) -> float:
    """How long a level takes to start all its runs."""
    return max(PROGRESS_INTERVAL_S, runs / STARTS_PER_S) if runs > 1 else 0.0


def progress_events(runs: int) -> int:
    """Enough progress events that the first run still trains when the last one starts."""
    return max(3, math.ceil(ramp_s(runs) / PROGRESS_INTERVAL_S) + 2)


def level_budget_s(runs: int) -> float:
    """How long one run of a level may take before it counts as not finished: its start, its
    progress, and five minutes (a healthy run needs seconds beyond its progress)."""
    return ramp_s(runs) + progress_events(runs) * PROGRESS_INTERVAL_S + 300


class _Follower:
    """A watch on one run (`LoraClient.watch`, as `loratrain watch`): the newest step it saw."""

    def __init__(self) -> None:
        self.step = -1
        self.started = False
        self._changed = asyncio.Condition()

    async def follow(self, client: LoraClient, run_id: str) -> None:
        async for status in client.watch(run_id, waiting=False):
            async with self._changed:
                self.started = True
                if status.progress is not None:
                    self.step = status.progress.step
                self._changed.notify_all()
            if status.status.terminal:
                return

    async def until(self, done: Any) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: done(self))


async def _watch_until(client: LoraClient, run_id: str, done: Any) -> RunStatus:
    """As `loratrain watch` follows a run (`LoraClient.watch`): until `done` or the run ended."""
    seen: RunStatus | None = None
    async for seen in client.watch(run_id, waiting=False):
        if done(seen):
            break
    assert seen is not None  # watch yields at least the status it starts from
    return seen


async def _counted(outcome: Outcome, script: Coroutine[Any, Any, None]) -> None:
    """One run's scripted runner; what went wrong is counted, not raised: one slow run must not
    hide the others' figures."""
    budget_s = level_budget_s(outcome.runs)
    try:
        await asyncio.wait_for(script, budget_s)
    except TimeoutError:
        outcome.other.append(f"not finished within {budget_s:.0f} s")
    except Exception as e:
        outcome.other.append(f"{type(e).__name__}: {str(e)[:80]}")


async def _script(
    client: Client,
    settings: Settings,
    relay_url: str,
    request: Any,
    outcome: Outcome,
    spread_s: float,
    watched: bool,
) -> None:
    await asyncio.sleep(random.uniform(0, spread_s))  # runs start over a while, as users do
    runs = LoraClient(client, settings)
    run_id = await runs.start(request, run_id=f"scale-{uuid.uuid4().hex[:12]}")
    status = await _watch_until(runs, run_id, lambda s: s.status != RunStatusName.PENDING)
    if status.status.terminal:
        outcome.other.append(status.status.value)
        return
    execution = await runs.first_execution(run_id)
    key = f"runs/{run_id}/{execution}/model/lora.safetensors"
    s3 = s3_client(str(settings.s3_endpoint_url))
    await asyncio.to_thread(s3.put_object, Bucket=settings.bucket, Key=key, Body=MODEL_BYTES)
    events = ScriptedEvents(run_id).happy_path(
        key, MODEL_BYTES, epochs=progress_events(outcome.runs)
    )
    ready, progress, finished = events[:4], events[4:-2], events[-2:]
    for event in ready:
        await _post(relay_url, execution, event)
    follower = _Follower()
    following = asyncio.create_task(follower.follow(runs, run_id)) if watched else None
    if following is not None:
        await follower.until(lambda f: f.started)
    for event in progress:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        step = TrainingProgressData.model_validate(event.data).step
        sent = time.monotonic()
        await _post(relay_url, execution, event)
        outcome.post_latencies.append(time.monotonic() - sent)
        if following is not None:
            await follower.until(lambda f: f.step >= step)  # noqa: B023
            outcome.latencies.append(time.monotonic() - sent)
            if sent >= outcome.all_started_at:
                outcome.open_latencies.append(time.monotonic() - sent)
    for event in finished:
        await _post(relay_url, execution, event)
    if following is not None:
        following.cancel()
    final = await runs.wait(run_id)
    if final.status == RunStatusName.COMPLETED:
        outcome.completed += 1
    elif final.status == RunStatusName.STALLED:
        outcome.stalled += 1
    else:
        outcome.other.append(final.status.value)


async def _level(runs: int, work: Path, endpoint: str) -> Outcome:
    settings = bench_settings(endpoint, work / f"state-{runs}")
    outcome = Outcome(runs)
    s3 = s3_client(endpoint)
    images = put_dataset(s3, settings.bucket, "uploads/cats/", count=3)
    request = make_request(images, local_model(work))
    async with dev_server(settings) as env:
        address = env.client.service_client.config.target_host
        with relay_process(settings, address, work / f"relay-{runs}.log") as relay_url:
            run_settings = settings.model_copy(update={"relay_public_url": relay_url})
            with worker_process(run_settings, address, work / f"worker-{runs}.log") as pid:
                processes = {
                    "dev server": child_pid("temporal"),
                    "worker": pid,
                    "relay": child_pid("cli relay"),
                    "scripted runners": os.getpid(),
                }
                cpu_before = {name: cpu_seconds(p) for name, p in processes.items()}
                sampling = True

                async def sample() -> None:
                    while sampling:
                        outcome.peak_rss_mb = max(outcome.peak_rss_mb, rss_mb(pid))
                        await asyncio.sleep(0.5)

                sampler = asyncio.create_task(sample())
                started = time.monotonic()
                outcome.all_started_at = started + ramp_s(runs)
                await asyncio.gather(
                    *(
                        _counted(outcome, _script(
                            env.client, run_settings, relay_url, request, outcome,
                            spread_s=ramp_s(runs), watched=n % WATCHED_EVERY == 0,
                        ))
                        for n in range(runs)
                    )
                )  # fmt: skip
                outcome.wall_s = time.monotonic() - started
                outcome.cores = {
                    name: (cpu_seconds(p) - cpu_before[name]) / outcome.wall_s
                    for name, p in processes.items()
                }
                sampling = False
                await sampler
    return outcome


def p6_concurrent_runs(levels: tuple[int, ...] = (300, 1000)) -> Row:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="bench-p6-") as tmp, local_s3() as endpoint:
        work = Path(tmp)
        alone = asyncio.run(_level(1, work, endpoint))
        for runs in levels:
            outcomes.append(asyncio.run(_level(runs, work, endpoint)))
    largest = outcomes[-1]
    healthy = all(o.healthy for o in outcomes)
    return Row(
        "P6",
        "concurrent scripted runs on one worker + one dev server, progress every 10 s",
        "; ".join(o.summary() for o in outcomes),
        f"1 run: RSS {alone.peak_rss_mb:.0f} MB,"
        f" p99 {percentile(alone.latencies, 99) * 1000:.0f} ms",
        f"RSS {largest.peak_rss_mb / alone.peak_rss_mb:.2f} x at {largest.runs} runs",
        "1,000 runs: all complete, RSS < 500 MB, 0 missed deadlines, p99 < 2 s;"
        " 300 runs: p99 < 1 s",
        healthy if healthy is False or largest.runs >= 1000 else None,  # judged at 1,000
        f"runs start at {STARTS_PER_S:g} a second and send progress every"
        f" {PROGRESS_INTERVAL_S:g} s until all are open ({progress_events(largest.runs)} events"
        f" each at {largest.runs} runs); event -> status: from posting the event to a watch"
        f" (`LoraClient.watch`) on one run in {WATCHED_EVERY} showing it, the others unwatched;"
        " relay and worker are processes of their own; "
        + "; ".join(o.cpu() for o in [alone, *outcomes]),
    )
