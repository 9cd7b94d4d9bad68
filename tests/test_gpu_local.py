"""The local GPU provider and the GPU activities, with real child processes (a tiny fake runner)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from activities import gpu
from activities.gpu import AllocateGpuInput, GpuActivities, InstanceRef, RunRef
from activities.providers.base import Instance, NoOfferError, instance_label
from activities.providers.local import STOP_TIMEOUT_S, LocalProvider, local_instance_id
from common.settings import Settings
from gpu_runner.protocol import TrainingConfig
from gpu_runner.runner import TERMINATE_FLUSH_S
from gpu_runner.settings import RunnerSettings
from tests.http_support import serve_asgi
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, make_job
from workflows.models import GpuRequirements

STANDIN = Path(__file__).resolve().parent / "sd_scripts_standin"
JOB_URL = "http://127.0.0.1:9/runs/run-1/job.json?X-Amz-Signature=secret"

# One fake runner, its behaviour chosen by its first argument. It never outlives 60 s.
FAKE_RUNNER = """
import json, os, signal, subprocess, sys, time

def write(name, text):
    with open(name + ".tmp", "w") as f:
        f.write(text)
    os.replace(name + ".tmp", name)

HUNG_TRAINER = "import os, signal, time; os.kill(os.getpid(), signal.SIGSTOP); time.sleep(60)"

mode = sys.argv[1]
print("runner got job", os.environ.get("LORA_JOB_URL"), flush=True)
if mode == "env":
    write("env.json", json.dumps(dict(os.environ)))
elif mode == "grandchild":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write("grandchild.pid", str(child.pid))
elif mode == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write("ready", "")
elif mode == "fail":
    print("boom: CUDA out of memory", flush=True)
    sys.exit(3)
elif mode == "hung-trainer":
    # A trainer in its own session, as the runner starts sd-scripts, that hangs (stopped); the
    # runner dies of the SIGTERM without stopping it, as when killed before its grace ran out.
    trainer = subprocess.Popen(
        [sys.executable, "-c", HUNG_TRAINER, sys.argv[2]], start_new_session=True
    )
    write("trainer.pid", str(trainer.pid))
elif mode == "fail-when-told":
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
    print("told to stop", flush=True)
    sys.exit(3)
time.sleep(60)
"""


def wait_until(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


def wait_for_state(provider: LocalProvider, instance_id: str, state: str) -> Instance:
    def current() -> Instance | None:
        instance = provider.get(instance_id)
        return instance if instance is not None and instance.state == state else None

    found: Instance = wait_until(current)
    return found


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (index 0 is the state), or None when there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def is_running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def running_pids_with(marker: str) -> list[int]:
    """Running processes whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and is_running(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None


def exec_finished(pid: int) -> bool:
    return cmdline(pid) != "" or not is_running(pid)


def started_runners_with(marker: str) -> list[int]:
    """Every running process this test started (through a provider) that mentions `marker`.

    The provider's Popen makes each runner a child of this process from its fork on, and Popen
    returns only once the child exec'd; but right after the exec /proc/<pid>/cmdline can read
    empty for a moment. So each running child is waited for until its command line is readable,
    and none is missed however slow the machine is (a bare scan could miss one and pass).
    """
    me = os.getpid()
    children = [
        pid
        for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
        if (stat := proc_stat(pid)) is not None and int(stat[1]) == me and is_running(pid)
    ]
    for pid in children:
        wait_until(functools.partial(exec_finished, pid), 30)
    mine = {pid for pid in children if is_running(pid) and marker in (cmdline(pid) or "")}
    return sorted(mine | set(running_pids_with(marker)))


class Runners:
    """Builds providers whose runner is the fake above, and cleans up after them."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.script = tmp_path / "fake_runner.py"
        self.script.write_text(FAKE_RUNNER)
        self.providers: list[LocalProvider] = []

    def provider(self, *args: str, stop_timeout_s: float = 10.0) -> LocalProvider:
        command = [sys.executable, str(self.script), *args]
        provider = LocalProvider(
            self.settings.model_copy(update={"local_runner_command": command}),
            stop_timeout_s=stop_timeout_s,
        )
        self.providers.append(provider)
        return provider

    def activities(self, *args: str, stop_timeout_s: float = 10.0) -> GpuActivities:
        provider = self.provider(*args, stop_timeout_s=stop_timeout_s)
        return GpuActivities(provider, provider.settings)

    def close(self) -> None:
        for provider in self.providers:
            for instance in provider.list_instances():
                provider.destroy(instance.instance_id)
        for provider in self.providers:
            provider.list_instances()  # reaps the children each one started
        assert running_pids_with(str(self.script)) == [], "a fake runner outlived its test"


@pytest.fixture
def runners(settings: Settings, tmp_path: Path) -> Iterator[Runners]:
    made = Runners(settings, tmp_path)
    try:
        yield made
    finally:
        made.close()


def allocate(activities: GpuActivities, run_id: str = "run-1", attempt: int = 1) -> Instance:
    return ActivityEnvironment().run(
        activities.allocate_gpu,
        AllocateGpuInput(
            run_id=run_id, attempt=attempt, job_url=JOB_URL, requirements=GpuRequirements()
        ),
    )


def ref(instance_id: str, provider: str = "local") -> InstanceRef:
    return InstanceRef(run_id="run-1", provider=provider, instance_id=instance_id)


def record(settings: Settings, instance_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (settings.instances_dir / instance_id / "instance.json").read_text()
    )
    return data


def test_allocate_starts_the_runner_in_its_own_process_group(
    runners: Runners, settings: Settings
) -> None:
    activities = runners.activities("sleep")

    instance = allocate(activities)

    assert instance.provider == "local"
    label = instance_label(settings.deployment_name, "run-1", 1)
    assert instance.instance_id == local_instance_id(label)
    assert label == f"loratrain:{settings.deployment_name}:run-1:1"
    assert instance.label == label
    assert instance.state == "running"
    assert (instance.gpu_name, instance.dollars_per_hour) == ("local", 0.0)
    pid = record(settings, instance.instance_id)["pid"]
    stat = proc_stat(pid)
    assert stat is not None and stat[0] not in ("Z", "X")
    # Own process group and session: the group id and session id are the runner's pid.
    assert (int(stat[2]), int(stat[3])) == (pid, pid)
    assert os.getpgid(pid) != os.getpgrp()
    log = settings.instances_dir / instance.instance_id / "runner.log"
    wait_until(lambda: f"runner got job {JOB_URL}" in log.read_text())


def test_allocating_the_same_attempt_again_returns_the_same_instance(
    runners: Runners, settings: Settings
) -> None:
    activities = runners.activities("sleep")

    first = allocate(activities)
    again = allocate(activities)
    other_attempt = allocate(activities, attempt=2)

    assert again.instance_id == first.instance_id
    assert other_attempt.instance_id != first.instance_id
    assert len(started_runners_with(str(runners.script))) == 2


def test_concurrent_allocations_of_one_attempt_start_one_runner(runners: Runners) -> None:
    activities = runners.activities("sleep")

    with ThreadPoolExecutor(max_workers=4) as pool:
        instances = list(pool.map(lambda _: allocate(activities), range(4)))

    assert len({i.instance_id for i in instances}) == 1
    assert len(started_runners_with(str(runners.script))) == 1


def test_runner_env_has_the_job_url_but_none_of_the_worker_secrets(
    runners: Runners, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_WEBHOOK_MASTER_SECRET", "master-secret-value")
    monkeypatch.setenv("LORA_CODEC_KEY", "codec-key-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("LORA_RUNNER_REQUIRE_GPU", "false")
    activities = runners.activities("env")

    instance = allocate(activities)

    env_file = settings.instances_dir / instance.instance_id / "env.json"
    env = json.loads(wait_until(lambda: env_file.exists() and env_file.read_text()))
    assert env["LORA_JOB_URL"] == JOB_URL
    assert env["LORA_RUNNER_REQUIRE_GPU"] == "false"
    assert env["LORA_RUNNER_WORKDIR"] == str(
        (settings.instances_dir / instance.instance_id / "work").resolve()
    )
    for secret in ("LORA_WEBHOOK_MASTER_SECRET", "LORA_CODEC_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in env
    values = json.dumps(env)
    assert "master-secret-value" not in values and "codec-key-value" not in values
    allowed = {"PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV", "LORA_JOB_URL"}
    # What marks every process of the instance for destroy: its directory, nothing secret.
    assert env["LORATRAIN_LOCAL_INSTANCE"] == str(
        (settings.instances_dir / instance.instance_id).resolve()
    )
    allowed.add("LORATRAIN_LOCAL_INSTANCE")
    # Python itself may add LC_CTYPE when it coerces the C locale.
    extra = {k for k in env if k not in allowed and not k.startswith("LORA_RUNNER_")}
    assert extra <= {"LC_CTYPE"}


def test_the_runner_package_is_importable_from_the_instance_directory(
    runners: Runners, settings: Settings
) -> None:
    # The default command is `python -m gpu_runner`, run from the instance directory.
    provider = LocalProvider(
        settings.model_copy(
            update={"local_runner_command": [sys.executable, "-c", "import gpu_runner.protocol"]}
        )
    )
    runners.providers.append(provider)

    instance = provider.create("loratrain:run-1:1", JOB_URL, GpuRequirements())

    done = wait_for_state(provider, instance.instance_id, "exited")
    assert done.message is not None
    assert done.message.startswith("runner exited with code 0"), done.message


def test_destroy_kills_the_runner_and_everything_it_started(
    runners: Runners, settings: Settings
) -> None:
    activities = runners.activities("grandchild")
    instance = allocate(activities)
    pid_file = settings.instances_dir / instance.instance_id / "grandchild.pid"
    grandchild = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
    runner = record(settings, instance.instance_id)["pid"]
    assert is_running(runner) and is_running(grandchild)

    assert ActivityEnvironment().run(activities.deallocate_gpu, ref(instance.instance_id)) is True

    assert not is_running(runner)
    assert not is_running(grandchild)
    gone = activities.provider.get(instance.instance_id)
    assert gone is not None and gone.state == "gone"
    assert activities.provider.find(instance.label) is None
    assert activities.provider.list_instances() == []


def test_destroy_kills_a_runner_that_ignores_sigterm(runners: Runners, settings: Settings) -> None:
    provider = runners.provider("ignore-sigterm", stop_timeout_s=0.5)
    instance = provider.create("loratrain:run-1:1", JOB_URL, GpuRequirements())
    directory = settings.instances_dir / instance.instance_id
    wait_until((directory / "ready").exists)
    runner = record(settings, instance.instance_id)["pid"]

    assert provider.destroy(instance.instance_id) is True

    assert not is_running(runner)
    exit_code = json.loads((directory / "exit.json").read_text())["exit_code"]
    assert exit_code == -9  # SIGKILL: the SIGTERM was ignored


def test_destroy_kills_a_hung_trainer_that_left_the_runners_session(
    runners: Runners, settings: Settings, tmp_path: Path
) -> None:
    tag = f"hung-trainer-{tmp_path.name}"  # on the trainer's command line, to find a survivor
    provider = runners.provider("hung-trainer", tag, stop_timeout_s=0.5)
    instance = provider.create("loratrain:run-1:1", JOB_URL, GpuRequirements())
    pid_file = settings.instances_dir / instance.instance_id / "trainer.pid"
    trainer = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
    wait_until(lambda: (proc_stat(trainer) or ["gone"])[0] == "T")  # stopped: SIGTERM waits
    runner = record(settings, instance.instance_id)["pid"]
    assert os.getsid(trainer) == trainer != os.getsid(runner)
    try:
        assert provider.destroy(instance.instance_id) is True

        # destroy returns once nothing of the instance runs: the trainer went with the runner.
        assert not is_running(runner)
        assert running_pids_with(tag) == []
    finally:
        for pid in running_pids_with(tag):
            os.kill(pid, signal.SIGKILL)


def group_members(group: int) -> list[int]:
    """Running processes of a process group."""
    return [
        pid
        for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
        if (stat := proc_stat(pid)) is not None and int(stat[2]) == group and is_running(pid)
    ]


def test_destroy_lets_the_runner_stop_its_hung_sd_scripts_and_report(
    settings: Settings, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real runner and sd-scripts trainer (the stand-in), hung by SIGSTOP mid-training: the
    provider waits longer than the runner's grace for its trainer, so the runner kills the
    trainer itself, reports run.failed and exits on the SIGTERM, before any SIGKILL of its own."""
    grace_s = RunnerSettings.model_fields["runner_trainer_stop_grace_s"].default
    assert grace_s + TERMINATE_FLUSH_S < STOP_TIMEOUT_S
    relay = RecordingRelay(MASTER_SECRET)
    pids_file = tmp_path / "trainer.pids"
    runner_settings = {
        "REQUIRE_GPU": "false",
        "RETRY_INITIAL_S": "0.05",
        "RETRY_MAX_S": "0.2",
        "DISK_MARGIN_BYTES": "0",
        "SD_SCRIPTS_DIR": str(STANDIN),
        "ACCELERATE_COMMAND": json.dumps([sys.executable, str(STANDIN / "accelerate")]),
        "TOKENIZER_CACHE_DIR": str(tmp_path / "tokenizers"),
    }
    for name, value in runner_settings.items():
        monkeypatch.setenv(f"LORA_RUNNER_{name}", value)
    for name in ("LORA_RUNNER_TRAINER_FACTORY", "LORA_RUNNER_WORKDIR"):
        monkeypatch.delenv(name, raising=False)
    # The stand-in's switches reach it through the runner's command (the provider passes no
    # other variables); 150 steps of 0.2 s, so training is still going when it is stopped.
    command = ["env", "STANDIN_MODE=slow", f"STANDIN_PIDS_FILE={pids_file}"]
    provider = LocalProvider(
        settings.model_copy(
            update={"local_runner_command": [*command, sys.executable, "-m", "gpu_runner"]}
        )
    )
    trainer_group = None
    with serve_asgi(relay.app) as relay_url:
        job = make_job(
            s3,
            settings.bucket,
            lambda run_id: relay.events_url(relay_url, run_id),
            training=TrainingConfig(epochs=10, repeats=10),
        )
        instance = provider.create("loratrain:run-1:1", job.job_url, GpuRequirements())
        try:
            wait_until(lambda: pids_file.exists() and pids_file.read_text().endswith("\n"), 60)
            trainer, grandchild = (int(pid) for pid in pids_file.read_text().split())
            trainer_group = os.getpgid(trainer)  # accelerate leads it, in its own session
            runner = record(settings, instance.instance_id)["pid"]
            assert os.getsid(trainer) == trainer_group != runner
            os.killpg(trainer_group, signal.SIGSTOP)
            wait_until(lambda: (proc_stat(trainer) or ["gone"])[0] == "T")

            assert provider.destroy(instance.instance_id) is True

            assert group_members(trainer_group) == []
            assert not is_running(trainer) and not is_running(grandchild)
            assert not is_running(runner)
            exit_code = json.loads(
                (settings.instances_dir / instance.instance_id / "exit.json").read_text()
            )["exit_code"]
            assert exit_code == 128 + signal.SIGTERM, "the runner did not exit by itself"
            (failed,) = relay.of_type("run.failed")
            assert (failed.data["stage"], failed.data["code"]) == ("training", "terminated")
        finally:
            if trainer_group is not None and group_members(trainer_group):
                os.killpg(trainer_group, signal.SIGKILL)
            provider.destroy(instance.instance_id)


def test_deallocate_twice_and_deallocate_unknown_are_not_errors(runners: Runners) -> None:
    activities = runners.activities("sleep")
    instance = allocate(activities)
    env = ActivityEnvironment()

    assert env.run(activities.deallocate_gpu, ref(instance.instance_id)) is True
    assert env.run(activities.deallocate_gpu, ref(instance.instance_id)) is False
    assert env.run(activities.deallocate_gpu, ref("local-0123456789abcdef")) is False
    assert env.run(activities.deallocate_gpu, ref("../../../etc")) is False
    assert env.run(activities.deallocate_gpu, ref(instance.instance_id + "\n")) is False
    assert env.run(activities.get_gpu_instance, ref("local-0123456789abcdef")) is None


def test_release_run_gpus_destroys_every_attempt_of_that_run_only(
    runners: Runners, settings: Settings
) -> None:
    activities = runners.activities("sleep")
    first = allocate(activities, attempt=1)
    second = allocate(activities, attempt=2)
    other_run = allocate(activities, run_id="run-10")  # its id starts with the other's
    env = ActivityEnvironment()

    released = env.run(activities.release_run_gpus, RunRef(run_id="run-1"))

    assert sorted(released) == sorted([first.instance_id, second.instance_id])
    assert [i.instance_id for i in activities.provider.list_instances()] == [other_run.instance_id]
    assert started_runners_with(str(runners.script)) == [
        record(settings, other_run.instance_id)["pid"]
    ]
    assert env.run(activities.release_run_gpus, RunRef(run_id="run-1")) == []


def test_allocating_again_after_destroy_starts_a_new_runner(
    runners: Runners, settings: Settings
) -> None:
    activities = runners.activities("sleep")
    first = allocate(activities)
    first_pid = record(settings, first.instance_id)["pid"]
    assert activities.provider.destroy(first.instance_id)

    second = allocate(activities)

    assert second.instance_id == first.instance_id and second.state == "running"
    second_pid = record(settings, second.instance_id)["pid"]
    assert second_pid != first_pid and is_running(second_pid)
    assert started_runners_with(str(runners.script)) == [second_pid]


def test_a_restarted_worker_finds_gets_and_destroys_earlier_instances(
    runners: Runners, settings: Settings, tmp_path: Path
) -> None:
    before_restart = runners.activities("sleep")
    instance = allocate(before_restart)
    runner = record(settings, instance.instance_id)["pid"]

    after_restart = runners.activities("sleep")  # a new provider: nothing in memory
    found = after_restart.provider.find(instance.label)
    again = allocate(after_restart)
    current = ActivityEnvironment().run(after_restart.get_gpu_instance, ref(instance.instance_id))

    assert found is not None and found.instance_id == instance.instance_id
    assert again.instance_id == instance.instance_id
    assert current is not None and current.state == "running"
    assert [i.instance_id for i in after_restart.provider.list_instances()] == [
        instance.instance_id
    ]
    assert started_runners_with(str(runners.script)) == [runner]
    assert (
        ActivityEnvironment().run(after_restart.deallocate_gpu, ref(instance.instance_id)) is True
    )
    assert not is_running(runner)
    assert before_restart.provider.destroy(instance.instance_id) is False


def test_an_exited_runner_is_reported_with_its_exit_code_and_log(runners: Runners) -> None:
    activities = runners.activities("fail")
    instance = allocate(activities)

    exited = wait_for_state(runners.providers[0], instance.instance_id, "exited")

    assert exited.message is not None
    assert exited.message.startswith("runner exited with code 3")
    assert "boom: CUDA out of memory" in exited.message
    # Exited but not destroyed: a retried allocation returns it instead of starting another.
    assert allocate(activities).instance_id == instance.instance_id
    assert activities.provider.find(instance.label) is not None
    assert activities.provider.destroy(instance.instance_id) is True


def test_another_worker_sees_the_exit_even_before_the_parent_reaps_it(
    runners: Runners, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    parent = runners.provider("fail-when-told", str(go))
    other = runners.provider("fail-when-told", str(go))
    instance = parent.create("loratrain:run-1:1", JOB_URL, GpuRequirements())
    running = other.get(instance.instance_id)
    assert running is not None and running.state == "running"

    go.touch()

    # A zombie (ended, not yet reaped by `parent`) already counts as exited.
    exited = wait_for_state(other, instance.instance_id, "exited")
    assert exited.message is not None and "exit code unknown" in exited.message
    # Once the worker that started it reaps it, the exit code is on disk for everyone.
    parent.get(instance.instance_id)
    reaped = other.get(instance.instance_id)
    assert reaped is not None and reaped.message is not None
    assert reaped.message.startswith("runner exited with code 3")
    assert "told to stop" in reaped.message


def test_a_reused_pid_is_neither_reported_running_nor_killed(
    runners: Runners, settings: Settings
) -> None:
    # An instance whose runner ended long ago, and whose pid now belongs to another process
    # (same pid, later start time): the provider must leave that process alone.
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        stat = proc_stat(stranger.pid)
        assert stat is not None
        label = "loratrain:run-1:1"
        directory = settings.instances_dir / local_instance_id(label)
        directory.mkdir(parents=True)
        (directory / "instance.json").write_text(
            json.dumps(
                {
                    "label": label,
                    "pid": stranger.pid,
                    "start_ticks": int(stat[19]) - 1,
                    "created_at": "2025-01-01T00:00:00Z",
                }
            )
        )
        provider = runners.provider("sleep")

        instance = provider.find(label)
        assert instance is not None and instance.state == "exited"
        assert provider.destroy(instance.instance_id) is True

        assert stranger.poll() is None, "the provider killed a process that was not its runner"
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


class _NoOffers:
    """A provider with nothing to rent (the local provider always has its one machine)."""

    name = "local"

    def find(self, label: str) -> Instance | None:
        return None

    def create(
        self, label: str, job_url: str, requirements: GpuRequirements, **_: object
    ) -> Instance:
        raise NoOfferError("0 offers")

    def get(self, instance_id: str) -> Instance | None:
        return None

    def destroy(self, instance_id: str) -> bool:
        return False

    def list_instances(self, label_prefix: str = "") -> list[Instance]:
        return []


def test_no_offer_is_a_retryable_no_gpu_offer_error(settings: Settings) -> None:
    activities = GpuActivities(_NoOffers(), settings)

    with pytest.raises(ApplicationError) as raised:
        allocate(activities)

    assert raised.value.type == "NoGpuOffer"
    assert not raised.value.non_retryable
    assert "No local GPU offer matches" in raised.value.message
    assert "at least 16 GB VRAM" in raised.value.message
    assert JOB_URL not in raised.value.message


def test_an_instance_of_another_provider_is_refused(runners: Runners) -> None:
    activities = runners.activities("sleep")

    with pytest.raises(ApplicationError) as raised:
        ActivityEnvironment().run(activities.deallocate_gpu, ref("12345", provider="vast"))

    assert raised.value.type == "GpuProviderMismatch"
    assert not raised.value.non_retryable


def test_a_slow_create_heartbeats_while_it_runs(
    runners: Runners, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create that takes longer than the allocation's heartbeat timeout (Vast's slow creates
    and rate-limit waits) keeps the allocation alive: it is never mistaken for a dead worker
    and sent again elsewhere."""
    monkeypatch.setattr(gpu, "CREATE_HEARTBEAT_S", 0.05)
    provider = runners.provider()
    created = provider.create

    def slow_create(*args: Any, **kwargs: Any) -> Instance:
        time.sleep(0.5)
        return created(*args, **kwargs)

    monkeypatch.setattr(provider, "create", slow_create)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)

    instance = env.run(
        GpuActivities(provider, provider.settings).allocate_gpu,
        AllocateGpuInput(
            run_id="run-slow", attempt=1, job_url=JOB_URL, requirements=GpuRequirements()
        ),
    )

    assert instance.state != "gone"
    assert len(beats) >= 2, beats  # more than the one before the create


def test_a_cancel_during_a_slow_create_waits_for_it_and_then_cancels(
    runners: Runners, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocation is not abandoned mid-create (its instance would appear after the run's
    release looked): it heartbeats until the create is done, then ends cancelled, and the
    instance is there for the release to find by its label."""
    monkeypatch.setattr(gpu, "CREATE_HEARTBEAT_S", 0.05)
    provider = runners.provider()
    created = provider.create
    creating, finish = threading.Event(), threading.Event()

    def slow_create(*args: Any, **kwargs: Any) -> Instance:
        creating.set()
        assert finish.wait(30)
        return created(*args, **kwargs)

    monkeypatch.setattr(provider, "create", slow_create)
    env = ActivityEnvironment()
    with ThreadPoolExecutor(max_workers=1) as pool:
        allocating = pool.submit(
            env.run,
            GpuActivities(provider, provider.settings).allocate_gpu,
            AllocateGpuInput(
                run_id="run-cancelled", attempt=1, job_url=JOB_URL, requirements=GpuRequirements()
            ),
        )
        assert creating.wait(30)
        env.cancel()
        with pytest.raises(FutureTimeout):
            allocating.result(timeout=0.3)  # still waiting for the create, not cancelled
        finish.set()
        with pytest.raises(CancelledError):
            allocating.result(timeout=30)

    (instance,) = provider.list_instances()
    assert "run-cancelled" in instance.label
