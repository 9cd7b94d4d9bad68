"""Why a run is not moving, on the dev server with a real worker: a request no retry can fix
fails the run at once with its reason (no 15 minutes at `pending`), an activity that keeps
failing shows in `status`, `status --json` and `watch` with its attempt and last error, and
`logs` of a run that never had a GPU says what became of it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from common.settings import Settings
from workflows.models import RunStatus, RunStatusName, TrainingRequest

from .fake_civitai import FakeCivitai
from .http_support import serve_asgi
from .processes import Captured
from .test_cli import ROOT, cli, cli_env, dev_address, workdir
from .workflow_support import (
    SLEEPING_RUNNER,
    RecordingProvider,
    local_model,
    put_dataset,
    running_worker,
    start_run,
    wait_for_status,
)

__all__ = ["workdir"]  # the fixture, shared with test_cli

CIVITAI_VERSION = 1001  # one of the fake's default versions (SD 1.5)


async def test_settings_no_retry_can_fix_fail_the_run_at_once_with_the_reason(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, workdir: Path
) -> None:
    """network_dim=4 with SD 1.5's default network_alpha of 16 (as a backend may send it, past
    any CLI): the job cannot be written, so the run fails in seconds, before any GPU."""
    run_settings = settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})
    provider = RecordingProvider(run_settings)
    request = TrainingRequest.model_validate(
        {
            "images": put_dataset(s3, settings.bucket, "cats/"),
            "model": str(local_model(workdir)),
            "training": {"network_dim": 4},
        }
    )
    env = cli_env(settings, dev_address(dev_env))
    async with running_worker(dev_env.client, run_settings, provider):
        handle = await start_run(dev_env.client, run_settings, request)

        # Not `stalled during pending` after the pending deadline (15 min): failed now.
        failed = await wait_for_status(handle, RunStatusName.FAILED, timeout_s=30)

        assert failed.error is not None
        assert (failed.error.code, failed.error.stage) == ("InvalidTrainingConfig", "pending")
        assert failed.error.message == (
            "the training settings do not work with base-sd15.safetensors (SD 1.5): "
            "network_alpha (16.0) must not exceed network_dim (4); network_alpha=16 is the "
            "sd15 default: set it as well"
        )
        assert provider.created == []

        shown = await asyncio.to_thread(cli, ["status", handle.id], env)
        assert f"error        InvalidTrainingConfig during pending: {failed.error.message}" in (
            shown.output
        ), shown.output
        assert "full log" not in shown.output  # no GPU ever ran, so no GPU log will come

        logs = await asyncio.to_thread(cli, ["logs", handle.id], env)
        assert logs.exit_code == 1, logs.output
        assert logs.output.strip() == (
            f"error: run {handle.id} never reached a GPU, so it has no GPU log: failed during "
            f"pending: InvalidTrainingConfig: {failed.error.message}"
        )


@pytest.fixture
def civitai_down() -> Iterator[tuple[FakeCivitai, str]]:
    """A Civitai whose model-version API answers 503 to every request."""
    fake = FakeCivitai()
    fake.fail_next("version", 503, {"error": "Service Unavailable"}, times=100_000)
    with serve_asgi(fake.app) as base_url:
        yield fake, base_url


async def test_a_model_lookup_that_keeps_failing_shows_its_attempt_and_last_error(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    s3: Any,
    workdir: Path,
    civitai_down: tuple[FakeCivitai, str],
) -> None:
    _, civitai_url = civitai_down
    run_settings = settings.model_copy(
        update={"local_runner_command": SLEEPING_RUNNER, "civitai_base_url": civitai_url}
    )
    request = TrainingRequest.model_validate(
        {
            "images": put_dataset(s3, settings.bucket, "cats/"),
            "model": f"civitai:{CIVITAI_VERSION}",
        }
    )
    env = cli_env(settings, dev_address(dev_env))
    expected_error = f"Civitai answered HTTP 503 for Civitai model version {CIVITAI_VERSION}"
    async with running_worker(dev_env.client, run_settings, RecordingProvider(run_settings)):
        handle = await start_run(dev_env.client, run_settings, request)

        waiting = await until_waiting_on(env, handle.id, timeout_s=30)

        assert waiting["status"] == "pending" and waiting["error"] is None
        (entry,) = waiting["waiting_on"]
        assert entry["activity"] == "resolve_model"
        assert entry["waiting_for"] == "resolve the base model"
        assert entry["attempt"] >= 2
        assert entry["last_error"] == f"{expected_error}; will retry"
        assert entry["error_type"] == "CivitaiUnavailable"
        # All of it is a RunStatus, what it waits on included: a client parses it as one.
        status = RunStatus.model_validate(waiting)
        assert status.run_id == handle.id
        assert [(w.activity, w.error_type) for w in status.waiting_on] == [
            ("resolve_model", "CivitaiUnavailable")
        ]

        shown = await asyncio.to_thread(cli, ["status", handle.id], env)
        assert "waiting on   resolve the base model: attempt " in shown.output, shown.output
        assert f"last error (CivitaiUnavailable): {expected_error}" in shown.output

        logs = await asyncio.to_thread(cli, ["logs", handle.id], env)
        assert logs.exit_code == 1
        assert "has no GPU yet (pending), so no GPU log yet; waiting on resolve the base " in (
            logs.output
        ), logs.output

        process_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        command = [sys.executable, "-m", "cli", "watch", handle.id]
        watch = Captured(command, cwd=workdir, env=process_env)
        watch_json = Captured([*command, "--json"], cwd=workdir, env=process_env)
        try:
            line = await asyncio.to_thread(
                watch.wait_for_line, "waiting on resolve the base model: attempt", 30
            )
            assert expected_error in line
            first = await asyncio.to_thread(
                watch_json.wait_for_line, re.compile(r'"waiting_on":\[\{'), 30
            )
            assert RunStatus.model_validate_json(first).waiting_on[0].activity == "resolve_model"

            await handle.cancel()

            await asyncio.to_thread(watch.wait_for_line, "cancelled", 60)
            assert await asyncio.to_thread(watch.finish, 30) and watch.proc.returncode == 1
            await asyncio.to_thread(watch_json.finish, 30)
            last = RunStatus.model_validate_json(watch_json.output.splitlines()[-1])
            assert last.status == RunStatusName.CANCELLED
            assert last.waiting_on == []  # an ended run waits on nothing
        finally:
            watch.kill()
            watch_json.kill()


async def until_waiting_on(env: dict[str, str], run_id: str, timeout_s: float) -> dict[str, Any]:
    """`status --json` until it shows an activity past its first attempt."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(cli, ["status", run_id, "--json"], env)
        assert result.exit_code == 0, result.output
        shown: dict[str, Any] = json.loads(result.stdout)
        if any(w["attempt"] >= 2 for w in shown.get("waiting_on", [])):
            return shown
        assert time.monotonic() < deadline, f"nothing retrying after {timeout_s} s: {shown}"
        await asyncio.sleep(0.2)
