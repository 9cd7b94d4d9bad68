"""The CLI on a run's saved epochs, on the real parts: the builtin trainer on the demo's tiny
model, the real runner process, the relay handing out upload URLs, SeaweedFS, the Temporal dev
server. One run of three epochs with two samples each is trained once for the whole module
(and beside it one without samples); `watch` follows it, and every test reads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from temporalio.testing import WorkflowEnvironment
from typer.testing import Result

from activities.providers.local import LocalProvider
from cli import display
from common.settings import Settings
from gpu_runner.demo_assets import (
    TINY_MODEL_FILENAME,
    build_tiny_model,
    demo_training_config,
    write_demo_dataset,
)
from relay.app import create_app
from workflows.models import RunStatus, RunStatusName, S3Prefix

from .conftest import s3_client_for
from .http_support import serve_asgi
from .test_cli import cli, cli_env, dev_address, workdir
from .workflow_support import make_request, running_worker, start_run

__all__ = ["workdir"]  # the fixture, shared with test_cli

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3
# 12 demo images x 2 repeats / batch 4: 6 steps an epoch at 64 px, a few seconds on a CPU.
TRAINING = {
    **demo_training_config().model_dump(exclude_none=True),
    "epochs": EPOCHS,
    "repeats": 2,
    "output_name": "shapes",
    "seed": 7,
}
SAMPLES = {"steps": 2, "count": 2}
RUN_TIMEOUT_S = 240
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Trained:
    """The module's two completed runs, as the workflow and the CLI's `watch` saw them."""

    settings: Settings
    env: dict[str, str]
    s3: Any
    final: RunStatus  # three epochs, two samples each
    without_samples: RunStatus  # one epoch, samples off
    watched: Result

    @property
    def run_id(self) -> str:
        return self.final.run_id

    def object(self, key: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        return body


@pytest.fixture(scope="module")
async def trained(
    dev_env: WorkflowEnvironment,
    base_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Trained]:
    tmp = tmp_path_factory.mktemp("cli-epochs")
    settings = base_settings.model_copy(
        update={
            "bucket": f"lt-{uuid.uuid4().hex[:12]}",
            "task_queue": f"tq-{uuid.uuid4()}",
            "state_dir": tmp / "state",
        }
    )
    s3 = s3_client_for(settings)
    s3.create_bucket(Bucket=settings.bucket)
    folder = tmp / "shapes"
    write_demo_dataset(folder)
    for path in sorted(folder.iterdir()):
        s3.put_object(Bucket=settings.bucket, Key=f"shapes/{path.name}", Body=path.read_bytes())
    images = S3Prefix(bucket=settings.bucket, prefix="shapes/")
    model = build_tiny_model(tmp / TINY_MODEL_FILENAME)
    with pytest.MonkeyPatch.context() as patch:
        # The runner process reads its own LORA_RUNNER_* settings, passed through by the provider.
        patch.setenv("LORA_RUNNER_REQUIRE_GPU", "false")
        patch.setenv("LORA_RUNNER_WORKDIR", str(tmp / "gpu"))
        patch.setenv("LORA_RUNNER_TOKENIZER_CACHE_DIR", str(tmp / "tokenizers"))
        patch.setenv("LORA_RUNNER_RETRY_INITIAL_S", "0.2")
        patch.setenv("LORA_RUNNER_RETRY_MAX_S", "1")
        patch.setenv("LORA_RUNNER_DISK_MARGIN_BYTES", "0")
        patch.setenv("PYTHONPATH", str(ROOT))
        with serve_asgi(create_app(settings, dev_env.client)) as relay_url:
            run_settings = settings.model_copy(
                update={
                    "relay_public_url": relay_url,
                    "local_runner_command": [sys.executable, "-m", "gpu_runner"],
                }
            )
            provider = LocalProvider(run_settings)
            async with running_worker(dev_env.client, run_settings, provider):
                client, env = dev_env.client, cli_env(run_settings, dev_address(dev_env))
                request = make_request(
                    images, model, trainer="builtin", training=TRAINING, samples=SAMPLES
                )
                handle = await start_run(client, run_settings, request)
                quiet = make_request(
                    images,
                    model,
                    trainer="builtin",
                    training={**TRAINING, "epochs": 1, "repeats": 1},
                    samples={"enabled": False},
                )
                quiet_handle = await start_run(client, run_settings, quiet)
                # Started right away, `watch` follows the run as a user's would, to its end.
                watched = await asyncio.wait_for(
                    asyncio.to_thread(cli, ["watch", handle.id], env), RUN_TIMEOUT_S
                )
                final = await asyncio.wait_for(handle.result(), RUN_TIMEOUT_S)
                without_samples = await asyncio.wait_for(quiet_handle.result(), RUN_TIMEOUT_S)
                yield Trained(run_settings, env, s3, final, without_samples, watched)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_run_saved_every_epoch_with_its_samples(trained: Trained) -> None:
    final = trained.final
    assert final.status == RunStatusName.COMPLETED, final.error
    assert [e.epoch for e in final.epochs] == list(range(1, EPOCHS + 1))
    assert all(len(e.samples) == SAMPLES["count"] for e in final.epochs)
    assert trained.without_samples.status == RunStatusName.COMPLETED
    assert [len(e.samples) for e in trained.without_samples.epochs] == [0]


def test_watch_prints_one_line_per_saved_epoch(trained: Trained) -> None:
    watched = trained.watched
    assert watched.exit_code == 0, watched.output
    lines = [
        line.split("  ", 1)[1]
        for line in watched.output.splitlines()
        if re.match(r"^\d\d:\d\d:\d\d  epoch ", line)
    ]
    assert lines == [
        f"epoch {e.epoch}/{EPOCHS} saved  loss {e.loss:.4f}  2 samples"
        for e in trained.final.epochs
    ]
    # Each after the run entered training, and before it completed.
    output = watched.output
    assert output.index("  training\n") < output.index("  epoch 1/3 saved")
    assert output.index(f"  epoch {EPOCHS}/{EPOCHS} saved") < output.index("  completed\n")


async def test_status_lists_the_saved_epochs_and_marks_the_kept_one(trained: Trained) -> None:
    final = trained.final
    assert final.result is not None
    kept = final.result.epoch
    assert kept == 1 + final.epoch_losses.index(min(final.epoch_losses))

    shown = await asyncio.to_thread(cli, ["status", trained.run_id], trained.env)

    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    rows = [
        f"{'epochs' if e.epoch == 1 else '':<12} {e.epoch}  loss {e.loss:.4f}  attempt 1  "
        f"2 samples" + (" (kept)" if e.epoch == kept else "")
        for e in final.epochs
    ]
    start = lines.index(rows[0])
    assert lines[start : start + EPOCHS] == rows, shown.output
    assert f"epoch LoRAs  loratrain download {trained.run_id} --epoch N (or --all-epochs)" in lines
    assert f"samples      6 images: loratrain samples {trained.run_id}" in lines
    assert not any(line.startswith("resumed") for line in lines)
    assert "epoch losses" not in shown.output  # the rows carry them


def test_status_and_watch_show_a_resumed_run(trained: Trained) -> None:
    """What a run resumed on a second GPU shows: the epochs each attempt trained and the
    resume (the resume itself is proven in test_durable_epochs; this is its display)."""
    first, *later = trained.final.epochs
    resumed = trained.final.model_copy(
        update={
            "attempt": 2,
            "epochs": [first, *(e.model_copy(update={"attempt": 2}) for e in later)],
            "resumed": ["resumed from epoch 1 on attempt 2"],
        }
    )
    printed = io.StringIO()
    console = Console(file=printed, soft_wrap=True, width=200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(display, "out", console)
        display.print_status(resumed)
    lines = printed.getvalue().splitlines()
    assert re.findall(r"  loss \S+  attempt (\d)", printed.getvalue()) == ["1", "2", "2"]
    assert "resumed      from epoch 1 on attempt 2" in lines

    shown: set[str] = set()
    assert display.new_epoch_lines(resumed, shown)[-1] == "resumed from epoch 1 on attempt 2"
    assert display.new_epoch_lines(resumed, shown) == []  # each once


async def test_download_an_epoch_checks_it_against_the_saved_one(
    trained: Trained, workdir: Path
) -> None:
    epoch = trained.final.epochs[1]

    fetched = await asyncio.to_thread(
        cli, ["download", trained.run_id, "--epoch", "2"], trained.env
    )

    assert fetched.exit_code == 0, fetched.output
    path = workdir / "outputs" / f"{trained.run_id}-shapes-e0002.safetensors"
    assert fetched.stdout.strip() == str(path)
    data = path.read_bytes()
    assert data == trained.object(epoch.lora.key)
    assert (len(data), sha256(data)) == (epoch.lora.bytes, epoch.lora.sha256)
    assert data != trained.object(trained.final.epochs[0].lora.key)

    named = await asyncio.to_thread(
        cli, ["download", trained.run_id, "--epoch", "1", "-o", "e1.safetensors"], trained.env
    )
    assert named.stdout.strip() == str(workdir / "e1.safetensors"), named.output
    assert sha256((workdir / "e1.safetensors").read_bytes()) == trained.final.epochs[0].lora.sha256


async def test_download_all_epochs(trained: Trained, workdir: Path) -> None:
    fetched = await asyncio.to_thread(
        cli, ["download", trained.run_id, "--all-epochs", "-o", "loras"], trained.env
    )

    assert fetched.exit_code == 0, fetched.output
    paths = [Path(line) for line in fetched.stdout.splitlines()]
    assert paths == [
        workdir / "loras" / f"{trained.run_id}-shapes-e{n:04d}.safetensors"
        for n in range(1, EPOCHS + 1)
    ]
    for path, epoch in zip(paths, trained.final.epochs, strict=True):
        assert sha256(path.read_bytes()) == epoch.lora.sha256
    # The kept epoch's LoRA is the run's model.
    assert trained.final.result is not None
    kept = paths[(trained.final.result.epoch or 0) - 1]
    assert sha256(kept.read_bytes()) == trained.final.result.sha256
    assert sorted(p.name for p in (workdir / "loras").iterdir()) == [p.name for p in paths]


async def test_an_epoch_that_was_not_saved_is_named_with_the_saved_ones(
    trained: Trained, workdir: Path
) -> None:
    run_id = trained.run_id

    missing = await asyncio.to_thread(cli, ["download", run_id, "--epoch", "9"], trained.env)
    both = await asyncio.to_thread(
        cli, ["download", run_id, "--epoch", "1", "--all-epochs"], trained.env
    )
    zero = await asyncio.to_thread(cli, ["download", run_id, "--epoch", "0"], trained.env)
    (workdir / "a-file").write_text("")
    unwritable = await asyncio.to_thread(
        cli, ["download", run_id, "--epoch", "1", "-o", "a-file/e1.safetensors"], trained.env
    )

    assert missing.exit_code == 1
    assert missing.output.strip() == (
        f"error: run {run_id} has no saved epoch 9: the saved epochs are 1-3"
    )
    assert both.exit_code == 2
    assert both.output.strip() == "error: --epoch and --all-epochs: give one of them"
    assert zero.exit_code == 2 and "Invalid value for '--epoch'" in zero.output
    assert unwritable.exit_code == 1
    assert unwritable.output.startswith("error: cannot write a-file/e1.safetensors: ")
    assert unwritable.exception is None or isinstance(unwritable.exception, SystemExit)
    assert "Traceback" not in missing.output + both.output + zero.output + unwritable.output
    assert not (workdir / "outputs").exists()


async def test_samples_downloads_every_epochs_images(trained: Trained, workdir: Path) -> None:
    fetched = await asyncio.to_thread(cli, ["samples", trained.run_id], trained.env)

    assert fetched.exit_code == 0, fetched.output
    folder = workdir / "outputs" / f"{trained.run_id}-samples"
    paths = [Path(line) for line in fetched.stdout.splitlines()]
    assert paths == [
        folder / f"epoch-{epoch:04d}" / f"{n:02d}.png"
        for epoch in range(1, EPOCHS + 1)
        for n in range(SAMPLES["count"])
    ]
    saved = [file for e in trained.final.epochs for file in e.samples]
    for path, file in zip(paths, saved, strict=True):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert data == trained.object(file.key)
    assert f"6 sample images of 3 epochs in {folder}" in fetched.stderr

    elsewhere = await asyncio.to_thread(cli, ["samples", trained.run_id, "-o", "mine"], trained.env)
    assert elsewhere.stdout.splitlines()[0] == str(workdir / "mine" / "epoch-0001" / "00.png")


async def test_a_run_without_samples_says_so(trained: Trained, workdir: Path) -> None:
    run_id = trained.without_samples.run_id

    fetched = await asyncio.to_thread(cli, ["samples", run_id], trained.env)

    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout == ""
    assert fetched.stderr.strip() == (
        f"run {run_id} has no sample images: samples were off for it (1 saved epoch)"
    )
    assert not (workdir / "outputs").exists()


async def test_a_tampered_epoch_is_not_kept(trained: Trained, workdir: Path) -> None:
    epoch = trained.final.epochs[0]
    original = trained.object(epoch.lora.key)
    tampered = bytes([original[0] ^ 1]) + original[1:]  # same size, other bytes
    trained.s3.put_object(Bucket=trained.settings.bucket, Key=epoch.lora.key, Body=tampered)
    try:
        refused = await asyncio.to_thread(
            cli, ["download", trained.run_id, "--epoch", "1", "-o", "bad/"], trained.env
        )
    finally:
        trained.s3.put_object(Bucket=trained.settings.bucket, Key=epoch.lora.key, Body=original)

    assert refused.exit_code == 1
    assert f"the download of s3://{trained.settings.bucket}/{epoch.lora.key} has sha256" in (
        refused.output
    )
    assert f"not the verified {epoch.lora.sha256}; nothing was kept" in refused.output
    assert list((workdir / "bad").iterdir()) == []
