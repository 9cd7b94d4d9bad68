"""`python -m gpu_runner` as a real process: job spec in the local S3 server, the recording relay,
a fake Civitai, and a stand-in trainer (tests/runner/fake_trainer.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import RunnerLimits
from tests.conftest import s3_client_for
from tests.fake_civitai import FakeCivitai, sd15_version
from tests.http_support import serve_asgi
from tests.runner.fake_trainer import GATE_ENV, GATE_STEP, FakeTrainer, checkpoint_bytes, epoch_loss
from tests.runner.outage_proxy import Mode, OutageProxy
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import (
    CIVITAI_KEY,
    MASTER_SECRET,
    Job,
    RunnerProcess,
    bomb_zip,
    make_job,
    make_zip,
    no_secrets_in,
    pid_alive,
    run_runner,
    runner_env,
    sha256,
    start_runner,
    wait_until,
)

STANDIN = Path(__file__).resolve().parents[1] / "sd_scripts_standin"
SEED_ORDER = ["gpu.ready", "images.ready", "model.ready", "files.ready"]


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


@pytest.fixture
def civitai() -> Iterator[tuple[FakeCivitai, str]]:
    fake = FakeCivitai(
        api_key=CIVITAI_KEY,
        versions=[sd15_version(101), sd15_version(102, early_access=True)],
    )
    with serve_asgi(fake.app) as base:
        yield fake, base


MakeJob = Callable[..., Job]


@pytest.fixture
def job_for(s3: Any, settings: Any, relay: tuple[RecordingRelay, str]) -> MakeJob:
    recorder, base = relay

    def make(**kw: Any) -> Job:
        return make_job(s3, settings.bucket, lambda run_id: recorder.events_url(base, run_id), **kw)

    return make


def civitai_model(fake: FakeCivitai, base: str, version: int = 101) -> dict[str, Any]:
    content = fake.file(version).content
    return {
        "model_url": f"{base}/api/download/models/{version}",
        "model_content": content,
        "needs_civitai_key": True,
    }


def test_happy_path(
    job_for: MakeJob,
    relay: tuple[RecordingRelay, str],
    civitai: tuple[FakeCivitai, str],
    s3: Any,
    tmp_path: Path,
) -> None:
    recorder, _ = relay
    fake, base = civitai
    fake.drop_after_bytes = 50_000  # the model download breaks once and resumes
    job = job_for(**civitai_model(fake, base), epochs=3)

    done = run_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")

    assert done.code == 0, done.log
    types = recorder.types()
    assert types[:4] == SEED_ORDER
    assert types[-2:] == ["training.completed", "model.uploaded"]
    assert set(types[4:-2]) == {"training.progress"}
    events = recorder.snapshot()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert recorder.bad_signatures == 0 and recorder.duplicates == 0
    assert all(a.status == 202 for a in recorder.answers)

    model_ready = recorder.of_type("model.ready")[0].data
    assert model_ready == {
        "filename": "base.safetensors",
        "bytes": len(fake.file(101).content),
        "sha256_verified": True,
    }
    assert recorder.of_type("images.ready")[0].data == {"image_count": 3, "bytes": 3 * 209 + 3 * 24}
    files_ready = recorder.of_type("files.ready")[0].data
    assert files_ready["total_steps"] == 12 and "config" in files_ready["paths"]
    last_progress = recorder.of_type("training.progress")[-1].data
    assert last_progress["step"] == last_progress["total"] == 12
    completed = recorder.of_type("training.completed")[0].data
    assert completed == {
        "epoch_losses": [epoch_loss(1), epoch_loss(2), epoch_loss(3)],
        "best_epoch": 2,
    }

    uploaded = recorder.of_type("model.uploaded")[0].data
    stored = s3.get_object(Bucket=job.bucket, Key=job.upload_key)["Body"].read()
    assert stored == checkpoint_bytes(2)
    assert uploaded == {
        "key": job.upload_key,
        "bytes": len(stored),
        "sha256": sha256(stored),
        "epoch": 2,
        "loss": epoch_loss(2),
    }
    # The key went to Civitai, the resume asked for the rest, nothing secret was logged.
    downloads = [r for r in fake.requests if r[1].startswith("/api/download/")]
    assert all(h.get("authorization") == f"Bearer {CIVITAI_KEY}" for _, _, h in downloads)
    file_gets = [h for _, path, h in fake.requests if path.startswith("/files/")]
    assert "range" not in file_gets[0] and file_gets[-1]["range"].startswith("bytes=")
    no_secrets_in(done.log, job)


@pytest.mark.parametrize(
    ("case", "stage", "code", "message"),
    [
        ("zip_slip", "images", "unsafe_archive", "'..' in a path is not allowed"),
        ("zip_bomb", "images", "unsafe_archive", "possible zip bomb"),
        ("checksum", "model", "checksum_mismatch", "the file is corrupt"),
        ("builtin", "files", "invalid_model", "is not a readable .safetensors file"),
        ("disk", "gpu", "disk_full", "not enough free disk"),
        ("no_gpu", "gpu", "no_gpu", "no NVIDIA GPU found"),
        ("upload_limit", "upload", "model_too_large", "over the upload limit of 1000 bytes"),
    ],
)
def test_failures_are_reported(
    job_for: MakeJob,
    relay: tuple[RecordingRelay, str],
    tmp_path: Path,
    case: str,
    stage: str,
    code: str,
    message: str,
) -> None:
    recorder, _ = relay
    job_kw: dict[str, Any] = {}
    settings: dict[str, str] = {}
    if case == "zip_slip":
        job_kw["images_zip"] = make_zip({"a.png": b"png", "../../escape.png": b"png"})
    elif case == "zip_bomb":
        job_kw["images_zip"] = bomb_zip(8 * 1024 * 1024)
        settings["max_unzipped_bytes"] = str(1024 * 1024)
    elif case == "checksum":
        job_kw["model_sha256"] = "0" * 64
    elif case == "builtin":
        job_kw["trainer"] = "builtin"
        settings["trainer_factory"] = ""
    elif case == "disk":
        settings["disk_margin_bytes"] = str(10**18)
    elif case == "no_gpu":
        settings["require_gpu"] = "true"
    elif case == "upload_limit":
        job_kw["max_upload_bytes"] = 1000
    job = job_for(**job_kw)
    env = runner_env(job.job_url, tmp_path / "work", **settings)
    if case == "no_gpu":
        env["PATH"] = str(Path(os.__file__).parent)  # python's lib dir: no nvidia-smi there

    done = run_runner(env, tmp_path / "runner.log")

    assert done.code == 1, done.log
    failed = recorder.of_type("run.failed")
    assert len(failed) == 1, recorder.types()
    assert failed[0].data["stage"] == stage
    assert failed[0].data["code"] == code
    assert message in failed[0].data["message"]
    assert recorder.types()[-1] == "run.failed"
    assert (
        not (tmp_path / "escape.png").exists() and not (tmp_path / "work" / "escape.png").exists()
    )
    no_secrets_in(done.log, job)


@pytest.mark.parametrize(
    ("version", "key", "code", "message"),
    [
        (101, "wrong-key", "civitai_unauthorized", "Civitai refused the API key"),
        (102, CIVITAI_KEY, "civitai_forbidden", "early access model or the key's account"),
        (999, CIVITAI_KEY, "model_not_found", "not found"),
    ],
)
def test_civitai_refusals_are_reported_clearly(
    job_for: MakeJob,
    relay: tuple[RecordingRelay, str],
    civitai: tuple[FakeCivitai, str],
    tmp_path: Path,
    version: int,
    key: str,
    code: str,
    message: str,
) -> None:
    recorder, _ = relay
    _, base = civitai
    job = job_for(
        model_url=f"{base}/api/download/models/{version}",
        model_sha256=None,
        needs_civitai_key=True,
        civitai_api_key=key,
    )
    done = run_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")
    assert done.code == 1, done.log
    (failed,) = recorder.of_type("run.failed")
    assert (failed.data["stage"], failed.data["code"]) == ("model", code)
    assert message in failed.data["message"]
    no_secrets_in(done.log, job)


def test_unreadable_job_exits_2_with_a_clear_line(s3: Any, settings: Any, tmp_path: Path) -> None:
    missing = s3.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": "runs/nope/job.json"}
    )
    done = run_runner(runner_env(missing, tmp_path / "work"), tmp_path / "a.log", timeout_s=30)
    assert done.code == 2
    assert "cannot read the job spec at" in done.log and "HTTP 404" in done.log
    assert "/runs/nope/job.json" in done.log
    assert "X-Amz" not in done.log and "Traceback" not in done.log

    s3.put_object(Bucket=settings.bucket, Key="runs/bad/job.json", Body=b'{"run_id": "x"}')
    bad = s3.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": "runs/bad/job.json"}
    )
    done = run_runner(runner_env(bad, tmp_path / "work"), tmp_path / "b.log", timeout_s=30)
    assert done.code == 2
    assert "is not valid" in done.log and "images: Field required" in done.log


def test_relay_down_then_back_loses_nothing(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.fail_next(5)  # down at the start
    recorder.fail_for_after("files.ready", 0.5)  # and again during training
    job = job_for(epochs=2)
    env = runner_env(
        job.job_url, tmp_path / "work", trainer_factory="tests.runner.fake_trainer:SlowTrainer"
    )
    done = run_runner(env, tmp_path / "runner.log")

    assert done.code == 0, done.log
    types = recorder.types()
    assert types[:4] == SEED_ORDER
    assert types[-2:] == ["training.completed", "model.uploaded"]
    events = recorder.snapshot()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    steps = [e.data["step"] for e in recorder.of_type("training.progress")]
    assert steps == sorted(steps) and steps[-1] == 40
    assert len(steps) < 40  # coalesced while the relay was down
    assert sum(1 for a in recorder.answers if a.status == 503) >= 6


def _runner_in_training(
    recorder: RecordingRelay, job: Job, tmp_path: Path
) -> tuple[RunnerProcess, int]:
    """The runner as a process with a trainer that never ends, once its child process runs."""
    workdir = tmp_path / "work"
    env = runner_env(
        job.job_url, workdir, trainer_factory="tests.runner.fake_trainer:HangingTrainer"
    )
    runner = start_runner(env, tmp_path / "runner.log")
    recorder.wait_for_type("training.progress", timeout_s=30)
    pid_file = workdir / job.spec.run_id / "output" / "child.pid"
    assert wait_until(pid_file.exists, 5)
    pid = int(pid_file.read_text())
    assert pid_alive(pid)
    return runner, pid


def test_410_stops_the_runner_and_its_trainer_promptly(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = job_for()
    runner, child = _runner_in_training(recorder, job, tmp_path)

    recorder.closed = True
    started = time.monotonic()
    code = runner.wait(timeout_s=30)  # the next heartbeat (1 s) meets the 410
    assert code == 3, runner.log
    # Promptly: well before the orphan timeout (20 s: a 410 taken for an outage) and the trainer
    # stop timeout (30 s: a stop that hung), let alone the max runtime (120 s: a 410 ignored).
    assert time.monotonic() - started < job.spec.limits.orphan_timeout_s - 5
    assert wait_until(lambda: not pid_alive(child), 5)
    assert "run.failed" not in recorder.types()


def test_sigterm_stops_the_trainer_and_reports(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = job_for()
    runner, child = _runner_in_training(recorder, job, tmp_path)

    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout_s=20) == 143, runner.log
    assert not pid_alive(child)
    (failed,) = recorder.of_type("run.failed")
    assert failed.data["code"] == "terminated" and failed.data["stage"] == "training"
    assert recorder.types()[-1] == "run.failed"


def test_max_runtime_stops_the_run(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = job_for(limits=RunnerLimits(max_runtime_s=3, orphan_timeout_s=20, heartbeat_interval_s=1))
    runner, child = _runner_in_training(recorder, job, tmp_path)
    assert runner.wait(timeout_s=20) == 1, runner.log
    assert not pid_alive(child)
    (failed,) = recorder.of_type("run.failed")
    assert failed.data["code"] == "max_runtime_exceeded"
    assert "limit of 3 s" in failed.data["message"]


def test_log_tail_is_redacted(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    job = job_for()
    env = runner_env(
        job.job_url, tmp_path / "work", trainer_factory="tests.runner.fake_trainer:FailingTrainer"
    )
    done = run_runner(env, tmp_path / "runner.log")
    assert done.code == 1, done.log
    (failed,) = recorder.of_type("run.failed")
    assert (failed.data["stage"], failed.data["code"]) == ("training", "trainer_crashed")
    tail = failed.data["log_tail"]
    assert len(tail) == 50
    assert tail[-1] == "RuntimeError: CUDA out of memory"
    text = "\n".join(tail)
    no_secrets_in(text, job)
    assert "debug: using credential [redacted] for the download" in tail
    assert "https://bucket.s3.example.com/runs/x/model.safetensors?[redacted]" in text
    no_secrets_in(done.log, job)


def test_gives_up_when_the_relay_stays_unreachable(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.fail_for(3600)
    job = job_for(
        limits=RunnerLimits(max_runtime_s=120, orphan_timeout_s=2, heartbeat_interval_s=1)
    )
    env = runner_env(
        job.job_url, tmp_path / "work", trainer_factory="tests.runner.fake_trainer:HangingTrainer"
    )
    done = run_runner(env, tmp_path / "runner.log", timeout_s=90)
    assert done.code == 4, done.log
    assert done.seconds < 60  # at the orphan timeout (2 s), far from the max runtime (120 s)
    assert "giving up" in done.log
    assert recorder.events == []


def test_sigterm_while_events_wait_for_the_relay_exits_at_once(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.fail_for_after("training.completed", 3600)  # model.uploaded cannot get through
    job = job_for(epochs=1)
    runner = start_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")
    recorder.wait_for_type("training.completed", timeout_s=30)
    assert wait_until(lambda: any(a.status == 503 for a in recorder.answers), 10)
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.wait(timeout_s=10) == 143, runner.log
    assert "terminated before every event was delivered" in runner.log


# --------------------------------------------------------------------------------------------
# The upload waits out an S3 outage; the run's log goes next to the model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["503", "refuse"])
def test_the_model_upload_survives_an_s3_outage(
    job_for: MakeJob,
    relay: tuple[RecordingRelay, str],
    s3_endpoint: str,
    settings: Any,
    s3: Any,
    tmp_path: Path,
    outage: Mode,
) -> None:
    """S3 answers 503 (or drops every connection) when training ends, then comes back.

    Backoff doubles from 0.05 s to its cap (LORA_RUNNER_RETRY_MAX_S, 0.2 s here, 60 s in the
    image) and retries until the orphan timeout (20 s here, 30 min by default).
    """
    recorder, _ = relay
    with OutageProxy(s3_endpoint) as proxy:
        proxy.mode = outage
        upload_s3 = s3_client_for(settings.model_copy(update={"s3_endpoint_url": proxy.url}))
        job = job_for(upload_s3=upload_s3, log_upload=True)
        runner = start_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")
        # An outage longer than the old 5 tries would survive: S3 comes back after 10 failed ones
        # (the retry heartbeats are coalesced, so wait for the highest attempt, not a count).
        outlasted = recorder.wait_for(
            lambda events: max((e.data.get("retry") or 0 for e in events), default=0) >= 10,
            timeout_s=60,
        )
        assert outlasted, runner.log
        proxy.mode = "forward"
        code = runner.wait(30)

    assert code == 0, runner.log
    assert proxy.refused >= 10
    stored = s3.get_object(Bucket=job.bucket, Key=job.upload_key)["Body"].read()
    assert stored == checkpoint_bytes(2)
    assert recorder.types()[-1] == "model.uploaded"
    # Each retry was reported: stage upload, the attempt, and what went wrong (no URL, no secret).
    retries = [e.data for e in recorder.of_type("heartbeat") if e.data.get("retry")]
    assert retries and all(r["stage"] == "upload" for r in retries)
    expected = "HTTP 503" if outage == "503" else "Error"
    assert all(expected in r["error"] for r in retries), retries
    assert [r["retry"] for r in retries] == sorted(r["retry"] for r in retries)
    for event in recorder.snapshot():
        no_secrets_in(event.model_dump_json(), job)
    no_secrets_in(runner.log, job)


def test_heartbeats_carry_the_trainers_last_step(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    """Training is held after step GATE_STEP until a heartbeat (every 1 s) reported that step."""
    recorder, _ = relay
    job = job_for(epochs=2)
    gate = tmp_path / "gate"
    env = runner_env(
        job.job_url, tmp_path / "work", trainer_factory="tests.runner.fake_trainer:GatedTrainer"
    )
    env[GATE_ENV] = str(gate)
    runner = start_runner(env, tmp_path / "runner.log")
    try:
        held = recorder.wait_for(
            lambda events: any(
                e.type == "heartbeat"
                and e.data.get("stage") == "training"
                and e.data.get("step") == GATE_STEP
                for e in events
            ),
            timeout_s=60,
        )
        assert held, [e.data for e in recorder.of_type("heartbeat")]
        gate.touch()
        code = runner.wait(timeout_s=60)
    finally:
        if runner.proc.poll() is None:
            runner.proc.kill()
            runner.proc.wait()

    assert code == 0, runner.log
    steps = [
        e.data["step"] for e in recorder.of_type("heartbeat") if e.data.get("step") is not None
    ]
    total = 2 * FakeTrainer.steps_per_epoch
    assert steps == sorted(steps) and 0 < steps[-1] <= total


def test_the_runs_log_is_uploaded_on_success(job_for: MakeJob, s3: Any, tmp_path: Path) -> None:
    job = job_for(log_upload=True)
    done = run_runner(runner_env(job.job_url, tmp_path / "work"), tmp_path / "runner.log")

    assert done.code == 0, done.log
    log = s3.get_object(Bucket=job.bucket, Key=job.log_key)["Body"].read().decode()
    assert "gpu.ready" in log and "training.completed" in log
    assert f"to {job.upload_key}" in log  # written before model.uploaded was sent
    no_secrets_in(log, job)


def test_a_crashing_sd_scripts_reports_its_cause_and_uploads_its_log(
    job_for: MakeJob, relay: tuple[RecordingRelay, str], s3: Any, tmp_path: Path
) -> None:
    """The real sd-scripts trainer runs the stand-in under an accelerate that wraps the crash."""
    recorder, _ = relay
    job = job_for(log_upload=True)
    cause = "PIL.UnidentifiedImageError: cannot identify image file 'img1.png'"
    env = runner_env(
        job.job_url,
        tmp_path / "work",
        trainer_factory="",
        accelerate_command=json.dumps([sys.executable, str(STANDIN / "accelerate")]),
        sd_scripts_dir=str(STANDIN),
        tokenizer_cache_dir=str(tmp_path / "tokenizers"),
    )
    env.update({"STANDIN_MODE": "crash", "STANDIN_CRASH": cause})
    done = run_runner(env, tmp_path / "runner.log")

    assert done.code == 1, done.log
    (failed,) = recorder.of_type("run.failed")
    assert failed.data["code"] == "trainer_crashed"
    assert failed.data["message"] == f"sd-scripts exited with code 1: {cause}"
    log = s3.get_object(Bucket=job.bucket, Key=job.log_key)["Body"].read().decode()
    assert "running training" in log  # the trainer's own output, not only the runner's
    assert cause in log and "CalledProcessError" in log
    assert "run failed in stage training (trainer_crashed)" in log
    no_secrets_in(log, job)
