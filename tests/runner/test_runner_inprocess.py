"""The Runner in this process with an injected trainer: heartbeats while downloading, training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import RunnerLimits
from gpu_runner.runner import Runner
from gpu_runner.settings import RunnerSettings
from tests.http_support import serve_asgi
from tests.runner.fake_trainer import FakeTrainer
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, FileServer, Job, make_job, pseudo_random

MODEL = pseudo_random("slow-model", 1024 * 1024)


class SlowTrainer(FakeTrainer):
    steps_per_epoch = 15
    step_s = 0.1


async def run_in_process(
    s3: Any,
    bucket: str,
    relay: tuple[RecordingRelay, str],
    tmp_path: Path,
    trainer_class: type[FakeTrainer],
    *,
    model_chunk_delay_s: float = 0.0,
    job: dict[str, Any],
    runner: dict[str, Any],
) -> tuple[int, Job]:
    """Serve the model, write the job to S3, run the Runner here with `trainer_class`."""
    recorder, relay_base = relay
    files = FileServer()
    files.add("model.safetensors", MODEL, chunk_delay_s=model_chunk_delay_s)
    with serve_asgi(files) as files_base:
        written = make_job(
            s3,
            bucket,
            lambda run_id: recorder.events_url(relay_base, run_id),
            model_url=f"{files_base}/files/model.safetensors",
            model_content=MODEL,
            **job,
        )
        settings = RunnerSettings(
            runner_workdir=tmp_path / "work",
            runner_require_gpu=False,
            runner_disk_margin_bytes=0,
            **runner,
        )
        code = await Runner(written.spec, settings, trainer=trainer_class(settings)).run()
    return code, written


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


async def test_heartbeats_while_downloading_and_training(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    code, job = await run_in_process(
        s3,
        settings.bucket,
        relay,
        tmp_path,
        SlowTrainer,
        model_chunk_delay_s=0.08,  # ~1.3 s for 16 chunks
        job={
            "epochs": 1,
            "limits": RunnerLimits(heartbeat_interval_s=1, orphan_timeout_s=20),
        },
        runner={"runner_retry_initial_s": 0.05, "runner_retry_max_s": 0.2},
    )

    assert code == 0
    heartbeats = [e.data for e in recorder.of_type("heartbeat")]
    downloading = [h for h in heartbeats if h["stage"] in ("images", "model")]
    assert downloading, heartbeats
    total = len(MODEL) + job.spec.images.bytes
    assert all(h["bytes_total"] == total and 0 < h["bytes_done"] <= total for h in downloading)
    assert any(h["stage"] == "training" for h in heartbeats), heartbeats
    events = recorder.snapshot()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert recorder.types()[-1] == "model.uploaded"


class ManyStepsTrainer(FakeTrainer):
    steps_per_epoch = 40
    step_s = 0.005


async def test_progress_is_sent_at_most_once_per_interval_plus_epoch_ends(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    code, _ = await run_in_process(
        s3,
        settings.bucket,
        relay,
        tmp_path,
        ManyStepsTrainer,
        job={"epochs": 2},
        runner={"runner_progress_interval_s": 3600},
    )

    assert code == 0
    progress = [e.data for e in recorder.of_type("training.progress")]
    # 80 steps reported by the trainer; only the first step of each epoch and the last are sent
    # (a slow relay may coalesce some of those three further, never add any).
    sent = [(p["epoch"], p["step"]) for p in progress]
    assert sent[-1] == (2, 80)
    assert set(sent) <= {(1, 1), (2, 41), (2, 80)}
