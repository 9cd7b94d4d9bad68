"""The `loratrain` command line: clear errors, the embedded stack, and a run followed end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner, Result

from activities.providers.base import instance_label
from activities.providers.local import LocalProvider
from cli.app import app
from common.converter import new_codec_key
from common.settings import Settings
from devstack.stack import DevStack, PortsInUse, free_local_s3_ports, read_dev_env
from workflows.models import GpuRequirements, RunStatus, RunStatusName

from .conftest import free_port
from .images import PNG
from .processes import Captured

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, with the stack's state in its `.loratrain/`."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORA_STATE_DIR", str(work / ".loratrain"))
    return work


def cli(args: list[str], env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, args, env=env)


def loratrain(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`loratrain ARGS` as a real process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env(settings: Settings, temporal_address: str) -> dict[str, str]:
    """LORA_ variables that point the CLI at the test servers and the test's bucket."""
    assert settings.codec_key and settings.s3_secret_access_key and settings.s3_endpoint_url
    return {
        "LORA_TEMPORAL_ADDRESS": temporal_address,
        "LORA_CODEC_KEY": settings.codec_key.get_secret_value(),
        "LORA_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "LORA_S3_ACCESS_KEY_ID": settings.s3_access_key_id or "",
        "LORA_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get_secret_value(),
        "LORA_BUCKET": settings.bucket,
        "LORA_TASK_QUEUE": settings.task_queue,
    }


def image_folder(path: Path) -> Path:
    path.mkdir()
    (path / "cat1.png").write_bytes(PNG + b"1")
    (path / "cat1.txt").write_text("a photo of sks cat")
    (path / "cat2.png").write_bytes(PNG + b"2")
    (path / ".DS_Store").write_bytes(b"hidden")
    (path / "notes.pdf").write_bytes(b"%PDF-1.4")
    return path


# ------------------------------------------------------------------------------------------------
# train: argument errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--resolution", "500"], "--resolution: Input should be a multiple of 64 (got 500)"),
        (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1 (got 0)"),
        (["--webhook-url", "https://example.com/hook"], "--webhook-url and --webhook-secret go"),
        (
            ["--webhook-url", "https://example.com/h", "--webhook-secret", "hunter2"],
            "--webhook-secret: String should match pattern",
        ),
        (["--run-id", "no spaces please"], "--run-id: 'no spaces please' is not a valid run id"),
        (["--trainer", "kohya"], "Invalid value for '--trainer'"),
    ],
)
def test_train_with_a_bad_argument_says_what_is_wrong(
    extra: list[str], expected: str, workdir: Path
) -> None:
    images = image_folder(workdir / "images")
    result = loratrain(["train", str(images), "--model", "civitai:123", *extra], workdir, {})

    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # Nothing was uploaded or started, and a secret given on the command line is not echoed.
    assert "hunter2" not in result.stderr
    assert not (workdir / ".loratrain").exists()


def test_train_needs_a_folder_or_an_s3_prefix(workdir: Path) -> None:
    result = cli(["train", "no-such-folder", "--model", "civitai:1"])
    assert result.exit_code == 2
    assert "IMAGES: no-such-folder does not exist" in result.output

    (workdir / "empty").mkdir()
    result = cli(["train", "empty", "--model", "civitai:1"])
    assert result.exit_code == 2
    assert "holds no .png, .jpg, .jpeg or .webp images" in result.output


def test_train_without_temporal_says_so_plainly(workdir: Path) -> None:
    port = free_port()  # nothing listens there
    env = {"LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "LORA_CODEC_KEY": new_codec_key()}
    result = loratrain(["train", "s3://some-bucket/cats/", "--model", "civitai:1"], workdir, env)

    assert result.returncode == 1
    assert (
        f"cannot reach Temporal at 127.0.0.1:{port}: is `loratrain dev` running?" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_commands_without_a_codec_key_say_where_to_get_one(workdir: Path) -> None:
    result = cli(["status", "some-run"], env={"LORA_CODEC_KEY": None})
    assert result.exit_code == 1
    assert "LORA_CODEC_KEY is not set" in result.output
    assert "loratrain dev" in result.output


# ------------------------------------------------------------------------------------------------
# status / cancel / list / watch on the Temporal dev server
# ------------------------------------------------------------------------------------------------


def dev_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.mark.parametrize("command", ["status", "cancel", "watch"])
async def test_unknown_run_is_named_plainly(
    command: str, dev_env: WorkflowEnvironment, settings: Settings, workdir: Path
) -> None:
    env = cli_env(settings, dev_address(dev_env))
    result = await asyncio.to_thread(cli, [command, "no-such-run-42"], env)

    assert result.exit_code == 1, result.output
    assert "no run 'no-such-run-42' in namespace 'default'" in result.output


async def test_unknown_namespace_is_named_plainly(
    dev_env: WorkflowEnvironment, settings: Settings, workdir: Path
) -> None:
    env = {**cli_env(settings, dev_address(dev_env)), "LORA_TEMPORAL_NAMESPACE": "no-such-ns"}
    result = await asyncio.to_thread(cli, ["status", "some-run"], env)

    assert result.exit_code == 1, result.output
    assert "namespace 'no-such-ns' does not exist" in result.output


async def test_a_run_started_and_followed_from_the_cli(
    dev_env: WorkflowEnvironment, settings: Settings, s3: Any, tmp_path: Path, workdir: Path
) -> None:
    """train starts a run on a dataset already in S3 once; watch, status and list follow it.

    The dataset (put there as a backend would, so the CLI checks nothing locally) holds a file
    that claims to be a PNG but is not, and one with a PNG signature that does not decode: the
    run fails at intake, before any GPU; the CLI must show that failure and exit nonzero.
    """
    # Here, not at the top: the other tests of this module need no worker code at all.
    from activities.providers.local import LocalProvider

    from .workflow_support import local_model, running_worker

    env = cli_env(settings, dev_address(dev_env))
    run_id = f"cli-{uuid.uuid4().hex[:8]}"
    prefix = f"backend/{run_id}/"
    dataset = {"cat1.png": PNG, "cat1.txt": b"a cat", "fake.png": b"not a png at all"}
    dataset["broken.png"] = PNG[:16] + bytes(64)
    for name, body in dataset.items():
        s3.put_object(Bucket=settings.bucket, Key=prefix + name, Body=body)
    model = local_model(tmp_path)
    images = f"s3://{settings.bucket}/{prefix}"
    train = ["train", images, "--model", str(model), "--run-id", run_id, "--epochs", "1"]

    async with running_worker(dev_env.client, settings, LocalProvider(settings)):
        started = await asyncio.to_thread(cli, train, env)
        assert started.exit_code == 0, started.output
        assert f"started run {run_id}" in started.output
        assert f"http://127.0.0.1:8233/namespaces/default/workflows/{run_id}" in started.output

        watched = await asyncio.to_thread(cli, ["watch", run_id], env)
        assert watched.exit_code == 1, watched.output
        assert "failed" in watched.output
        assert "fake.png" in watched.output
        assert "broken.png: the PNG image cannot be decoded" in watched.output

        shown = await asyncio.to_thread(cli, ["status", run_id, "--json"], env)
        assert shown.exit_code == 0, shown.output
        status = RunStatus.model_validate_json(shown.stdout)
        assert status.status == RunStatusName.FAILED
        assert status.error is not None and "fake.png" in status.error.message

        # The status is final before the run closes: it still gives its GPU back first.
        with contextlib.suppress(WorkflowFailureError):
            await dev_env.client.get_workflow_handle(run_id).result()
        again = await asyncio.to_thread(cli, train, env)
        assert again.exit_code == 0, again.output
        assert f"run {run_id} already exists (failed); not starting it again" in again.output

        cancelled = await asyncio.to_thread(cli, ["cancel", run_id], env)
        assert cancelled.exit_code == 0
        assert "already ended (failed); nothing to cancel" in cancelled.output

        listed = await wait_for_list(env, run_id)
        assert "failed" in listed.output


async def wait_for_list(env: dict[str, str], run_id: str, timeout_s: float = 10) -> Result:
    """Visibility is eventually consistent: poll until the run shows up in `list`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(cli, ["list", "--status", "failed"], env)
        assert result.exit_code == 0, result.output
        if run_id in result.output or time.monotonic() > deadline:
            assert run_id in result.output
            return result
        await asyncio.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# The embedded stack
# ------------------------------------------------------------------------------------------------


def stack_env() -> dict[str, str]:
    """LORA_ variables that move every port of the stack off its default, onto free ones."""
    temporal, ui, relay = (free_port() for _ in range(3))
    s3 = free_local_s3_ports()
    return {
        "LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal}",
        "LORA_TEMPORAL_UI_URL": f"http://127.0.0.1:{ui}",
        "LORA_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3.s3}",
        "LORA_LOCAL_S3_INTERNAL_PORT": str(s3.internal),
        "LORA_RELAY_PORT": str(relay),
        "LORA_RELAY_PUBLIC_URL": f"http://127.0.0.1:{relay}",
    }


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_stack_refuses_to_start_when_a_port_is_taken(workdir: Path, busy_port: int) -> None:
    env = stack_env()
    settings = Settings(
        temporal_address=env["LORA_TEMPORAL_ADDRESS"],
        temporal_ui_url=f"http://127.0.0.1:{busy_port}",
        s3_endpoint_url=env["LORA_S3_ENDPOINT_URL"],
        local_s3_internal_port=int(env["LORA_LOCAL_S3_INTERNAL_PORT"]),
        relay_port=int(env["LORA_RELAY_PORT"]),
        state_dir=workdir / ".loratrain",
    )
    with pytest.raises(PortsInUse) as refused:
        DevStack(settings).start()
    assert str(refused.value) == (
        f"port {busy_port} (Temporal UI) is already in use: is another `loratrain dev` running?"
    )
    assert not (workdir / ".loratrain").exists()


def test_stopping_the_stack_gives_local_gpus_back(workdir: Path) -> None:
    settings = Settings(
        state_dir=workdir / ".loratrain",
        local_runner_command=[sys.executable, "-c", "import time; time.sleep(3600)"],
    )
    provider = LocalProvider(settings)
    instance = provider.create(
        instance_label(settings.deployment_name, "left-running", 1), "http://job", GpuRequirements()
    )
    assert provider.get(instance.instance_id).state == "running"  # type: ignore[union-attr]

    DevStack(settings).stop()

    assert provider.list_instances() == []
    assert provider.get(instance.instance_id).state == "gone"  # type: ignore[union-attr]


def test_dev_names_the_taken_port_and_starts_nothing(workdir: Path, busy_port: int) -> None:
    env = {**stack_env(), "LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{busy_port}"}
    result = loratrain(["dev"], workdir, env)

    assert result.returncode == 1
    assert (
        f"port {busy_port} (Temporal) is already in use: is another `loratrain dev` running?"
        in result.stderr
    )
    assert not (workdir / ".loratrain").exists()


def group_members(pgids: set[int]) -> list[str]:
    """Processes (pid and command) still in any of these process groups, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its ')'.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) in pgids:
            found.append(f"{stat.parent.name} {text[: text.rindex(')') + 1]}")
    return found


def dev_pids(state: Path) -> dict[str, int]:
    """The pid (and process group) of each child the state dir's `dev` recorded in dev.pids."""
    recorded = json.loads((state / "dev.pids").read_text())
    return {name: int(entry["pid"]) for name, entry in recorded.items()}


def wait_until(check: Any, what: str, dev: Captured, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if dev.proc.poll() is not None:
            out = dev.finish(timeout_s=30)
            raise AssertionError(
                f"`loratrain dev` exited ({dev.proc.returncode}) before {what}:\n{out}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return False
    return True


@dataclass
class RunningDev:
    process: Captured
    env: dict[str, str]
    state: Path
    pids: dict[str, int]


@contextlib.contextmanager
def running_dev(workdir: Path) -> Iterator[RunningDev]:
    """`loratrain dev` as a process on free ports, once all of it answers; killed if still up."""
    env = stack_env()
    proc = Captured(
        [sys.executable, "-m", "cli", "dev"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    state = workdir / ".loratrain"
    pids: dict[str, int] = {}
    try:
        # Up means start() returned: a child that dies before then fails the start instead of
        # being restarted, so the tests below wait for the line that says so.
        proc.wait_for_line("loratrain dev is up", timeout_s=180)
        wait_until(lambda: answers(env["LORA_TEMPORAL_UI_URL"]), "the Temporal UI", proc)
        wait_until(lambda: answers(env["LORA_S3_ENDPOINT_URL"]), "local S3", proc)
        dev_env = dict(
            line.split("=", 1)
            for line in (state / "dev.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        s3 = boto3.client(
            "s3",
            endpoint_url=env["LORA_S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=json.loads(dev_env["LORA_S3_ACCESS_KEY_ID"]),
            aws_secret_access_key=json.loads(dev_env["LORA_S3_SECRET_ACCESS_KEY"]),
        )

        def bucket_exists() -> bool:
            return any(b["Name"] == "loratrain" for b in s3.list_buckets()["Buckets"])

        wait_until(bucket_exists, "the bucket", proc)
        relay_url = f"{env['LORA_RELAY_PUBLIC_URL']}/healthz"
        wait_until(lambda: answers(relay_url), "the relay", proc)
        wait_until(lambda: (state / "dev.pids").exists(), "the pids file", proc)
        pids.update(dev_pids(state))
        yield RunningDev(proc, env, state, pids)
    finally:
        proc.kill()
        with contextlib.suppress(OSError, ValueError):
            # Children restarted since they were recorded above.
            pids.update({f"now {k}": v for k, v in dev_pids(state).items()})
        for pgid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_dev_runs_the_stack_and_a_signal_stops_all_of_it(
    workdir: Path, stop_signal: signal.Signals
) -> None:
    with running_dev(workdir) as dev:
        assert set(dev.pids) == {"Temporal", "local S3", "relay", "worker"}
        assert (dev.state / "dev.env").stat().st_mode & 0o777 == 0o600
        assert (dev.state / "temporal.db").exists()
        for name in ("temporal", "local-s3", "relay", "worker"):
            assert (dev.state / "logs" / f"{name}.log").exists()
        assert group_members(set(dev.pids.values())), "the children should be running"
        time.sleep(1)  # the worker is up and polling, not only started

        out = dev.process.stop(stop_signal, timeout_s=30)

        assert dev.process.proc.returncode == 0, out
        assert "Ctrl-C stops everything" in out
        assert group_members(set(dev.pids.values())) == []
        assert not (dev.state / "dev.pids").exists()


def test_dev_restarts_a_child_that_dies_and_keeps_the_others(workdir: Path) -> None:
    with running_dev(workdir) as dev:
        os.killpg(dev.pids["worker"], signal.SIGKILL)

        def restarted() -> bool:
            if not (dev.state / "dev.pids").exists():  # stopped: wait_until reports its output
                return False
            return dev_pids(dev.state)["worker"] != dev.pids["worker"]

        wait_until(restarted, "the worker's restart", dev.process, timeout_s=30)
        pids = dev_pids(dev.state)
        assert {k: v for k, v in pids.items() if k != "worker"} == {
            k: v for k, v in dev.pids.items() if k != "worker"
        }
        assert group_members({pids["worker"]}), "the new worker should be running"

        out = dev.process.stop(timeout_s=30)
        assert dev.process.proc.returncode == 0, out
        log = dev.state / "logs" / "worker.log"
        assert "worker exited unexpectedly (killed by SIGKILL); restarting it in 1 s" in out
        assert f"Its log is {log}" in out
        assert f"worker restarted (pid {pids['worker']}, restart 1)" in out
        assert group_members(set(pids.values())) == []


KEYS = (
    "LORA_CODEC_KEY",
    "LORA_WEBHOOK_MASTER_SECRET",
    "LORA_S3_ACCESS_KEY_ID",
    "LORA_S3_SECRET_ACCESS_KEY",
)


def test_dev_reuses_its_keys_on_the_next_start(workdir: Path) -> None:
    """Its keys stay (old runs stay readable, stored data reachable); its addresses follow the
    stack that runs now (each start here has ports of its own)."""
    with running_dev(workdir) as dev:
        first = read_dev_env(dev.state / "dev.env")
        dev.process.stop(timeout_s=30)
    with running_dev(workdir) as dev:
        second = read_dev_env(dev.state / "dev.env")
        assert {k: second[k] for k in KEYS} == {k: first[k] for k in KEYS}
        assert second["LORA_TEMPORAL_ADDRESS"] == dev.env["LORA_TEMPORAL_ADDRESS"]
        assert second["LORA_S3_ENDPOINT_URL"] == dev.env["LORA_S3_ENDPOINT_URL"]
        out = dev.process.stop(timeout_s=30)
        assert dev.process.proc.returncode == 0, out
