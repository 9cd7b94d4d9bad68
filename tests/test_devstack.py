"""`loratrain dev` as a user runs it: found from any directory, one per state dir, and a child
that crashes is restarted while runs go on, on the GPU they have."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.providers.local import LocalProvider
from activities.providers.procfs import start_ticks
from common.s3 import s3_client
from common.settings import Settings
from common.temporal import connect_client
from devstack.stack import (
    DevStack,
    LocalS3Ports,
    PortsInUse,
    StoppedChild,
    read_dev_env,
)
from workflows.models import RunStatus, RunStatusName
from workflows.training import TrainingWorkflow

from .fake_civitai import checkpoint_bytes
from .images import encoded
from .processes import Captured
from .test_cli import dev_pids, group_members, stack_env, wait_until

ROOT = Path(__file__).resolve().parent.parent
# The worker's and relay's log lines start with a UTC time to the millisecond and a level.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
STANDIN = ROOT / "tests" / "sd_scripts_standin"


def runner_env(tmp_path: Path, step_s: float) -> dict[str, str]:
    """The runner with the sd-scripts stand-in (README "To see a whole run on a laptop"); each
    training step takes `step_s`, so a run trains for a few seconds."""
    return {
        "PYTHONPATH": str(ROOT),
        "LORA_RUNNER_REQUIRE_GPU": "false",
        "LORA_RUNNER_SD_SCRIPTS_DIR": str(STANDIN),
        "LORA_RUNNER_ACCELERATE_COMMAND": json.dumps([sys.executable, str(STANDIN / "accelerate")]),
        "LORA_RUNNER_TOKENIZER_CACHE_DIR": str(tmp_path / "tokenizers"),
        "LORA_RUNNER_RETRY_INITIAL_S": "0.2",
        "LORA_RUNNER_RETRY_MAX_S": "1",
        "LORA_RUNNER_PROGRESS_INTERVAL_S": "1",
        "LORA_RUNNER_DISK_MARGIN_BYTES": "0",
        # The stand-in reads its pace from its environment, which the runner passes on.
        "LORA_LOCAL_RUNNER_COMMAND": json.dumps(
            ["env", f"STANDIN_STEP_S={step_s}", sys.executable, "-m", "gpu_runner"]
        ),
    }


@dataclass
class Dev:
    process: Captured
    state: Path
    started_in: Path

    def pids(self) -> dict[str, int]:
        return dev_pids(self.state)

    def stop(self) -> str:
        out = self.process.stop(signal.SIGINT, timeout_s=60)
        assert self.process.proc.returncode == 0, out
        return out


@contextlib.contextmanager
def running_dev(tmp_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[Dev]:
    """`loratrain dev` started in a directory of its own, its state in its own LORA_STATE_DIR,
    on free ports; returns once it says it is up. Killed, with its children, if still up."""
    started_in = tmp_path / "dev-cwd"
    started_in.mkdir(exist_ok=True)
    state = tmp_path / "state"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **stack_env(),
        **(extra_env or {}),
        "LORA_STATE_DIR": str(state),
    }
    process = Captured([sys.executable, "-m", "cli", "dev"], cwd=started_in, env=env)
    dev = Dev(process, state, started_in)
    try:
        process.wait_for_line("loratrain dev is up", timeout_s=180)
        yield dev
    finally:
        if process.proc.poll() is None:
            # Stopped as a user stops it, so it also gives its local GPUs back.
            try:
                process.stop(signal.SIGINT, timeout_s=60)
            except subprocess.TimeoutExpired:
                process.kill()
        with contextlib.suppress(OSError, ValueError):
            for pgid in dev.pids().values():  # left by a `dev` that was killed
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        provider = LocalProvider(Settings(state_dir=state))
        for instance in provider.list_instances():
            provider.destroy(instance.instance_id)


def loratrain(args: list[str], cwd: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """A command as a user types it elsewhere: only LORA_STATE_DIR says where the stack is
    (nothing about its ports; a user with the default state dir would not even set that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    env.update({"PYTHONPATH": str(ROOT), "LORA_STATE_DIR": str(state)})
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def client_of(state: Path) -> AsyncIterator[Client]:
    """The project's Temporal client for the stack whose state is in `state` (its dev.env)."""
    yield await connect_client(Settings(state_dir=state))


async def wait_for_training(client: Client, run_id: str, timeout_s: float) -> None:
    handle = client.get_workflow_handle_for(TrainingWorkflow.run, run_id)
    deadline = time.monotonic() + timeout_s
    while True:
        status = await handle.query(TrainingWorkflow.status)
        if status.status == RunStatusName.TRAINING:
            return
        assert not status.status.terminal, status
        assert time.monotonic() < deadline, f"still {status.status} after {timeout_s} s"
        await asyncio.sleep(0.2)


def start_run(tmp_path: Path, elsewhere: Path, state: Path, run_id: str) -> None:
    """`loratrain train` of a local folder, from a directory other than the stack's."""
    images = elsewhere / "cats"
    images.mkdir()
    for i in range(2):
        (images / f"cat{i}.png").write_bytes(encoded("PNG", seed=i))
        (images / f"cat{i}.txt").write_text("a photo of sks cat")
    model = tmp_path / "base-sd15.safetensors"
    model.write_bytes(checkpoint_bytes("sd15"))
    train = ["train", "cats", "--model", str(model), "--epochs", "2", "--run-id", run_id]
    started = loratrain(train, elsewhere, state)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"started run {run_id}" in started.stdout


# ------------------------------------------------------------------------------------------------


def test_every_port_of_the_local_s3_server_is_checked_before_anything_starts(
    tmp_path: Path,
) -> None:
    """SeaweedFS opens ten ports; one of them taken (here its volume server's gRPC port, by
    another program or another stack) is named, and nothing starts."""
    env = stack_env()
    settings = Settings(
        state_dir=tmp_path / "state",
        temporal_address=env["LORA_TEMPORAL_ADDRESS"],
        temporal_ui_url=env["LORA_TEMPORAL_UI_URL"],
        s3_endpoint_url=env["LORA_S3_ENDPOINT_URL"],
        local_s3_internal_port=int(env["LORA_LOCAL_S3_INTERNAL_PORT"]),
        relay_port=int(env["LORA_RELAY_PORT"]),
    )
    stack = DevStack(settings)
    s3_ports = {
        port
        for _, port in LocalS3Ports(
            stack.local_s3.port, stack.settings.local_s3_internal_port
        ).named()
    }
    assert s3_ports <= {e.port for e in stack.endpoints}
    assert len(s3_ports) == 10

    volume_grpc = int(env["LORA_LOCAL_S3_INTERNAL_PORT"]) + 1 + 10000
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", volume_grpc))
        taken.listen()
        with pytest.raises(PortsInUse) as refused:
            stack.start()
    assert str(refused.value) == (
        f"port {volume_grpc} (local S3 volume gRPC) is already in use: "
        "is another `loratrain dev` running?"
    )
    assert not (tmp_path / "state").exists()


def running_members(pgids: set[int]) -> list[str]:
    """`group_members` less zombies: an orphan's new parent may never reap it (PID 1 of some
    machines does not), and a zombie holds no port, memory or file."""
    running = []
    for member in group_members(pgids):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{member.split()[0]}/stat").read_text()
            if stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X"):
                running.append(member)
    return running


def user_env(state: Path) -> dict[str, str]:
    """A user's environment: nothing but the state dir says where the stack is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    return {**env, "PYTHONPATH": str(ROOT), "LORA_STATE_DIR": str(state)}


def test_after_dev_itself_is_killed_the_next_dev_stops_what_it_left_running_and_starts(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_dev(tmp_path) as dev:
        children = dev.pids()
        addresses = read_dev_env(dev.state / "dev.env")
        # While that `dev` runs, another is refused and touches none of its children.
        refused = loratrain(["dev"], elsewhere, dev.state)
        assert refused.returncode == 1
        assert f"`loratrain dev` is already running (pid {dev.process.proc.pid})" in (
            refused.stderr
        )
        assert dev.pids() == children
        assert len(running_members(set(children.values()))) >= len(children)

        dev.process.kill()  # dev alone: its children live in groups of their own
        assert running_members(set(children.values())), "its children should still run"

        # Its dev.env says where that stack listened: this one takes the same ports.
        again = Captured(
            [sys.executable, "-m", "cli", "dev"], cwd=elsewhere, env=user_env(dev.state)
        )
        try:
            again.wait_for_line("loratrain dev is up", timeout_s=180)
            stopped = ", ".join(f"{name} pid {pid}" for name, pid in children.items())
            assert (
                f"an earlier `loratrain dev` with state in {dev.state} ended without stopping "
                f"its children; stopped them: {stopped}"
            ) in again.output, again.output
            assert running_members(set(children.values())) == [], "the old children are gone"
            now = dev.pids()
            assert set(now) == set(children) and not set(now.values()) & set(children.values())
            assert running_members(set(now.values())), "the new children run"
            assert read_dev_env(dev.state / "dev.env") == addresses  # the same state and ports

            out = again.stop(signal.SIGINT, timeout_s=60)
            assert again.proc.returncode == 0, out
            assert running_members(set(now.values()) | set(children.values())) == []
        finally:
            if again.proc.poll() is None:
                again.kill()
            with contextlib.suppress(OSError, ValueError):
                for pgid in dev.pids().values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)


def test_only_the_processes_a_killed_dev_recorded_are_stopped(tmp_path: Path) -> None:
    """dev.pids names each child by pid and start time: a pid that another process has taken
    since is left alone; a child that ignores SIGTERM gets SIGKILL after the grace."""
    state = tmp_path / "state"
    state.mkdir()
    program = (
        "import signal, sys, time\n"
        "if sys.argv[1] == 'ignores SIGTERM':\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\n"
        "time.sleep(3600)\n"
    )
    behaviour = {"worker": "stops", "local S3": "ignores SIGTERM", "stranger": "stops"}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", program, how], stdout=subprocess.PIPE, start_new_session=True
        )
        for name, how in behaviour.items()
    }
    try:
        for process in processes.values():
            assert process.stdout is not None and process.stdout.readline() == b"up\n"
        recorded = {
            name: {"pid": p.pid, "pgid": p.pid, "start_ticks": start_ticks(p.pid)}
            for name, p in processes.items()
        }
        # The relay the file names is gone and its pid is the stranger's now, which started later.
        relay = recorded.pop("stranger")
        relay["start_ticks"] = int(relay["start_ticks"] or 0) - 1
        (state / "dev.pids").write_text(json.dumps({**recorded, "relay": relay}))

        stopped = DevStack(Settings(state_dir=state), grace_s=1.0).stop_leftovers()

        assert stopped == [
            StoppedChild("worker", processes["worker"].pid, killed=False),
            StoppedChild("local S3", processes["local S3"].pid, killed=True),
        ]
        assert processes["worker"].wait(timeout=10) == -signal.SIGTERM
        assert processes["local S3"].wait(timeout=10) == -signal.SIGKILL
        assert processes["stranger"].poll() is None, "another process's pid is never signalled"
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("service", "then_restart_the_stack"),
    [("worker", True), ("relay", False)],
    ids=["worker, then the whole stack", "relay"],
)
async def test_a_killed_service_is_restarted_and_the_run_completes_on_its_first_gpu(
    tmp_path: Path, service: str, then_restart_the_stack: bool
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_dev(tmp_path, runner_env(tmp_path, step_s=0.15)) as dev:
        run_id = f"supervised-{service}"
        # From another directory, with nothing but the state dir to go on (a user with the
        # default one would not even set that), commands find the stack.
        await asyncio.to_thread(start_run, tmp_path, elsewhere, dev.state, run_id)
        # A second stack on the same state is refused, naming the one that runs.
        second = await asyncio.to_thread(loratrain, ["dev"], elsewhere, dev.state)
        assert second.returncode == 1
        assert (
            f"`loratrain dev` is already running (pid {dev.process.proc.pid}) "
            f"with state in {dev.state}" in second.stderr
        )
        assert "kill --" not in second.stderr  # the healthy stack is not to be killed
        async with client_of(dev.state) as client:
            await wait_for_training(client, run_id, timeout_s=90)
            before = dev.pids()

            os.killpg(before[service], signal.SIGKILL)

            await asyncio.to_thread(
                wait_until,
                lambda: dev.pids()[service] != before[service],
                f"{service} restart",
                dev.process,
            )
            after = dev.pids()
            assert {k: v for k, v in after.items() if k != service} == {
                k: v for k, v in before.items() if k != service
            }, "the other children keep running"
            handle = client.get_workflow_handle_for(TrainingWorkflow.run, run_id)
            final = await asyncio.wait_for(handle.result(), timeout=120)

        assert final.status == RunStatusName.COMPLETED, final.error
        assert final.attempt == 1, final.gpu_failures
        assert len(list((dev.state / "instances").iterdir())) == 1, "one GPU for the whole run"
        out = await asyncio.to_thread(dev.stop)
        assert f"{service} exited unexpectedly (killed by SIGKILL); restarting it in 1 s" in out
        assert f"{service} restarted (pid {after[service]}, restart 1)" in out
        assert group_members(set(after.values())) == []
        check_service_logs(dev.state, run_id)

    if then_restart_the_stack:
        await check_the_model_survives_a_restart(tmp_path, run_id, final)


async def check_the_model_survives_a_restart(tmp_path: Path, run_id: str, final: RunStatus) -> None:
    """Stopped and started again (other ports, same state), the stack still has the run and the
    model it points at, byte for byte."""
    assert final.result is not None
    with running_dev(tmp_path) as dev:
        settings = Settings(state_dir=dev.state)
        async with client_of(dev.state) as client:
            handle = client.get_workflow_handle_for(TrainingWorkflow.run, run_id)
            assert await handle.result() == final
        location = final.result.location
        s3 = s3_client(settings)
        model = s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
        assert hashlib.sha256(model).hexdigest() == final.result.sha256
        # And the user gets it as a user would, from another directory.
        elsewhere = tmp_path / "after-restart"
        elsewhere.mkdir()
        fetched = await asyncio.to_thread(loratrain, ["download", run_id], elsewhere, dev.state)
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        downloaded = Path(fetched.stdout.strip())
        assert downloaded.parent == elsewhere / "outputs"
        body = await asyncio.to_thread(downloaded.read_bytes)
        assert hashlib.sha256(body).hexdigest() == final.result.sha256
        await asyncio.to_thread(dev.stop)


def check_service_logs(state: Path, run_id: str) -> None:
    """Timestamped, levelled lines; the relay's INFO line for each delivered event; no secret."""
    relay = (state / "logs" / "relay.log").read_text()
    delivered = re.findall(
        rf"^{STAMP} INFO loratrain\.relay: delivered run={run_id} attempt=1 seq=(\d+) "
        r"type=([a-z.]+) latency_ms=\d+ age_ms=-?\d+$",
        relay,
        re.MULTILINE,
    )
    types = {t for _, t in delivered}
    assert {"gpu.ready", "files.ready", "model.uploaded"} <= types, relay[-3000:]
    worker = (state / "logs" / "worker.log").read_text()
    assert re.search(rf"^{STAMP} INFO loratrain\.worker: worker polling", worker, re.MULTILINE)
    secrets = read_dev_env(state / "dev.env")
    for name in ("LORA_CODEC_KEY", "LORA_WEBHOOK_MASTER_SECRET", "LORA_S3_SECRET_ACCESS_KEY"):
        for log in (state / "logs").iterdir():
            assert secrets[name] not in log.read_text(), f"{name} in {log.name}"


# ------------------------------------------------------------------------------------------------
# Where the state is
# ------------------------------------------------------------------------------------------------


def test_the_state_dir_is_per_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORA_STATE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert Settings().state_dir == tmp_path / "home" / ".local" / "state" / "loratrain"

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert Settings().state_dir == tmp_path / "xdg" / "loratrain"

    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # the XDG spec: ignore it
    assert Settings().state_dir == tmp_path / "home" / ".local" / "state" / "loratrain"

    monkeypatch.setenv("LORA_STATE_DIR", str(tmp_path / "mine"))
    assert Settings().state_dir == tmp_path / "mine"


def test_settings_read_the_dev_env_of_their_state_dir_wherever_they_are_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "dev.env").write_text(
        'LORA_TEMPORAL_ADDRESS="127.0.0.1:17233"\nLORA_BUCKET="from-dev-env"\n'
    )
    monkeypatch.chdir(tmp_path)  # not where the file is
    monkeypatch.setenv("LORA_STATE_DIR", str(state))
    monkeypatch.setenv("LORA_BUCKET", "from-the-environment")

    settings = Settings()
    assert settings.temporal_address == "127.0.0.1:17233"
    assert settings.bucket == "from-the-environment"  # the environment wins over the file

    monkeypatch.setenv("LORA_STATE_DIR", str(tmp_path / "elsewhere"))
    assert Settings().temporal_address == "127.0.0.1:7233"
    assert Settings(state_dir=state).temporal_address == "127.0.0.1:17233"
    # An explicit `_env_file` replaces it (None: no file at all).
    monkeypatch.setenv("LORA_STATE_DIR", str(state))
    assert Settings(_env_file=None).temporal_address == "127.0.0.1:7233"


def test_a_child_that_keeps_failing_is_restarted_with_a_growing_backoff(tmp_path: Path) -> None:
    """Each exit gets a line with the reason and the log's last line; the waits double."""
    stack = DevStack(Settings(state_dir=tmp_path / "state"))
    stack.logs_dir.mkdir(parents=True)
    failing = "print('error: LORA_CODEC_KEY is not set', flush=True); raise SystemExit(3)"
    stack._launch("worker", [sys.executable, "-c", failing], env=dict(os.environ))
    reports: list[str] = []
    supervisor = threading.Thread(target=stack.supervise, args=(reports.append,))
    supervisor.start()
    try:
        deadline = time.monotonic() + 20
        while sum("restarted" in r for r in reports) < 2:
            assert time.monotonic() < deadline, reports
            time.sleep(0.05)
    finally:
        stack.request_stop()
        supervisor.join()
        stack.stop()

    log = stack.logs_dir / "worker.log"
    for wait_s, exited in ((1, reports[0]), (2, reports[2])):
        assert exited == (
            f"worker exited unexpectedly (exit code 3); restarting it in {wait_s} s. Its log is "
            f"{log}, which ends: error: LORA_CODEC_KEY is not set"
        )
    assert re.fullmatch(r"worker restarted \(pid \d+, restart 1\)", reports[1])
    assert re.fullmatch(r"worker restarted \(pid \d+, restart 2\)", reports[3])
