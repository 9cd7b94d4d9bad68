"""The CLI around a run: checks before anything is uploaded, --set, output that copies whole,
terminated runs, the model's download, the run's log, and clean exits when the worker is down."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from cli.preflight import check_model
from common.settings import Settings
from gpu_runner.protocol import TrainingConfig
from workflows.models import RunStatus, RunStatusName, TrainingRequest

from .conftest import free_port
from .fake_civitai import checkpoint_bytes
from .images import PNG, encoded
from .test_cli import cli, cli_env, dev_address, image_folder, loratrain, workdir
from .workflow_support import (
    SLEEPING_RUNNER,
    RecordingProvider,
    ScriptedEvents,
    local_model,
    make_request,
    put_dataset,
    relay_event,
    running_worker,
    start_run,
    wait_for_status,
)

__all__ = ["workdir"]  # the fixture, shared with test_cli

MODEL_BYTES = b"trained lora " * 1000


def errors(output: str) -> list[str]:
    return [
        line.removeprefix("error: ") for line in output.splitlines() if line.startswith("error")
    ]


# ------------------------------------------------------------------------------------------------
# train: everything checked here, before any upload
# ------------------------------------------------------------------------------------------------


def test_train_lists_every_problem_and_uploads_nothing(workdir: Path) -> None:
    images = image_folder(workdir / "images")
    (images / "signature-only.png").write_bytes(PNG[:16] + bytes(64))
    (images / "truncated.jpg").write_bytes(encoded("JPEG", size=64)[:-200])
    (images / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (images / "renamed.png").write_bytes(encoded("JPEG"))
    dead = {"LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}  # nothing would answer

    result = loratrain(
        ["train", str(images), "--model", "civitai:abc", "--set", "batch_size=0"], workdir, dead
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert errors(result.stderr) == [
        "IMAGES: renamed.png: the file is a JPEG image but its name says PNG; fix the extension",
        "IMAGES: signature-only.png: the PNG image cannot be decoded (not recognised); "
        "open and save it again",
        "IMAGES: truncated.jpg: the JPEG image cannot be decoded (Truncated File Read); "
        "open and save it again",
        "IMAGES: latin1.txt: caption is not UTF-8 text (byte 3); save it as UTF-8",
        "--model: 'civitai:abc' is not a Civitai reference: use civitai:<model version id>, "
        "e.g. civitai:128713",
        "--set batch_size: Input should be greater than or equal to 1 (got '0')",
    ]
    assert "Traceback" not in result.stderr and "cannot reach Temporal" not in result.stderr


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"LORA_MAX_IMAGES": "1"}, "IMAGES: 2 images, more than the limit of 1; remove some"),
        ({"LORA_MAX_IMAGE_BYTES": "50"}, "IMAGES: cat1.png: {png} bytes is over the limit of 50"),
        (
            {"LORA_MAX_DATASET_BYTES": "100"},
            "IMAGES: the images and captions add up to {all} bytes",
        ),
    ],
)
def test_train_checks_the_dataset_limits_here(
    limits: dict[str, str], expected: str, workdir: Path
) -> None:
    images = image_folder(workdir / "images")
    sizes = {p.name: p.stat().st_size for p in images.iterdir()}
    expected = expected.format(
        png=sizes["cat1.png"], all=sizes["cat1.png"] + sizes["cat2.png"] + sizes["cat1.txt"]
    )
    result = cli(["train", str(images), "--model", "civitai:1"], env=limits)
    assert result.exit_code == 2, result.output
    assert any(line.startswith(expected) for line in errors(result.output)), result.output


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("civitai:12x", "--model: 'civitai:12x' is not a Civitai reference"),
        (
            "ftp://example.com/m.safetensors",
            "--model: 'ftp://example.com/m.safetensors': unknown scheme 'ftp'; use civitai:",
        ),
        ("s3://bucket-only", "--model: 's3://bucket-only' is not s3://bucket/key"),
        ("missing.safetensors", "--model: missing.safetensors does not exist (use civitai:"),
        ("images", "--model: images is not a file"),
    ],
)
def test_a_bad_model_reference_is_refused_here(model: str, expected: str, workdir: Path) -> None:
    images = image_folder(workdir / "images")
    result = cli(["train", str(images), "--model", model])
    assert result.exit_code == 2, result.output
    assert any(line.startswith(expected) for line in errors(result.output)), result.output


def test_a_local_model_path_is_sent_absolute(workdir: Path) -> None:
    (workdir / "models").mkdir()
    (workdir / "models" / "base.safetensors").write_bytes(checkpoint_bytes("sd15"))
    settings = Settings(_env_file=None)
    checked = check_model("models/base.safetensors", settings)
    assert checked[:2] == (str(workdir / "models" / "base.safetensors"), None)
    for reference in (
        "civitai:128713",
        "https://example.com/m.safetensors",
        "s3://b/k.safetensors",
    ):
        assert check_model(reference, settings)[:2] == (reference, None)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "batch_sise=2"], "--set batch_sise: not a training setting (one of: batch_size"),
        (["--set", "optimizer=Adam"], "--set optimizer: Input should be 'AdamW', 'AdamW8bit'"),
        (["--set", "mixed_precision=fp8"], "--set mixed_precision: Input should be 'no'"),
        (["--set", "unet_lr"], "--set: 'unet_lr' is not KEY=VALUE"),
        (["--epochs", "2", "--set", "epochs=3"], "--set epochs: also given as --epochs"),
    ],
)
def test_set_names_the_setting_that_is_wrong(
    extra: list[str], expected: str, workdir: Path
) -> None:
    images = image_folder(workdir / "images")
    result = cli(["train", str(images), "--model", "civitai:1", *extra])
    assert result.exit_code == 2, result.output
    assert any(line.startswith(expected) for line in errors(result.output)), result.output


# ------------------------------------------------------------------------------------------------
# On the dev server, with a worker whose GPU never reports (a sleeping runner)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
async def quiet_worker(
    dev_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[tuple[Settings, RecordingProvider]]:
    run_settings = settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    provider = RecordingProvider(run_settings)
    try:
        async with running_worker(dev_env.client, run_settings, provider):
            yield run_settings, provider
    finally:
        for instance_id in provider.created:  # a terminated run leaves its GPU to the reaper
            provider.destroy(instance_id)


async def test_train_sends_set_values_and_output_copies_whole_when_terminated(
    dev_env: WorkflowEnvironment,
    quiet_worker: tuple[Settings, RecordingProvider],
    s3: Any,
    workdir: Path,
) -> None:
    settings, _ = quiet_worker
    env = {**cli_env(settings, dev_address(dev_env)), "COLUMNS": "40"}
    image_folder(workdir / "images")
    local_model(workdir)  # workdir/base-sd15.safetensors, given relative
    run_id = f"a-run-id-long-enough-to-be-cut-by-any-table-{uuid.uuid4().hex}"
    train = [
        "train",
        "images",
        "--model",
        "base-sd15.safetensors",
        "--run-id",
        run_id,
        *("--set", "batch_size=4", "--set", "optimizer=Prodigy", "--set", "mixed_precision=bf16"),
    ]

    started = await asyncio.to_thread(cli, train, env)

    assert started.exit_code == 0, started.output
    uploaded = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"uploads/{run_id}/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in uploaded["Contents"]) == [
        "cat1.png",
        "cat1.txt",
        "cat2.png",
    ]
    handle = dev_env.client.get_workflow_handle(run_id)
    request = await started_request(dev_env, handle)
    assert request.model == str(workdir / "base-sd15.safetensors")
    assert request.training == TrainingConfig(
        batch_size=4, optimizer="Prodigy", mixed_precision="bf16"
    )
    await wait_for_status(handle, RunStatusName.PENDING_GPU)

    # Full ids at 40 columns and piped, in the table and in JSON.
    listed = await until_listed(env, run_id)
    assert any(line.startswith(run_id) for line in listed.splitlines()), listed
    shown = await asyncio.to_thread(cli, ["status", run_id], env)
    assert shown.exit_code == 0, shown.output
    assert f"run          {run_id}" in shown.output.splitlines()

    await handle.terminate("operator ended it")

    shown = await asyncio.to_thread(cli, ["status", run_id], env)
    assert "status       terminated (by Temporal, while pendingGpu)" in shown.output, shown.output
    as_json = await asyncio.to_thread(cli, ["status", run_id, "--json"], env)
    status = RunStatus.model_validate_json(as_json.stdout)
    assert (status.status, status.execution_status) == (RunStatusName.PENDING_GPU, "terminated")
    watched = await asyncio.to_thread(cli, ["watch", run_id, "--json"], env)
    assert watched.exit_code == 1, watched.output
    last = RunStatus.model_validate_json(watched.stdout.splitlines()[-1])
    assert last.execution_status == "terminated"
    listed = await until_listed(env, run_id, "terminated (while pendingGpu)")
    runs = await asyncio.to_thread(cli, ["list", "--json"], env)
    (entry,) = [json.loads(line) for line in runs.stdout.splitlines() if run_id in line]
    assert (entry["status"], entry["execution_status"]) == ("pendingGpu", "terminated")


async def started_request(
    env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any]
) -> TrainingRequest:
    history = await handle.fetch_history()
    payloads = history.events[0].workflow_execution_started_event_attributes.input.payloads
    (request,) = await env.client.data_converter.decode(payloads, [TrainingRequest])
    assert isinstance(request, TrainingRequest)
    return request


async def until_listed(
    env: dict[str, str], run_id: str, text: str = "", timeout_s: float = 10
) -> str:
    """Visibility is eventually consistent: poll `list` until the run's line holds `text`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(cli, ["list"], env)
        assert result.exit_code == 0, result.output
        line = next((ln for ln in result.output.splitlines() if run_id in ln), "")
        if (line and text in line) or time.monotonic() > deadline:
            assert line and text in line, result.output
            return result.output
        await asyncio.sleep(0.2)


async def test_download_checks_the_model_and_logs_prints_the_run_log(
    dev_env: WorkflowEnvironment,
    quiet_worker: tuple[Settings, RecordingProvider],
    s3: Any,
    workdir: Path,
) -> None:
    settings, _ = quiet_worker
    env = cli_env(settings, dev_address(dev_env))
    request = make_request(put_dataset(s3, settings.bucket, "cats/"), local_model(workdir))
    handle = await start_run(dev_env.client, settings, request)
    await wait_for_status(handle, RunStatusName.PENDING_GPU)
    run_prefix = f"runs/{handle.id}/{handle.first_execution_run_id}"
    model_key = f"{run_prefix}/model/lora.safetensors"
    s3.put_object(Bucket=settings.bucket, Key=model_key, Body=MODEL_BYTES)
    log_text = "12:00:01 INFO gpu_runner: gpu.ready\nsteps: 100%|##| 20/20 [avr_loss=0.1]\n"
    s3.put_object(Bucket=settings.bucket, Key=f"{run_prefix}/logs/attempt-1.log", Body=log_text)
    events = ScriptedEvents(handle.id).happy_path(model_key, MODEL_BYTES)
    not_yet = await asyncio.to_thread(cli, ["download", handle.id], env)
    assert not_yet.exit_code == 1
    assert f"run {handle.id} has no model to download (pendingGpu)" in not_yet.output
    for event in events:
        await relay_event(handle, event)
    await wait_for_status(handle, RunStatusName.COMPLETED)

    shown = await asyncio.to_thread(cli, ["status", handle.id], env)
    assert f"download     loratrain download {handle.id}" in shown.output, shown.output
    assert f"sha256       {hashlib.sha256(MODEL_BYTES).hexdigest()}" in shown.output

    fetched = await asyncio.to_thread(cli, ["download", handle.id], env)  # default ./outputs/
    assert fetched.exit_code == 0, fetched.output
    path = workdir / "outputs" / f"{handle.id}-lora.safetensors"
    assert fetched.stdout.strip() == str(path)
    assert path.read_bytes() == MODEL_BYTES
    named = await asyncio.to_thread(cli, ["download", handle.id, "-o", "mine.safetensors"], env)
    assert named.stdout.strip() == str(workdir / "mine.safetensors"), named.output

    tampered = MODEL_BYTES.replace(b"lora", b"LORA")  # same size, other bytes
    s3.put_object(Bucket=settings.bucket, Key=model_key, Body=tampered)
    refused = await asyncio.to_thread(cli, ["download", handle.id, "-o", "bad/"], env)
    assert refused.exit_code == 1
    assert "not the verified" in refused.output and "nothing was kept" in refused.output
    assert not list((workdir / "bad").iterdir())

    printed = await asyncio.to_thread(cli, ["logs", handle.id], env)
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == log_text


async def test_status_lists_the_loss_of_every_epoch_and_marks_the_kept_one(
    dev_env: WorkflowEnvironment,
    quiet_worker: tuple[Settings, RecordingProvider],
    s3: Any,
    workdir: Path,
) -> None:
    settings, _ = quiet_worker
    env = cli_env(settings, dev_address(dev_env))
    request = make_request(put_dataset(s3, settings.bucket, "cats/"), local_model(workdir))
    handle = await start_run(dev_env.client, settings, request)
    await wait_for_status(handle, RunStatusName.PENDING_GPU)
    model_key = f"runs/{handle.id}/{handle.first_execution_run_id}/model/lora.safetensors"
    s3.put_object(Bucket=settings.bucket, Key=model_key, Body=MODEL_BYTES)
    *trained, completed, uploaded = ScriptedEvents(handle.id).happy_path(
        model_key, MODEL_BYTES, epochs=3
    )
    # The second of three epochs has the lowest loss: its LoRA is the one uploaded and kept.
    completed = completed.model_copy(
        update={"data": {"epoch_losses": [0.21, 0.18, 0.19], "best_epoch": 2}}
    )
    uploaded = uploaded.model_copy(update={"data": {**uploaded.data, "epoch": 2, "loss": 0.18}})
    for event in [*trained, completed, uploaded]:
        await relay_event(handle, event)
    await wait_for_status(handle, RunStatusName.COMPLETED)

    shown = await asyncio.to_thread(cli, ["status", handle.id], env)

    assert shown.exit_code == 0, shown.output
    assert "epoch losses 1: 0.2100  2: 0.1800 (kept)  3: 0.1900" in shown.output.splitlines()


# ------------------------------------------------------------------------------------------------
# The worker is down: every command exits cleanly, in one line
# ------------------------------------------------------------------------------------------------


async def test_with_no_worker_status_exits_cleanly_every_time(
    dev_env: WorkflowEnvironment, settings: Settings, workdir: Path
) -> None:
    """No worker polls the run's task queue, as when the worker was killed: 20 real processes."""
    run_id = f"orphan-{uuid.uuid4().hex[:8]}"
    await dev_env.client.start_workflow(
        "TrainingWorkflow", id=run_id, task_queue=settings.task_queue
    )
    env = {**cli_env(settings, dev_address(dev_env)), "LORA_QUERY_TIMEOUT_S": "1"}
    commands = [["status", run_id]] * 20 + [["watch", run_id], ["download", run_id]]

    with ThreadPoolExecutor(4) as pool:
        results = await asyncio.to_thread(
            lambda: list(pool.map(lambda args: loratrain(args, workdir, env), commands))
        )

    expected = (
        f"error: run '{run_id}' (Temporal: running) did not answer its status query within 1 s: "
        f"is a worker for task queue '{settings.task_queue}' running (`loratrain worker` or "
        "`loratrain dev`)?"
    )
    for args, result in zip(commands, results, strict=True):
        assert (result.returncode, result.stderr.strip()) == (1, expected), (args, result)

    # Terminated while no worker could replay it: Temporal's own word is enough.
    await dev_env.client.get_workflow_handle(run_id).terminate("operator ended it")
    shown = await asyncio.to_thread(loratrain, ["status", run_id], workdir, env)
    assert shown.returncode == 0, shown.stderr
    assert "status       terminated (by Temporal, while pending)" in shown.stdout
