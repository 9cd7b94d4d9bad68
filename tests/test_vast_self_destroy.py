"""On Vast, a runner that gives up destroys its own instance with its instance-scoped key.

The real runner process runs on a fake Vast host (tests/fakes/vast_api.py), which gives it
CONTAINER_ID and CONTAINER_API_KEY as Vast does; the relay is the recording relay over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from activities.providers.base import instance_label
from activities.providers.vast import VastProvider
from common.settings import Settings
from gpu_runner.protocol import RunnerLimits
from gpu_runner.self_destroy import destroy_own_instance, instance_credentials
from workflows.models import GpuRequirements

from .fakes.vast_api import FakeVast, make_offer
from .http_support import serve_asgi
from .runner.relay_recorder import RecordingRelay
from .runner.support import MASTER_SECRET, make_job, runner_env
from .vast_support import fake_vast, wait_until

HANGING_TRAINER = "tests.runner.fake_trainer:HangingTrainer"


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


@contextlib.contextmanager
def rent(
    s3: Any,
    settings: Settings,
    relay: tuple[RecordingRelay, str],
    tmp_path: Path,
    limits: RunnerLimits,
) -> Iterator[tuple[FakeVast, VastProvider, str]]:
    """One Vast instance running the real runner on a job that reports to `relay`."""
    recorder, base = relay
    job = make_job(
        s3, settings.bucket, lambda run_id: recorder.events_url(base, run_id), limits=limits
    )
    env = runner_env("unused", tmp_path / "work", trainer_factory=HANGING_TRAINER)
    env.pop("LORA_JOB_URL")
    with fake_vast(settings, tmp_path / "hosts", [make_offer(1)], runner_env=env) as (fake, s):
        label = instance_label(s.deployment_name, job.spec.run_id, 1)
        provider = VastProvider(s)
        instance = provider.create(label, job.job_url, GpuRequirements())
        yield fake, provider, instance.instance_id


def assert_destroyed_itself(fake: FakeVast, instance_id: str, within_s: float) -> float:
    started = time.monotonic()
    wait_until(lambda: fake.destroy_calls, timeout_s=within_s)
    ((destroyed, _, who),) = fake.destroy_calls
    assert destroyed == int(instance_id)
    # With its own key, not the account's (which it never had).
    assert who == f"instance:{instance_id}"
    instance = fake.instances[int(instance_id)]
    assert instance.process is not None
    wait_until(lambda: instance.process is not None and instance.process.poll() is not None)
    log = fake.runner_log(int(instance_id))
    assert instance.api_key not in log
    return time.monotonic() - started


def test_an_orphaned_runner_destroys_its_own_instance(
    s3: Any, settings: Settings, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.fail_for(3600)  # the orchestrator is gone: nothing reaches it
    limits = RunnerLimits(max_runtime_s=120, orphan_timeout_s=2, heartbeat_interval_s=1)
    with rent(s3, settings, relay, tmp_path, limits) as (fake, _provider, instance_id):
        assert_destroyed_itself(fake, instance_id, within_s=20)
        assert "giving up (orphaned)" in fake.runner_log(int(instance_id))


def test_a_runner_told_410_destroys_its_own_instance(
    s3: Any, settings: Settings, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    limits = RunnerLimits(max_runtime_s=120, orphan_timeout_s=60, heartbeat_interval_s=1)
    with rent(s3, settings, relay, tmp_path, limits) as (fake, _provider, instance_id):
        wait_until(lambda: "gpu.ready" in recorder.types(), timeout_s=20)
        recorder.closed = True
        assert_destroyed_itself(fake, instance_id, within_s=20)
        assert "giving up (closed)" in fake.runner_log(int(instance_id))


def test_a_runner_past_its_max_runtime_destroys_its_own_instance(
    s3: Any, settings: Settings, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    limits = RunnerLimits(max_runtime_s=3, orphan_timeout_s=60, heartbeat_interval_s=1)
    with rent(s3, settings, relay, tmp_path, limits) as (fake, _provider, instance_id):
        assert_destroyed_itself(fake, instance_id, within_s=20)
        (failed,) = recorder.of_type("run.failed")
        assert failed.data["code"] == "max_runtime_exceeded"


def test_a_key_that_may_only_stop_stops_the_instance(
    s3: Any, settings: Settings, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    recorder, _ = relay
    recorder.fail_for(3600)
    limits = RunnerLimits(max_runtime_s=120, orphan_timeout_s=2, heartbeat_interval_s=1)
    with rent(s3, settings, relay, tmp_path, limits) as (fake, provider, instance_id):
        fake.instance_keys_may_destroy = False
        wait_until(lambda: fake.stop_calls, timeout_s=20)
        assert fake.stop_calls == [(int(instance_id), f"instance:{instance_id}")]
        assert fake.destroy_calls == []
        # No GPU billing; the run's workflow or the reaper destroys what is left.
        instance = provider.get(instance_id)
        assert instance is not None and instance.state == "exited"
        assert "stopped" in (instance.message or "")


def test_credentials_come_from_pid_1_when_not_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTAINER_ID", raising=False)
    monkeypatch.delenv("CONTAINER_API_KEY", raising=False)
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/usr/bin\0CONTAINER_ID=4242\0CONTAINER_API_KEY=scoped-key\0")
    assert instance_credentials(environ) == ("4242", "scoped-key")

    # Locally (no Vast variables anywhere) there is nothing to destroy: the runner just exits.
    missing = tmp_path / "no-such-environ"
    assert instance_credentials(missing) is None
    gave_up = destroy_own_instance("http://127.0.0.1:9", "orphaned", pid1_environ=missing)
    assert asyncio.run(gave_up) is False
