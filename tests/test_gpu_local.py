"""The local GPU provider and the GPU activities, with real child processes (a tiny fake runner)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.gpu import AllocateGpuInput, GpuActivities, InstanceRef, RunRef
from activities.providers.base import Instance, NoOfferError, instance_label
from activities.providers.local import LocalProvider, local_instance_id
from worker.settings import Settings
from workflows.models import GpuRequirements

JOB_URL = "http://127.0.0.1:9/runs/run-1/job.json?X-Amz-Signature=secret"

# One fake runner, its behaviour chosen by its first argument. It never outlives 60 s.
FAKE_RUNNER = """
import json, os, signal, subprocess, sys, time

def write(name, text):
    with open(name + ".tmp", "w") as f:
        f.write(text)
    os.replace(name + ".tmp", name)

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
