"""P10: history events per run-hour in training, with and without one watch attached.

The real workflow on the time-skipping test server, the real worker (local provider, a host
that only sleeps), SeaweedFS. The run reaches training, then one simulated hour passes with
what the relay delivers: the runner's progress every 10 s, coalesced as the relay does (one
signal per `relay_progress_interval_s`, default 10 s, or per the longer interval the run asks
for while nobody watches it: its `progress_every_s` query, asked every 30 s). With a watch, a
task follows the run as `loratrain watch` does (`LoraClient.watch`: wait_for_change, answered
on every change). Counted: the events the run's histories gained over the hour, across
continue-as-new. `python -m bench P10`.
"""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.common import Row, bench_settings, local_s3, s3_client

HOUR_S = 3600
PROGRESS_INTERVAL_S = 10.0
RECHECK_S = 30.0
GOAL = 120


async def events_in_a_training_hour(watched: bool) -> int:
    from gpu_runner.protocol import TrainingProgressData
    from tests.workflow_support import (
        SLEEPING_RUNNER,
        RecordingProvider,
        local_model,
        make_request,
        put_dataset,
        relay_event,
        running_worker,
        started_in_training,
        time_skipping_server,
        watching,
    )

    with local_s3() as endpoint, tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        settings = bench_settings(
            endpoint,
            Path(tmp) / "state",
            local_runner_command=SLEEPING_RUNNER,
            relay_health_check=False,
        )
        images = put_dataset(s3_client(endpoint), settings.bucket, "uploads/cats/")
        request = make_request(
            images,
            local_model(Path(tmp)),
            continue_as_new_after_events=9000,
        )
        async with (
            time_skipping_server(settings) as env,
            running_worker(env.client, settings, RecordingProvider(settings)),
        ):
            handle, script = await started_in_training(env.client, settings, request)
            following = watching(env.client, settings, handle.id) if watched else nullcontext()
            async with following:
                before = (await handle.describe()).raw_description.workflow_execution_info
                first_run = before.execution.run_id
                steps = int(HOUR_S / PROGRESS_INTERVAL_S)
                # The relay's rule (relay/app.py ProgressCoalescer), in the skipped time: the
                # runner posts every 10 s; a signal goes when the run's interval (the longer of
                # the relay's and what the run asks for, asked every 30 s) is up.
                every_s, asked_at, signalled_at = 0.0, -RECHECK_S, -HOUR_S
                for step in range(1, steps + 1):
                    await env.sleep(PROGRESS_INTERVAL_S)
                    now = step * PROGRESS_INTERVAL_S
                    if now - asked_at >= RECHECK_S:
                        every_s, asked_at = await wanted(handle), now
                    if now - signalled_at >= max(PROGRESS_INTERVAL_S, every_s):
                        progress = TrainingProgressData(step=step, total=10 * steps, loss=0.1)
                        await relay_event(handle, script.next("training.progress", progress))
                        signalled_at = now
                gained = await events_since(env.client, handle.id, first_run)
            gained -= before.history_length
            await handle.terminate("measured")
    return gained


async def events_since(client: Any, run_id: str, first_run: str) -> int:
    """Events in the histories of `first_run` and every execution that continued from it."""
    total, handle = 0, client.get_workflow_handle(run_id)
    while True:
        info = (await handle.describe()).raw_description.workflow_execution_info
        total += info.history_length
        if info.execution.run_id == first_run:
            return total
        started = (await handle.fetch_history()).events[0]
        previous = started.workflow_execution_started_event_attributes.continued_execution_run_id
        handle = client.get_workflow_handle(run_id, run_id=previous)


async def wanted(handle: Any) -> float:
    """The run's answer to the relay's question (0 from code that does not ask it)."""
    try:
        return float(await handle.query("progress_every_s"))
    except Exception:
        return 0.0


def p10_events_per_run_hour() -> Row:
    alone = asyncio.run(events_in_a_training_hour(watched=False))
    watched = asyncio.run(events_in_a_training_hour(watched=True))
    return Row(
        "P10",
        "history events per run-hour in training (progress every 10 s)",
        f"{alone} alone, {watched} watched",
        "goal",
        f"{alone / GOAL:.1f} x",
        f"<= {GOAL}",
        alone <= GOAL,
    )


if __name__ == "__main__":
    print(p10_events_per_run_hour())
