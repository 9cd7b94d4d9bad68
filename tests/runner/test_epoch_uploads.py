"""The runner uploads every epoch as it ends: LoRA, samples and training state through the
relay's presigned PUTs, the manifest last, then epoch.saved; an epoch that cannot go up never
fails the run."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import EpochManifest, EpochSavedData, SampleSettings
from tests.http_support import serve_asgi
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, make_job, run_runner, runner_env, sha256


@pytest.fixture
def relay(s3: Any, settings: Any) -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET, presigner=s3, bucket=settings.bucket)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


def run_with_epochs(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> tuple[Any, Any]:
    recorder, base = relay
    job = make_job(
        s3,
        settings.bucket,
        lambda run_id: recorder.events_url(base, run_id),
        epochs=3,
        run_id="epochs-run",
        epoch_uploads_url=recorder.uploads_url(base, "epochs-run"),
        samples=SampleSettings(every_n_epochs=2),
    )
    done = run_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")
    return job, done


def test_every_epoch_goes_up_with_its_manifest_last_then_epoch_saved(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    _, done = run_with_epochs(s3, settings, relay, tmp_path)
    assert done.code == 0, done.log

    saved = [EpochSavedData.model_validate(e.data) for e in recorder.of_type("epoch.saved")]
    assert [s.epoch for s in saved] == [1, 2, 3]
    types = recorder.types()
    # Every epoch is up before the run says it trained.
    assert types.index("training.completed") > max(
        i for i, t in enumerate(types) if t == "epoch.saved"
    )
    # Samples on epoch 2 (every 2nd) and the last; a state on every epoch but the last.
    assert [len(s.samples) for s in saved] == [0, 1, 1]
    assert [s.state is not None for s in saved] == [True, True, False]
    for epoch in saved:
        manifest = EpochManifest.model_validate_json(
            s3.get_object(Bucket=settings.bucket, Key=epoch.manifest_key)["Body"].read()
        )
        assert manifest.epoch == epoch.epoch and manifest.run_id == "epochs-run"
        assert manifest.epoch_losses == [s.loss for s in saved[: epoch.epoch]]
        for file in manifest.files.values():
            body = s3.get_object(Bucket=settings.bucket, Key=file.key)["Body"].read()
            assert (len(body), sha256(body)) == (file.bytes, file.sha256)
        manifest_at = s3.head_object(Bucket=settings.bucket, Key=epoch.manifest_key)
        for file in manifest.files.values():
            head = s3.head_object(Bucket=settings.bucket, Key=file.key)
            assert head["LastModified"] <= manifest_at["LastModified"]
    assert saved[0].state is not None
    state = s3.get_object(Bucket=settings.bucket, Key=saved[0].state.key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(state)) as tar:
        assert tar.getnames() == ["optimizer.bin"]
    # Each request named exactly the epoch's files.
    assert [sorted(r.files) for r in recorder.upload_requests] == [
        ["lora.safetensors", "manifest.json", "state.tar"],
        ["lora.safetensors", "manifest.json", "samples/00.png", "state.tar"],
        ["lora.safetensors", "manifest.json", "samples/00.png"],
    ]


def test_epochs_that_cannot_go_up_do_not_fail_the_run(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.refuse_uploads = True
    _, done = run_with_epochs(s3, settings, relay, tmp_path)
    assert done.code == 0, done.log
    assert recorder.of_type("epoch.saved") == []
    assert recorder.types()[-2:] == ["training.completed", "model.uploaded"]
    assert "epoch 1 was not uploaded: the relay gave no upload URLs for epoch 1" in done.log
