"""Every epoch durable, on the real parts: the builtin trainer on the demo's tiny model, the real
runner process, the relay handing out upload URLs, SeaweedFS, the Temporal dev server.

A host killed in the middle of a run is replaced, and the replacement resumes from the last
complete epoch: it trains only the epochs that were left, and ends with the very LoRA an
uninterrupted run with the same seed ends with.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load

from gpu_runner.demo_assets import (
    TINY_MODEL_FILENAME,
    build_tiny_model,
    demo_training_config,
    write_demo_dataset,
)
from gpu_runner.protocol import EpochManifest
from workflows.models import RunStatus, RunStatusName, S3Prefix, UserWebhook
from workflows.training import TrainingWorkflow

from .test_integration import STANDIN, USER_SECRET, Stack, stack  # noqa: F401 - the fixture
from .workflow_support import (
    CODE_VERSION,
    check_replays,
    local_model,
    make_request,
    put_dataset,
    start_run,
)

EPOCHS = 6
TRAINING = {
    **demo_training_config().model_dump(exclude_none=True),
    "epochs": EPOCHS,
    "repeats": 5,
    "output_name": "shapes",
    "seed": 11,
}
SAMPLES = {"steps": 2, "count": 1}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / TINY_MODEL_FILENAME)


def put_demo_dataset(s3: Any, bucket: str, prefix: str, folder: Path) -> S3Prefix:
    write_demo_dataset(folder)
    for path in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}{path.name}", Body=path.read_bytes())
    return S3Prefix(bucket=bucket, prefix=prefix)


def manifests(s3: Any, bucket: str, prefix: str) -> dict[int, EpochManifest]:
    found = {}
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    for item in listing:
        if item["Key"].endswith("/manifest.json"):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            manifest = EpochManifest.model_validate_json(body)
            found[manifest.epoch] = manifest
    return found


def run_prefix(status: RunStatus) -> str:
    assert status.epochs
    return status.epochs[0].manifest_key.split("/epochs/")[0]


async def wait_for(handle: Any, predicate: Any, timeout_s: float) -> RunStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status: RunStatus = await handle.query(TrainingWorkflow.status)
        if predicate(status):
            return status
        assert not status.status.terminal, status.error
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {status.status}"
        await asyncio.sleep(0.1)


def model_tensors(s3: Any, status: RunStatus) -> dict[str, Any]:
    assert status.result is not None
    location = status.result.location
    return load(s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read())


async def test_a_killed_host_is_replaced_and_resumes_from_the_last_complete_epoch(
    stack: Stack,  # noqa: F811 - the fixture
    s3: Any,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    bucket = stack.settings.bucket
    images = put_demo_dataset(s3, bucket, "uploads/shapes/", tmp_path / "shapes")
    webhook = UserWebhook(url=stack.webhook_url, secret=USER_SECRET)
    request = make_request(
        images,
        tiny_model,
        trainer="builtin",
        training=TRAINING,
        samples=SAMPLES,
        keep="last",
        webhook=webhook,
    )
    # The same run, uninterrupted, beside it: its LoRA is what the resumed one must end with.
    whole = await start_run(stack.client, stack.settings, request, run_id="epochs-whole")
    handle = await start_run(stack.client, stack.settings, request, run_id="epochs-resumed")

    # Once epoch 3 is saved the host is frozen (in epoch 4), then killed: no file moves after
    # the look at what S3 holds.
    saved = await wait_for(handle, lambda st: len(st.epochs) >= 3, timeout_s=240)
    records = [stack.provider._record(i) for i in stack.provider.created]
    [record] = [r for r in records if r is not None and handle.id in r.label]
    os.killpg(record.pid, signal.SIGSTOP)
    complete = manifests(s3, bucket, run_prefix(saved))
    os.killpg(record.pid, signal.SIGKILL)
    resumed_from = max(complete)
    assert 3 <= resumed_from < EPOCHS, sorted(complete)

    final: RunStatus = await asyncio.wait_for(handle.result(), timeout=300)
    uninterrupted: RunStatus = await asyncio.wait_for(whole.result(), timeout=300)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert final.attempt == 2 and len(final.gpu_failures) == 1
    assert final.resumed == [f"resumed from epoch {resumed_from} on attempt 2"]
    # The epoch list goes on: the first epochs from attempt 1, the rest trained by attempt 2.
    assert [e.epoch for e in final.epochs] == list(range(1, EPOCHS + 1))
    assert [e.attempt for e in final.epochs] == [1] * resumed_from + [2] * (EPOCHS - resumed_from)
    # Bit for bit the uninterrupted run's losses and LoRA (same seed, same CPU, one thread).
    assert final.epoch_losses == uninterrupted.epoch_losses
    assert [e.loss for e in final.epochs] == final.epoch_losses
    resumed_lora, whole_lora = model_tensors(s3, final), model_tensors(s3, uninterrupted)
    assert resumed_lora.keys() == whole_lora.keys()
    assert all((resumed_lora[k] == whole_lora[k]).all() for k in whole_lora)
    assert final.result is not None and final.result.epoch == EPOCHS  # keep: last

    # Attempt 2's trainer said where it started and trained only what was left.
    log_key = f"{run_prefix(final)}/logs/attempt-2.log"
    log = s3.get_object(Bucket=bucket, Key=log_key)["Body"].read().decode()
    assert f"resumed from epoch {resumed_from}" in log
    assert f"epoch {resumed_from}/{EPOCHS}: average loss" not in log
    assert f"epoch {EPOCHS}/{EPOCHS}: average loss" in log

    # Every epoch has its sample; the training states went with the run, the rest stays.
    left = {
        item["Key"]
        for item in s3.list_objects_v2(Bucket=bucket, Prefix=run_prefix(final)).get("Contents", [])
    }
    for epoch in final.epochs:
        assert epoch.lora.key in left and epoch.manifest_key in left
        assert len(epoch.samples) == 1 and epoch.samples[0].key in left
    assert not [key for key in left if key.endswith("state.tar")]

    # The user heard of every epoch, with URLs that serve the files.
    await stack.receiver.wait_for_async(2 * EPOCHS, types=["training.epoch"], timeout_s=30)
    hooks = [h for h in stack.receiver.accepted() if h.type == "training.epoch"]
    assert all(h.verified for h in hooks)
    ours = sorted(
        (h.json["data"] for h in hooks if h.json["run_id"] == handle.id), key=lambda d: d["epoch"]
    )
    assert [d["epoch"] for d in ours] == list(range(1, EPOCHS + 1))
    async with httpx.AsyncClient() as client:
        sample = await client.get(ours[-1]["samples"][0]["url"])
    assert sample.status_code == 200 and sample.content.startswith(b"\x89PNG")
    completed = [h for h in stack.receiver.accepted() if h.type == "training.completed"]
    named = next(h for h in completed if h.json["run_id"] == handle.id).json["data"]["epochs"]
    assert [e["epoch"] for e in named] == list(range(1, EPOCHS + 1))

    await check_replays(stack.settings, handle, name=f"{CODE_VERSION}-resumed-run")
    await check_replays(stack.settings, whole, name=f"{CODE_VERSION}-epochs-saved")


async def test_sd_scripts_resumes_from_the_last_epoch_with_a_manifest(
    stack: Stack,  # noqa: F811 - the fixture
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sd-scripts stand-in: the last epoch's files are up but its manifest is not (the
    host died while uploading), so the replacement resumes from the one before, with
    sd-scripts' --resume."""
    # Slow steps, through what launches the stand-in: the runner passes no other variables.
    slow = ["env", "STANDIN_STEP_S=0.2", sys.executable, str(STANDIN / "accelerate")]
    monkeypatch.setenv("LORA_RUNNER_ACCELERATE_COMMAND", json.dumps(slow))
    bucket = stack.settings.bucket
    images = put_dataset(s3, bucket, "uploads/chairs/", count=4)
    request = make_request(
        images,
        local_model(tmp_path),
        training={"epochs": 4, "repeats": 4, "trigger_word": "ohwx"},
        samples={"count": 1},
    )
    handle = await start_run(stack.client, stack.settings, request, run_id="sd-scripts-resume")
    saved = await wait_for(handle, lambda st: len(st.epochs) >= 2, timeout_s=120)
    [record] = [stack.provider._record(i) for i in stack.provider.created]
    assert record is not None
    os.killpg(record.pid, signal.SIGSTOP)
    prefix = run_prefix(saved)
    half_uploaded = max(manifests(s3, bucket, prefix))
    assert 2 <= half_uploaded < 4
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/epochs/{half_uploaded:04d}/manifest.json")
    os.killpg(record.pid, signal.SIGKILL)
    resumed_from = half_uploaded - 1

    final: RunStatus = await asyncio.wait_for(handle.result(), timeout=180)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert final.resumed == [f"resumed from epoch {resumed_from} on attempt 2"]
    assert [(e.epoch, e.attempt) for e in final.epochs] == [
        (epoch, 1 if epoch <= resumed_from else 2) for epoch in range(1, 5)
    ]
    assert len(final.epoch_losses) == 4
    log = s3.get_object(Bucket=bucket, Key=f"{prefix}/logs/attempt-2.log")["Body"].read().decode()
    [command] = [line for line in log.splitlines() if "running " in line and "launch" in line]
    # The state the runner downloaded and unpacked (its manifest checked by the worker).
    assert command.rstrip().endswith(
        "--resume " + str(tmp_path / "gpu" / handle.id / "resume" / "state")
    )
    assert "resume training from local state" in log
    assert f"epoch {resumed_from}/4" not in log and f"epoch {resumed_from + 1}/4" in log
    for epoch in final.epochs:
        assert len(epoch.samples) == 1
