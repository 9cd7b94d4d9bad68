"""Fifty runs at once on the fake Vast with Vast's real rate limits on (shrunk x0.05, as in
tests/test_vast_limits.py): the dev server, local S3, the worker with the Vast provider and the
fleet watch. The hosts only sleep; the test plays each run's GPU events (signals, as the relay
sends them), so what is measured is the provider side: every create, show, list and destroy
goes through one paced client for the key.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from temporalio.testing import WorkflowEnvironment

from activities.providers.vast import VastProvider
from common.settings import Settings
from worker.main import ensure_fleet_watch
from workflows.models import RunStatusName, TrainingRequest
from workflows.reaper import ReaperSummary, ReaperWorkflow

from .fake_civitai import checkpoint_bytes
from .fakes.vast_api import FakeVast, make_offer
from .test_vast_integration import QUICK_BOOT, finish
from .test_workflow import MODEL_BYTES, send_all, upload_model
from .vast_support import fake_vast
from .workflow_support import (
    ScriptedEvents,
    put_dataset,
    running_worker,
    start_run,
    wait_for_status,
)

RUNS = 50
OFFERS = [make_offer(n, dph_total=0.30 + n / 1000) for n in range(1, RUNS + 21)]
SLEEPING_HOST = ["sleep", "600"]


def never_two_at_once(fake: FakeVast) -> dict[str, int]:
    """Per run label prefix (the run, any attempt): the most instances it had live at once."""
    by_run: dict[str, list[tuple[float, float]]] = {}
    for instance in fake.created():
        run = (instance.label or "").rsplit(":", 1)[0]
        end = instance.destroyed_at if instance.destroyed_at is not None else float("inf")
        by_run.setdefault(run, []).append((instance.created_at, end))
    most: dict[str, int] = {}
    for run, spans in by_run.items():
        most[run] = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    return most


async def test_fifty_runs_at_once_within_vasts_limits(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Path
) -> None:
    s3.put_object(
        Bucket=settings.bucket, Key="models/base-sd15.safetensors", Body=checkpoint_bytes("sd15")
    )
    images = put_dataset(s3, settings.bucket, "uploads/cats/", count=3)
    request = TrainingRequest.model_validate(
        {
            "images": images,
            "model": f"s3://{settings.bucket}/models/base-sd15.safetensors",
            "training": {"epochs": 2, "repeats": 1},
            "deadlines": QUICK_BOOT.model_copy(update={"pending_gpu_s": 600}),
        }
    )
    with fake_vast(
        settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPING_HOST, limits=True
    ) as (fake, vast_settings):
        run_settings = vast_settings.model_copy(
            update={
                "relay_health_check": False,
                "vast_offers_per_allocation": 10,
                "fleet_watch_interval_s": 1.0,
            }
        )
        client = dev_env.client
        async with running_worker(client, run_settings, VastProvider(run_settings)):  # type: ignore[arg-type]
            watch_id = await ensure_fleet_watch(client, run_settings)
            try:

                async def one_run(n: int) -> Any:
                    handle = await start_run(
                        client, run_settings, request, f"fleet-{n}-{uuid.uuid4().hex[:6]}"
                    )
                    await wait_for_status(handle, RunStatusName.PENDING_GPU, timeout_s=300)
                    key = upload_model(s3, run_settings, handle)
                    await send_all(handle, ScriptedEvents(handle.id).happy_path(key, MODEL_BYTES))
                    return await finish(handle, timeout_s=300)

                statuses = await asyncio.gather(*(one_run(n) for n in range(RUNS)))
                reaped: ReaperSummary = await client.execute_workflow(
                    ReaperWorkflow.run,
                    id=f"reaper-{uuid.uuid4().hex[:8]}",
                    task_queue=run_settings.task_queue,
                )
            finally:
                await client.get_workflow_handle(watch_id).terminate("test over")

    assert [s.status for s in statuses] == [RunStatusName.COMPLETED] * RUNS
    # Every destroy reported success: no run names a GPU it could not give back.
    assert [s.gpu_not_released for s in statuses] == [None] * RUNS
    assert fake.live() == []
    assert sorted(fake.destroyed_ids()) == sorted(i.id for i in fake.created())
    # No run was ever billed for two instances at once.
    assert set(never_two_at_once(fake).values()) == {1}
    # The reaper's pass completed: nothing orphaned, nothing left unsettled.
    assert reaped.unsettled == [] and reaped.destroyed == []
    # One paced client kept every call inside Vast's limits.
    assert fake.limit_429s == []
    # Allocations start at different near-equal offers, so few creates find theirs taken.
    creates = len(fake.calls_to("create"))
    print(f"{creates} creates for {RUNS} rentals")
    assert creates < 2 * RUNS
