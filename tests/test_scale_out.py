"""Scaling out on one Temporal: two workers and two relays on one task queue, as real processes
(`loratrain worker`, `loratrain relay`), with the real local S3 and the local GPU provider running
the real runner (the sd-scripts stand-in as its trainer). Mid-run, a relay that carries a run's
events and a worker that holds a run are killed with SIGKILL; every run completes on its first GPU.

The GPUs reach the relays as production's GPUs do: through one address, a load balancer that
hands each connection to the next relay that accepts it (`LoadBalancer`, standing in for the
operator's reverse proxy). A runner knows that one URL and retries every failed post; the relay
keeps no state a run needs, so the other relay takes the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.providers.local import LocalProvider
from common.settings import Settings
from worker.main import REAPER_SCHEDULE_ID
from workflows.models import RunStatus, RunStatusName
from workflows.training import TrainingWorkflow

from .conftest import free_port
from .processes import Captured
from .test_vast_integration import worker_env
from .workflow_support import local_model, make_request, put_dataset, start_run

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "sd_scripts_standin"
RUNS = 4
# 4 images x 4 repeats x 4 epochs in batches of 2 (SD 1.5's), 0.5 s a step: each run trains for
# 16 s, long enough to kill a relay and then a worker while every run trains on a loaded machine.
TRAINING = {"epochs": 4, "repeats": 4}
STEP_S = 0.5
# The relay's INFO line for each event it signalled to a run.
DELIVERED = re.compile(r"loratrain\.relay: delivered run=(\S+) attempt=\d+ seq=(\d+) type=(\S+)")


class LoadBalancer:
    """One address for several relays: each connection goes to the next relay that accepts it,
    so a dead relay's share moves to the others on the runners' next connection."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._turn = itertools.count()
        self._connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self._server.close()
            for task in self._connections:
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            start = next(self._turn)
            for i in range(len(self._ports)):
                port = self._ports[(start + i) % len(self._ports)]
                try:
                    upstream = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue  # that relay is down: the next one
                await asyncio.gather(
                    self._pipe(reader, upstream[1]), self._pipe(upstream[0], writer)
                )
                upstream[1].close()
                break
        finally:
            writer.close()
            self._connections.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy until either side ends; then end both, as a proxy does when a backend dies."""
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


@dataclass
class Relay:
    name: str
    port: int
    process: Captured

    def delivered(self, since: int = 0) -> list[tuple[str, int, str]]:
        """(run, seq, type) of each event this relay signalled, from output offset `since`."""
        return [
            (run, int(seq), kind)
            for run, seq, kind in DELIVERED.findall(self.process.output[since:])
        ]


@dataclass
class Fleet:
    client: Client
    settings: Settings
    relays: list[Relay]
    workers: list[Captured]

    def logs(self) -> str:
        parts = [f"--- relay {r.name}\n{r.process.output[-4000:]}" for r in self.relays]
        parts += [f"--- worker {w.proc.pid}\n{w.output[-4000:]}" for w in self.workers]
        return "\n".join(parts)


def identity(worker: Captured) -> str:
    """The Temporal identity a worker process polls with (the SDK's default: pid@host)."""
    return f"{worker.proc.pid}@{socket.gethostname()}"


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, fleet: Fleet, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{fleet.logs()}")
        await asyncio.sleep(0.2)


async def relay_is_up(port: int) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        try:
            answer = await http.get(f"http://127.0.0.1:{port}/healthz")
        except httpx.HTTPError:
            return False
    return answer.status_code == 200 and answer.json()["temporal_connected"] is True


@pytest.fixture
async def fleet(
    dev_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """Two relays behind one address and two workers on one task queue, all real processes
    sharing one Temporal, one bucket and one provider (state dir)."""
    ports = [free_port(), free_port()]
    balancer = LoadBalancer(ports)
    started: list[Captured] = []
    async with balancer.serving() as relay_url:
        shared = settings.model_copy(
            update={
                "relay_public_url": relay_url,
                "relay_health_check": True,
                # The stand-in trainer's pace, through what launches the runner.
                "local_runner_command": [
                    "env",
                    f"STANDIN_STEP_S={STEP_S}",
                    sys.executable,
                    "-m",
                    "gpu_runner",
                ],
            }
        )
        env = {
            **worker_env(shared, dev_env.client.service_client.config.target_host),
            "PYTHONUNBUFFERED": "1",
            "LORA_RELAY_PROGRESS_INTERVAL_S": "1",
            # The runner's own settings, which the local provider passes on.
            "LORA_RUNNER_REQUIRE_GPU": "false",
            "LORA_RUNNER_SD_SCRIPTS_DIR": str(STANDIN),
            "LORA_RUNNER_ACCELERATE_COMMAND": json.dumps(
                [sys.executable, str(STANDIN / "accelerate")]
            ),
            "LORA_RUNNER_TOKENIZER_CACHE_DIR": str(tmp_path / "tokenizers"),
            "LORA_RUNNER_RETRY_INITIAL_S": "0.2",
            "LORA_RUNNER_RETRY_MAX_S": "1",
            "LORA_RUNNER_PROGRESS_INTERVAL_S": "2",
            "LORA_RUNNER_DISK_MARGIN_BYTES": "0",
        }

        def start(args: list[str], extra: dict[str, str] | None = None) -> Captured:
            process = Captured(
                [sys.executable, "-m", "cli", *args], cwd=ROOT, env={**env, **(extra or {})}
            )
            started.append(process)
            return process

        try:
            relays = [
                Relay(name, port, start(["relay"], {"LORA_RELAY_PORT": str(port)}))
                for name, port in zip("AB", ports, strict=True)
            ]
            workers = [start(["worker"]), start(["worker"])]
            fleet = Fleet(dev_env.client, shared, relays, workers)
            for relay in relays:
                await eventually(lambda r=relay: relay_is_up(r.port), f"relay {relay.name}", fleet)
            for worker in workers:
                await asyncio.to_thread(worker.wait_for_line, "worker polling task queue", 60)
            yield fleet
        finally:
            for process in started:
                process.kill()
            # The killed worker's runners outlive it, in sessions of their own: as `dev` does.
            provider = LocalProvider(shared)
            for instance in provider.list_instances():
                provider.destroy(instance.instance_id)
            client = dev_env.client
            with contextlib.suppress(Exception):
                await client.get_schedule_handle(REAPER_SCHEDULE_ID).delete()
            query = f"TaskQueue = '{shared.task_queue}' AND ExecutionStatus = 'Running'"
            async for execution in client.list_workflows(query):
                with contextlib.suppress(Exception):
                    await client.get_workflow_handle(execution.id).terminate("test ended")


async def task_identities(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Who completed each workflow task of the run, in order."""
    history = await handle.fetch_history()
    return [
        e.workflow_task_completed_event_attributes.identity
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]


async def test_runs_complete_when_a_relay_and_a_worker_are_killed(
    fleet: Fleet, s3: Any, tmp_path: Path
) -> None:
    settings = fleet.settings
    images = put_dataset(s3, settings.bucket, "uploads/scale/", count=4)
    model = local_model(tmp_path)
    handles = [
        await start_run(
            fleet.client,
            settings,
            make_request(images, model, training=TRAINING),
            run_id=f"scale-{i}-{uuid.uuid4().hex[:8]}",
        )
        for i in range(RUNS)
    ]
    runs = {h.id for h in handles}

    async def every_run_trains_through_both_relays() -> bool:
        seen = {r.name: r.delivered() for r in fleet.relays}
        progressing = {
            run for found in seen.values() for run, _, t in found if t == "training.progress"
        }
        done = {run for found in seen.values() for run, _, t in found if t == "training.completed"}
        assert not done, f"a run finished training before the kills: size TRAINING up\n{seen}"
        return progressing == runs and all(
            any(run in runs for run, _, _ in found) for found in seen.values()
        )

    await eventually(every_run_trains_through_both_relays, "every run training", fleet, 90)

    # Kill the relay that carries a run's progress; that run's next post goes to the other.
    killed_relay, other_relay = fleet.relays
    carried = {run for run, _, t in killed_relay.delivered() if t == "training.progress"}
    assert carried, fleet.logs()
    mark = len(other_relay.process.output)
    killed_relay.process.kill()

    async def the_other_relay_took_over() -> bool:
        return any(run in carried for run, _, _ in other_relay.delivered(since=mark))

    await eventually(the_other_relay_took_over, f"relay B to carry one of {carried}", fleet)

    # Kill the worker that completed a run's latest workflow task: it holds that run.
    last_tasks = {h.id: (await task_identities(h))[-1] for h in handles}
    statuses: list[RunStatus] = [await h.query(TrainingWorkflow.status) for h in handles]
    assert all(s.status == RunStatusName.TRAINING for s in statuses), statuses
    holder = next(w for w in fleet.workers if identity(w) in last_tasks.values())
    survivor = next(w for w in fleet.workers if w is not holder)
    held = {run for run, who in last_tasks.items() if who == identity(holder)}
    holder.kill()

    finals: list[RunStatus] = await asyncio.wait_for(
        asyncio.gather(*(h.result() for h in handles)), timeout=120
    )

    for final in finals:
        assert final.status == RunStatusName.COMPLETED, (final.error, fleet.logs())
        assert final.attempt == 1, final.gpu_failures  # on the GPU it had: nothing replaced
        assert final.result is not None
        lora = s3.get_object(Bucket=final.result.location.bucket, Key=final.result.location.key)
        assert hashlib.sha256(lora["Body"].read()).hexdigest() == final.result.sha256
    assert LocalProvider(settings).list_instances() == []
    # The runs the killed worker held went on on the other one.
    for handle in handles:
        if handle.id in held:
            identities = await task_identities(handle)
            assert identities[-1] == identity(survivor), identities
            assert identity(holder) in identities, identities
