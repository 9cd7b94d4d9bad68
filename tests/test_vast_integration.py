"""Whole runs with provider `vast` on the real parts: Temporal's dev server, local S3 over HTTP,
the relay over HTTP, and the real runner process booted by the fake Vast API's hosts (with the
sd-scripts stand-in as its trainer). Only Vast is fake, and only at its HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from activities.providers.vast import VastProvider
from common.settings import Settings
from relay.app import create_app
from workflows.models import Deadlines, RunStatus, RunStatusName, TrainingRequest
from workflows.training import TrainingWorkflow

from .fake_civitai import checkpoint_bytes
from .fakes.vast_api import FakeVast, make_offer
from .http_support import serve_asgi
from .vast_support import fake_vast
from .workflow_support import SEED_ORDER, put_dataset, running_worker, start_run

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "sd_scripts_standin"
# Offers in the order the provider ranks them (same host speed, rising price).
BEST, SECOND, THIRD = 10001, 10002, 10003
OFFERS = [
    make_offer(1, dph_total=0.30),
    make_offer(2, dph_total=0.40),
    make_offer(3, dph_total=0.50),
]
# Real time on the dev server: a host that never becomes ready is given up on after this.
QUICK_BOOT = Deadlines(
    pending_s=120,
    pending_gpu_s=8,
    pending_images_s=120,
    pending_model_s=120,
    training_idle_s=120,
    training_total_s=600,
)


@dataclass
class VastStack:
    client: Client
    settings: Settings
    fake: FakeVast
    model_uri: str


def runner_env(tmp_path: Path) -> dict[str, str]:
    """What the GPU image sets for the runner, pointed at the stand-in trainer."""
    return {
        "LORA_RUNNER_REQUIRE_GPU": "false",
        "LORA_RUNNER_SD_SCRIPTS_DIR": str(STANDIN),
        "LORA_RUNNER_ACCELERATE_COMMAND": json.dumps([sys.executable, str(STANDIN / "accelerate")]),
        "LORA_RUNNER_TOKENIZER_CACHE_DIR": str(tmp_path / "tokenizers"),
        "LORA_RUNNER_RETRY_INITIAL_S": "0.2",
        "LORA_RUNNER_RETRY_MAX_S": "1",
        "LORA_RUNNER_DISK_MARGIN_BYTES": "0",
    }


@pytest.fixture
async def parts(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Path
) -> AsyncIterator[VastStack]:
    """Everything but the worker: the relay, the fake Vast API, a model in S3."""
    s3.put_object(
        Bucket=settings.bucket, Key="models/base-sd15.safetensors", Body=checkpoint_bytes("sd15")
    )
    assert settings.s3_endpoint_url is not None
    with (
        serve_asgi(create_app(settings, dev_env.client)) as relay_url,
        fake_vast(settings, tmp_path / "hosts", OFFERS, runner_env=runner_env(tmp_path)) as (
            fake,
            vast_settings,
        ),
    ):
        run_settings = vast_settings.model_copy(
            update={
                "relay_public_url": relay_url,
                # The same S3 under another name: what the GPUs get must be signed for it.
                "s3_public_endpoint_url": settings.s3_endpoint_url.replace(
                    "127.0.0.1", "localhost"
                ),
            }
        )
        yield VastStack(
            dev_env.client,
            run_settings,
            fake,
            f"s3://{settings.bucket}/models/base-sd15.safetensors",
        )


@pytest.fixture
async def stack(parts: VastStack) -> AsyncIterator[VastStack]:
    """The parts and a worker with the Vast provider."""
    provider = VastProvider(parts.settings)
    async with running_worker(parts.client, parts.settings, provider):  # type: ignore[arg-type]
        yield parts


def vast_request(stack: VastStack, s3: Any, **overrides: Any) -> TrainingRequest:
    images = put_dataset(s3, stack.settings.bucket, "uploads/cats/", count=3)
    fields: dict[str, Any] = {
        "images": images,
        "model": stack.model_uri,
        "training": {"epochs": 2, "repeats": 1},
        "deadlines": QUICK_BOOT,
    }
    fields.update(overrides)
    return TrainingRequest.model_validate(fields)


async def finish(handle: Any, timeout_s: float = 120) -> RunStatus:
    """The run's final status, whether it completed or ended otherwise."""
    with contextlib.suppress(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), timeout=timeout_s)
    status: RunStatus = await handle.query(TrainingWorkflow.status)
    return status


def machines(fake: FakeVast) -> list[int]:
    return [instance.offer["machine_id"] for instance in fake.created()]


def assert_nothing_left(fake: FakeVast) -> None:
    assert fake.live() == []
    destroyed = fake.destroyed_ids()
    assert sorted(destroyed) == sorted(i.id for i in fake.created())
    assert len(destroyed) == len(set(destroyed)), "an instance was destroyed twice"


async def test_a_run_on_vast_completes_and_its_instance_is_destroyed_once(
    stack: VastStack, s3: Any
) -> None:
    handle = await start_run(stack.client, stack.settings, vast_request(stack, s3))
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert [c.status for c in final.history] == SEED_ORDER
    (instance,) = stack.fake.created()
    assert machines(stack.fake) == [BEST]
    assert stack.fake.destroyed_ids() == [instance.id]
    assert_nothing_left(stack.fake)
    # status shows the GPU, its price and what the run cost.
    assert final.gpu is not None
    assert (final.gpu.provider, final.gpu.instance_id) == ("vast", str(instance.id))
    assert (final.gpu.gpu_name, final.gpu.dollars_per_hour) == ("RTX 4090", 0.30)
    assert (final.gpu.machine_id, final.gpu.country) == (str(BEST), "SE")
    assert final.cost_usd > 0
    # The instance got the job through an address a GPU reaches, and nothing else secret.
    (body,) = stack.fake.create_bodies
    assert set(body["env"]) == {"LORA_JOB_URL"}
    public = stack.settings.s3_public_endpoint_url
    assert public is not None and body["env"]["LORA_JOB_URL"].startswith(public)


async def test_a_lost_create_response_rents_one_instance(stack: VastStack, s3: Any) -> None:
    stack.fake.lose_create_responses(1)
    handle = await start_run(stack.client, stack.settings, vast_request(stack, s3))
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert len(stack.fake.created()) == 1
    assert_nothing_left(stack.fake)


async def test_a_429_storm_slows_the_run_but_it_completes(stack: VastStack, s3: Any) -> None:
    # More 429s in a row than the SDK retries: the activity retries after it.
    stack.fake.rate_limit(12, retry_after_s=0.1)
    stack.fake.server_errors(2, status=502)
    handle = await start_run(stack.client, stack.settings, vast_request(stack, s3))
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert len(stack.fake.created()) == 1
    assert_nothing_left(stack.fake)
    assert sum(1 for method, _, _ in stack.fake.requests if method) > 12


async def test_an_offer_taken_at_create_moves_to_the_next_offer(stack: VastStack, s3: Any) -> None:
    stack.fake.machine_faults[BEST] = "taken"
    handle = await start_run(stack.client, stack.settings, vast_request(stack, s3))
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert machines(stack.fake) == [SECOND]
    assert final.attempt == 1
    assert_nothing_left(stack.fake)


async def test_a_host_whose_container_exits_is_replaced_by_the_next_offer(
    stack: VastStack, s3: Any
) -> None:
    stack.fake.machine_faults[BEST] = "exits"
    request = vast_request(stack, s3, deadlines=Deadlines())  # found by the instance check
    handle = await start_run(stack.client, stack.settings, request)
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert machines(stack.fake) == [BEST, SECOND]
    first, second = stack.fake.created()
    assert stack.fake.destroyed_ids() == [first.id, second.id]
    assert_nothing_left(stack.fake)
    assert final.attempt == 2
    assert any(str(BEST) in failure for failure in final.gpu_failures)
    assert any("container exited" in failure for failure in final.gpu_failures)
    assert first.exited_at is not None
    exit_to_destroy_s = stack.fake.destroy_calls[0][1] - first.exited_at
    print(f"host exit -> destroy call: {exit_to_destroy_s:.1f} s")
    assert exit_to_destroy_s < 30


async def test_an_image_pull_error_moves_to_the_next_offer(stack: VastStack, s3: Any) -> None:
    stack.fake.machine_faults[BEST] = "pull_error"
    handle = await start_run(stack.client, stack.settings, vast_request(stack, s3))
    final = await finish(handle)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert machines(stack.fake) == [BEST, SECOND]
    assert_nothing_left(stack.fake)
    assert any(str(BEST) in failure for failure in final.gpu_failures)


async def test_when_every_offer_fails_the_run_stalls_naming_every_host(
    stack: VastStack, s3: Any
) -> None:
    stack.fake.machine_faults.update({BEST: "exits", SECOND: "pull_error", THIRD: "stuck_loading"})
    handle = await start_run(
        stack.client, stack.settings, vast_request(stack, s3, max_gpu_attempts=3)
    )
    final = await finish(handle)

    assert final.status == RunStatusName.STALLED
    assert machines(stack.fake) == [BEST, SECOND, THIRD]
    assert_nothing_left(stack.fake)
    assert final.error is not None
    for machine in (BEST, SECOND, THIRD):
        assert str(machine) in final.error.message, final.error.message


async def test_the_hosts_own_reason_is_listed_when_it_fails_to_boot(
    stack: VastStack, s3: Any
) -> None:
    """Waits on the workflow: a host found dead at the pendingGpu deadline should be named with
    its own reason (the pull error), not only "not ready in time"."""
    stack.fake.machine_faults.update({BEST: "pull_error", SECOND: "exits"})
    handle = await start_run(
        stack.client, stack.settings, vast_request(stack, s3, max_gpu_attempts=2)
    )
    final = await finish(handle)

    assert final.status == RunStatusName.STALLED
    assert final.error is not None
    assert "manifest unknown" in final.error.message, final.error.message
    assert "container exited" in final.error.message, final.error.message


async def test_the_cost_cap_ends_the_run_before_it_is_crossed(stack: VastStack, s3: Any) -> None:
    # One minute of a $0.30/h GPU: less than the margin the workflow keeps for the destroy.
    cap = 0.005
    handle = await start_run(
        stack.client, stack.settings, vast_request(stack, s3, max_cost_usd=cap)
    )
    started = time.monotonic()
    final = await finish(handle)

    assert final.status == RunStatusName.FAILED
    assert final.error is not None and final.error.code == "cost_cap"
    assert final.cost_usd < cap
    assert_nothing_left(stack.fake)
    assert time.monotonic() - started < 60


def worker_env(settings: Settings, temporal_address: str) -> dict[str, str]:
    """The LORA_* environment that gives a worker process exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        env[f"LORA_{name.upper()}"] = str(value)
    env["LORA_TEMPORAL_ADDRESS"] = temporal_address
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_worker_process(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.vast_worker_process"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_a_worker_killed_mid_allocation_rents_one_instance(
    parts: VastStack, s3: Any, tmp_path: Path
) -> None:
    """Slow by design (~1 min): Temporal retries the allocation only once its heartbeat timeout
    says the killed worker is gone."""
    fake = parts.fake
    fake.create_answer_delay_s = 5.0  # the worker dies while Vast is making its instance
    target = parts.client.service_client.config.target_host
    worker = start_worker_process(worker_env(parts.settings, target), tmp_path / "worker.log")
    try:
        handle = await start_run(parts.client, parts.settings, vast_request(parts, s3))
        deadline = time.monotonic() + 60
        while not fake.created():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker never asked Vast for an instance"
            await asyncio.sleep(0.05)
        worker.kill()
    finally:
        worker.kill()
        worker.wait(timeout=10)
    fake.create_answer_delay_s = 0.0

    # The worker comes back (any worker on the queue will do): the retried allocation finds the
    # instance by its label instead of renting another.
    provider = VastProvider(parts.settings)
    async with running_worker(parts.client, parts.settings, provider):  # type: ignore[arg-type]
        final = await finish(handle, timeout_s=200)

    assert final.status == RunStatusName.COMPLETED, final.error
    assert len(fake.created()) == 1
    assert final.attempt == 1
    assert_nothing_left(fake)
