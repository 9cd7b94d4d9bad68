"""P9: GPU time lost to a host failure, with resume from the last saved epoch and without.

The embedded stack's real parts (Temporal dev server, SeaweedFS, the relay, the worker with the
local provider) and the real runner training the demo's tiny model with the builtin trainer on
the CPU. Each run is killed (the host's whole process group, SIGKILL) at about 80 % of its
training; the run replaces the host, and the replacement either resumes (the default) or, with
`resume: false`, trains from the start as every run did before.

lost = attempt 2's wall time - (its setup + the remaining epochs' share), where setup runs from
the runner's start to its first training step, and the remaining share is the epochs left at
the kill times attempt 1's mean epoch time. Goal: at most one epoch.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from activities.providers.local import LOG_FILE
from bench.common import Row, bench_settings, local_s3, s3_client
from client import LoraClient
from gpu_runner.demo_assets import TINY_MODEL_FILENAME, build_tiny_model, write_demo_dataset
from relay.app import create_app
from tests.http_support import serve_asgi
from tests.workflow_support import (
    RecordingProvider,
    dev_server,
    make_request,
    running_worker,
)
from workflows.models import RunStatusName, S3Prefix

EPOCHS = 10
KILL_AT = 0.8
TRAINING = {
    "epochs": EPOCHS,
    "repeats": 40,
    "batch_size": 4,
    "resolution": 64,
    "network_dim": 4,
    "network_alpha": 4,
    "unet_lr": 1e-3,
    "text_encoder_lr": 0.0,
    "optimizer": "AdamW",
    "lr_scheduler": "constant",
    "trigger_word": "lrtdemo",
    "seed": 3,
}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class Lost:
    killed_at_epochs: float  # training progress at the kill, in epochs
    epoch_s: float  # attempt 1's mean epoch
    attempt2_s: float
    setup_s: float
    lost_s: float


def _times(log: str, pattern: str) -> list[float]:
    found = []
    for line in log.splitlines():
        stamp = _STAMP.match(line)
        if stamp and re.search(pattern, line):
            found.append(datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return found


def _lost(first: str, second: str, killed_at: float) -> Lost:
    """From the two attempts' logs (the runner's lines carry their time)."""
    starts = _times(first, r"training epochs 1-")
    ends = _times(first, r"epoch \d+/\d+: average loss")
    epoch_s = (ends[-1] - starts[0]) / len(ends)
    killed_at_epochs = len(ends) + (killed_at - ends[-1]) / epoch_s
    began = _times(second, r"")[0]
    training = _times(second, r"training epochs |resumed from epoch")[0]
    completed = _times(second, r"training\.completed")[0]
    attempt2_s, setup_s = completed - began, training - began
    lost_s = attempt2_s - setup_s - (EPOCHS - killed_at_epochs) * epoch_s
    return Lost(killed_at_epochs, epoch_s, attempt2_s, setup_s, lost_s)


async def _killed_run(stack: Any, images: S3Prefix, model: Path, resume: bool) -> Lost:
    client, settings, provider, s3 = stack
    request = make_request(
        images, model, trainer="builtin", training=TRAINING, samples={"enabled": False}
    )
    request = request.model_copy(update={"resume": resume})
    runs = LoraClient(client, settings)
    run_id = await runs.start(request)
    # Epoch times from the saved epochs, then the kill at KILL_AT of the run's epochs.
    while True:
        status = await runs.status(run_id, webhooks=False)
        assert not status.status.terminal, status.error
        if len(status.epochs) >= 2:
            break
        await asyncio.sleep(0.05)
    first_saved = time.monotonic()
    while len(status.epochs) < int(EPOCHS * KILL_AT) - 1:
        await asyncio.sleep(0.05)
        status = await runs.status(run_id, webhooks=False)
    per_epoch = (time.monotonic() - first_saved) / (len(status.epochs) - 2)
    await asyncio.sleep(per_epoch * (EPOCHS * KILL_AT - len(status.epochs)))
    records = {i: provider._record(i) for i in provider.created}
    [(instance, record)] = [
        (i, r) for i, r in records.items() if r is not None and run_id in r.label
    ]
    killed_at = time.time()
    os.killpg(record.pid, signal.SIGKILL)
    final = await asyncio.wait_for(runs.wait(run_id), timeout=900)
    assert final.status == RunStatusName.COMPLETED and final.attempt == 2, final.error
    # The killed host uploaded no log: its runner's output is in the instance's folder.
    first = (provider._directory(instance) / LOG_FILE).read_text(encoding="utf-8")
    prefix = final.epochs[0].manifest_key.split("/epochs/")[0]
    key = f"{prefix}/logs/attempt-2.log"
    second = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().decode()
    return _lost(first, second, killed_at)


async def _p9(work: Path, endpoint: str) -> tuple[Lost, Lost]:
    settings = bench_settings(endpoint, work / "state")
    s3 = s3_client(endpoint)
    os.environ.update(
        {
            "LORA_RUNNER_REQUIRE_GPU": "false",
            "LORA_RUNNER_WORKDIR": str(work / "gpu"),
            "LORA_RUNNER_DISK_MARGIN_BYTES": "0",
        }
    )
    model = build_tiny_model(work / TINY_MODEL_FILENAME)
    write_demo_dataset(work / "shapes")
    for path in sorted((work / "shapes").iterdir()):
        s3.put_object(Bucket=settings.bucket, Key=f"uploads/{path.name}", Body=path.read_bytes())
    images = S3Prefix(bucket=settings.bucket, prefix="uploads/")
    async with dev_server(settings) as env:
        with serve_asgi(create_app(settings, env.client)) as relay_url:
            run_settings = settings.model_copy(
                update={
                    "relay_public_url": relay_url,
                    "local_runner_command": [sys.executable, "-m", "gpu_runner"],
                }
            )
            provider = RecordingProvider(run_settings)
            async with running_worker(env.client, run_settings, provider):
                stack = (env.client, run_settings, provider, s3)
                resumed = await _killed_run(stack, images, model, resume=True)
                restarted = await _killed_run(stack, images, model, resume=False)
    return resumed, restarted


def p9_gpu_time_lost_to_a_host_failure() -> Row:
    with tempfile.TemporaryDirectory(prefix="bench-p9-") as tmp, local_s3() as endpoint:
        resumed, restarted = asyncio.run(_p9(Path(tmp), endpoint))
    return Row(
        "P9",
        f"GPU time lost to a host killed at ~{KILL_AT:.0%} of a run (builtin, tiny model, CPU)",
        f"resumed: lost {resumed.lost_s:.1f} s = {resumed.lost_s / resumed.epoch_s:.2f} epochs"
        f" (setup {resumed.setup_s:.1f} s)",
        f"from the start (resume: false): lost {restarted.lost_s:.1f} s ="
        f" {restarted.lost_s / restarted.epoch_s:.2f} epochs (setup {restarted.setup_s:.1f} s)",
        f"{resumed.lost_s / restarted.lost_s:.2f} x",
        "<= 1 epoch (+ setup)",
        resumed.lost_s <= resumed.epoch_s,
        f"{EPOCHS} epochs of {resumed.epoch_s:.2f} s; killed at {resumed.killed_at_epochs:.2f}"
        f" and {restarted.killed_at_epochs:.2f} epochs; attempt 2 took {resumed.attempt2_s:.1f} s"
        f" resumed, {restarted.attempt2_s:.1f} s from the start",
    )
