"""What a run of the real sd-scripts trainer (the stand-in, under the runner as a real process)
leaves in S3 besides the LoRA's weights: its metadata, and the TensorBoard logs by the run's log."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import TrainingConfig
from gpu_runner.trainers.sd_scripts import SD_SCRIPTS_COMMIT
from tests.http_support import serve_asgi
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import (
    MASTER_SECRET,
    Job,
    make_job,
    no_secrets_in,
    run_runner,
    runner_env,
    safetensors_metadata,
    tensorboard_scalars,
)

STANDIN = Path(__file__).resolve().parents[1] / "sd_scripts_standin"
# accelerate's TensorBoard tracker, as sd-scripts sets it up: <timestamp>/network_train/<file>.
EVENT_FILE = re.compile(r"\d{14}/network_train/events\.out\.tfevents\.\d+\.[^/]+\.\d+\.0")


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


def sd_scripts_job(s3: Any, settings: Any, relay: tuple[RecordingRelay, str], **kw: Any) -> Job:
    recorder, base = relay
    training = TrainingConfig(epochs=2, repeats=2, resolution=64)
    return make_job(
        s3,
        settings.bucket,
        lambda run_id: recorder.events_url(base, run_id),
        training=training,
        **kw,
    )


def sd_scripts_env(job: Job, tmp_path: Path, **standin: str) -> dict[str, str]:
    """The runner with its real sd-scripts trainer, running the stand-in."""
    env = runner_env(
        job.job_url,
        tmp_path / "work",
        trainer_factory="",
        accelerate_command=json.dumps([sys.executable, str(STANDIN / "accelerate")]),
        sd_scripts_dir=str(STANDIN),
        tokenizer_cache_dir=str(tmp_path / "tokenizers"),
    )
    env.update(standin)
    return env


def event_files(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def epoch_averages(events: bytes) -> list[tuple[int, float]]:
    return [(s, v) for tag, s, v in tensorboard_scalars(events) if tag == "loss/epoch_average"]


def test_the_lora_names_its_sd_scripts_and_resolution_and_tensorboard_logs_go_with_the_log(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = sd_scripts_job(s3, settings, relay, log_upload=True, tensorboard_upload=True)

    done = run_runner(sd_scripts_env(job, tmp_path), tmp_path / "runner.log")

    assert done.code == 0, done.log
    lora = s3.get_object(Bucket=job.bucket, Key=job.upload_key)["Body"].read()
    metadata = safetensors_metadata(lora)
    assert metadata["ss_sd_scripts_commit_hash"] == SD_SCRIPTS_COMMIT
    assert metadata["modelspec.implementation_version"] == f"sd-scripts/{SD_SCRIPTS_COMMIT}"
    assert metadata["modelspec.resolution"] == "64x64"
    # The TensorBoard logs: a .tar.gz next to the run's log, holding sd-scripts' event files.
    assert job.tensorboard_key.rsplit("/", 2)[0] == job.log_key.rsplit("/", 2)[0]
    s3.head_object(Bucket=job.bucket, Key=job.log_key)
    archive = s3.get_object(Bucket=job.bucket, Key=job.tensorboard_key)["Body"].read()
    files = event_files(archive)
    assert len(files) == 1 and EVENT_FILE.fullmatch(next(iter(files))), sorted(files)
    (events,) = files.values()
    losses = recorder.of_type("training.completed")[0].data["epoch_losses"]
    assert [step for step, _ in epoch_averages(events)] == [1, 2]
    assert [value for _, value in epoch_averages(events)] == pytest.approx(losses, rel=1e-6)
    log = s3.get_object(Bucket=job.bucket, Key=job.log_key)["Body"].read().decode()
    assert f"to {job.tensorboard_key}" in log
    no_secrets_in(log, job)


def test_a_failed_run_uploads_its_tensorboard_logs_too(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = sd_scripts_job(s3, settings, relay, log_upload=True, tensorboard_upload=True)

    # The stand-in crashes in epoch 2, after epoch 1 was logged.
    done = run_runner(sd_scripts_env(job, tmp_path, STANDIN_MODE="crash"), tmp_path / "r.log")

    assert done.code == 1, done.log
    assert recorder.of_type("run.failed")[0].data["code"] == "trainer_crashed"
    archive = s3.get_object(Bucket=job.bucket, Key=job.tensorboard_key)["Body"].read()
    (events,) = event_files(archive).values()
    assert [step for step, _ in epoch_averages(events)] == [1]


@pytest.mark.parametrize("case", ["no_put_in_the_job", "no_logs"])
def test_without_a_put_or_without_logs_nothing_is_uploaded(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path, case: str
) -> None:
    job = sd_scripts_job(s3, settings, relay, tensorboard_upload=case == "no_logs")
    # "No data found": sd-scripts stops before it starts tracking.
    standin = {"STANDIN_MODE": "nodata"} if case == "no_logs" else {}

    done = run_runner(sd_scripts_env(job, tmp_path, **standin), tmp_path / "runner.log")

    assert done.code == (1 if case == "no_logs" else 0), done.log
    prefix = job.tensorboard_key.rsplit("/", 1)[0] + "/"
    assert s3.list_objects_v2(Bucket=job.bucket, Prefix=prefix)["KeyCount"] == 0
