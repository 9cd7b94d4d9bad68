"""The local GPU provider: runs the GPU runner as a child process on this machine (dev and demo).

Each instance is a directory under `settings.instances_dir` named after its id:

    instance.json   label, pid, process start time, created_at (written once per start)
    exit.json       exit code, once this worker saw the process end
    destroyed.json  present once the instance was destroyed
    runner.log      the runner's stdout and stderr
    work/           the runner's working directory (LORA_RUNNER_WORKDIR) unless configured;
                    removed when the instance is destroyed

Everything `find`, `get`, `destroy` and `list_instances` need is on disk, so a restarted worker
still manages the instances an earlier one started. The process start time (field 22 of
/proc/<pid>/stat) guards every pid against reuse.

Destroying an instance ends every process of it, as destroying a container does on Vast. The
runner starts its trainer in a session of its own (so that it can stop all of the trainer), out
of reach of the runner's process group; so every process of an instance carries the variable
LORATRAIN_LOCAL_INSTANCE=<instance directory> in its environment (children inherit it, whatever
their session or parent), and destroy finds them all in /proc/<pid>/environ.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from common.settings import Settings
from workflows.models import GpuRequirements

from .base import Instance
from .procfs import ProcStat, group_members, read_stat

PROVIDER_NAME = "local"
RECORD_FILE = "instance.json"
EXIT_FILE = "exit.json"
DESTROYED_FILE = "destroyed.json"
LOG_FILE = "runner.log"
LOCK_FILE = ".lock"
WORK_DIR = "work"

# Only these reach the runner from the worker's environment: enough to find Python and its
# packages, nothing secret. LORA_RUNNER_* variables pass too, so tests and dev can configure it.
INHERITED_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
RUNNER_ENV_PREFIX = "LORA_RUNNER_"

# Marks every process of an instance (see the module docstring). Not LORA_-prefixed: it is no
# setting, and the runner keeps LORA_ variables from its trainer.
INSTANCE_MARKER_ENV = "LORATRAIN_LOCAL_INSTANCE"

LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 8 * 1024
# SIGTERM to SIGKILL. The runner needs, after a SIGTERM, its trainer's grace
# (runner_trainer_stop_grace_s, 5 s) and the flush of its last events (TERMINATE_FLUSH_S, 8 s):
# waiting longer lets it stop a hung trainer itself and say so (tests/test_gpu_local.py checks).
STOP_TIMEOUT_S = 20.0
KILL_TIMEOUT_S = 5.0
_POLL_S = 0.05

_INSTANCE_ID = re.compile(r"^local-[0-9a-f]{16}$")
# The checkout that holds `gpu_runner`: the runner's cwd is its instance directory, so an
# uninstalled checkout must be on its PYTHONPATH for `python -m gpu_runner` to import.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


class _Record(BaseModel):
    label: str
    pid: int
    start_ticks: int
    created_at: datetime


class _Exit(BaseModel):
    pid: int
    exit_code: int


def _same_process(record: _Record) -> ProcStat | None:
    """The stat of the record's process while it runs (not a zombie, not a reused pid)."""
    stat = read_stat(record.pid)
    if stat is None or stat.start_ticks != record.start_ticks or not stat.running:
        return None
    return stat


def _group_members(record: _Record) -> list[int]:
    """Running processes of the runner's process group (its session, started after it)."""
    return group_members(record.pid, record.start_ticks)


def _marked_processes(marker: bytes) -> dict[int, int]:
    """pid -> start ticks of every running process whose environment holds `marker` (a whole
    NAME=value entry). Processes of other users cannot be read, and cannot be ours."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker not in environ.split(b"\0"):
            continue
        stat = read_stat(int(entry.name))
        if stat is not None and stat.running:
            found[int(entry.name)] = stat.start_ticks
    return found


def _signal(pid: int, start_ticks: int, sig: signal.Signals) -> None:
    """Signal pid if it is still the process seen (same start time), not one that reused it."""
    stat = read_stat(pid)
    if stat is not None and stat.start_ticks == start_ticks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _log_tail(path: Path) -> list[str]:
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            data = log.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _write_json(path: Path, model: BaseModel) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model.model_dump_json())
    os.replace(tmp, path)


def local_instance_id(label: str) -> str:
    """Deterministic, so a retried allocation finds the instance it may already have started."""
    return "local-" + hashlib.sha256(label.encode("utf-8")).hexdigest()[:16]


class LocalProvider:
    """Starts `settings.local_runner_command` as a child process in its own process group."""

    name = PROVIDER_NAME

    def __init__(self, settings: Settings, *, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.settings = settings
        self.stop_timeout_s = stop_timeout_s
        # Only to reap the children this worker started; the state of record is on disk.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # Instance id -> label, read once: the id is a hash of the label, so it never changes.
        self._labels: dict[str, str] = {}
        self._children_lock = threading.Lock()

    # -- GpuProvider -------------------------------------------------------------------------

    def find(self, label: str) -> Instance | None:
        instance_id = local_instance_id(label)
        record = self._record(instance_id)
        if record is None or record.label != label or self._destroyed(instance_id):
            return None
        return self._describe(instance_id, record)

    def create(
        self,
        label: str,
        job_url: str,
        requirements: GpuRequirements,
        *,
        exclude_machine_ids: Sequence[str] = (),
        download_bytes: int = 0,
    ) -> Instance:
        """Start the runner; requirements, exclusions and sizes are ignored (this machine is the
        only offer)."""
        instance_id = local_instance_id(label)
        directory = self._directory(instance_id)
        directory.mkdir(parents=True, exist_ok=True)
        with self._locked(directory):
            record = self._record(instance_id)
            if record is not None and record.label == label and not self._destroyed(instance_id):
                # Started by a concurrent or earlier attempt of the same allocation.
                return self._describe(instance_id, record)
            # Reusing the directory of a destroyed instance: forget its end before starting anew.
            for name in (DESTROYED_FILE, EXIT_FILE):
                (directory / name).unlink(missing_ok=True)
            record = self._start(instance_id, label, job_url)
        return self._describe(instance_id, record)

    def get(self, instance_id: str) -> Instance | None:
        record = self._record(instance_id)
        return None if record is None else self._describe(instance_id, record)

    def destroy(self, instance_id: str) -> bool:
        if self._record(instance_id) is None:
            return False
        directory = self._directory(instance_id)
        with self._locked(directory):
            record = self._record(instance_id)
            if record is None or self._destroyed(instance_id):
                return False
            self._stop(instance_id, record)
            (directory / DESTROYED_FILE).write_text(
                json.dumps({"pid": record.pid, "destroyed_at": datetime.now(UTC).isoformat()})
            )
            # The runner's copies of the dataset and the base model (often GBs) go with the
            # instance, as on a rented GPU; instance.json and runner.log stay for diagnosis.
            shutil.rmtree(directory / WORK_DIR, ignore_errors=True)
        return True

    def list_instances(self, label_prefix: str = "") -> list[Instance]:
        root = self.settings.instances_dir
        if not root.is_dir():
            return []
        instances = []
        for instance_id in sorted(os.listdir(root)):  # names: sorting paths costs far more
            label = self._label(instance_id)
            if label is None or not label.startswith(label_prefix):
                continue
            record = self._record(instance_id)
            if record is not None and not self._destroyed(instance_id):
                instances.append(self._describe(instance_id, record))
        return instances

    # -- internals ---------------------------------------------------------------------------

    def _directory(self, instance_id: str) -> Path:
        return self.settings.instances_dir / instance_id

    def _record(self, instance_id: str) -> _Record | None:
        # The id comes from workflow input: never let it name a path outside instances_dir.
        if not _INSTANCE_ID.fullmatch(instance_id):
            return None
        try:
            text = (self._directory(instance_id) / RECORD_FILE).read_text()
        except FileNotFoundError:
            return None
        return _Record.model_validate_json(text)

    def _label(self, instance_id: str) -> str | None:
        label = self._labels.get(instance_id)
        if label is None:
            record = self._record(instance_id)
            if record is None:
                return None
            label = self._labels[instance_id] = record.label
        return label

    def _destroyed(self, instance_id: str) -> bool:
        return (self._directory(instance_id) / DESTROYED_FILE).exists()

    def _exit_code(self, instance_id: str, record: _Record) -> int | None:
        try:
            ended = _Exit.model_validate_json(
                (self._directory(instance_id) / EXIT_FILE).read_text()
            )
        except FileNotFoundError:
            return None
        # An exit file of an earlier process in this directory says nothing about this one.
        return ended.exit_code if ended.pid == record.pid else None

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        """Serialize create/destroy of one instance across threads and worker processes."""
        with (directory / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _runner_env(self, directory: Path, job_url: str) -> dict[str, str]:
        """The runner's environment: what it needs, none of the worker's secrets."""
        # Reading os.environ here (not through Settings) is deliberate: this builds the child's
        # environment, and only the names below pass (no master secret, codec key, AWS keys).
        parent = os.environ
        env = {name: parent[name] for name in INHERITED_ENV if name in parent}
        env.setdefault("PATH", os.defpath)
        if (_SOURCE_ROOT / "gpu_runner" / "__init__.py").is_file():
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([*paths, str(_SOURCE_ROOT)])
        env.update({k: v for k, v in parent.items() if k.startswith(RUNNER_ENV_PREFIX)})
        # Each instance works in its own directory unless the worker configures one.
        env.setdefault("LORA_RUNNER_WORKDIR", str((directory / WORK_DIR).resolve()))
        env["LORA_JOB_URL"] = job_url
        env[INSTANCE_MARKER_ENV] = self._marker_value(directory)
        return env

    @staticmethod
    def _marker_value(directory: Path) -> str:
        # The directory, not the id: the id is a hash of the label, and two workers with their
        # own instances directories (two dev stacks, parallel tests) may run the same label.
        return str(directory.resolve())

    def _marker(self, instance_id: str) -> bytes:
        value = self._marker_value(self._directory(instance_id))
        return f"{INSTANCE_MARKER_ENV}={value}".encode()

    def _start(self, instance_id: str, label: str, job_url: str) -> _Record:
        directory = self._directory(instance_id)
        with (directory / LOG_FILE).open("ab") as log:
            process = subprocess.Popen(
                self.settings.local_runner_command,
                cwd=directory,
                env=self._runner_env(directory, job_url),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so destroy reaches everything the runner starts.
                start_new_session=True,
            )
        with self._children_lock:
            self._children[instance_id] = process
        # Not reaped yet (only poll() does that), so /proc still has it even if it already ended.
        stat = read_stat(process.pid)
        record = _Record(
            label=label,
            pid=process.pid,
            start_ticks=stat.start_ticks if stat else -1,
            created_at=datetime.now(UTC),
        )
        _write_json(directory / RECORD_FILE, record)
        return record

    def _reap(self, instance_id: str) -> None:
        """Collect the instance's runner if this worker started it and it ended, keeping its
        exit code on disk. One instance at a time: a check must not cost more with more runs."""
        with self._children_lock:
            process = self._children.get(instance_id)
            if process is None:
                return
            code = process.poll()
            if code is None:
                return
            del self._children[instance_id]
            directory = self._directory(instance_id)
            if directory.is_dir():
                _write_json(directory / EXIT_FILE, _Exit(pid=process.pid, exit_code=code))

    def _describe(self, instance_id: str, record: _Record) -> Instance:
        instance = Instance(
            provider=PROVIDER_NAME,
            instance_id=instance_id,
            label=record.label,
            state="running",
            gpu_name="local",
            dollars_per_hour=0.0,
        )
        if self._destroyed(instance_id):
            return instance.model_copy(update={"state": "gone", "message": "destroyed"})
        if _same_process(record) is not None:
            return instance
        # Reaped once seen ended (a zombie reads as ended), so its exit code is on disk.
        self._reap(instance_id)
        code = self._exit_code(instance_id, record)
        if code is None:
            ended = "runner exited (exit code unknown: another worker process started it)"
        elif code < 0:
            ended = f"runner was killed by {_signal_name(-code)}"
        else:
            ended = f"runner exited with code {code}"
        tail = _log_tail(self._directory(instance_id) / LOG_FILE)
        if tail:
            ended += "; last lines of runner.log:\n" + "\n".join(tail)
        return instance.model_copy(update={"state": "exited", "message": ended})

    def _stop(self, instance_id: str, record: _Record) -> None:
        """End every process of the instance: SIGTERM, then SIGKILL what is left after the timeout.

        SIGTERM goes to the runner's process group: the runner stops its trainer (in a session
        of its own) and reports. A process of the instance that outlives the runner has no one
        to stop it, so it gets the SIGTERM itself; SIGKILL reaches every one of them.
        """
        marker = self._marker(instance_id)
        deadline = time.monotonic() + self.stop_timeout_s
        with contextlib.suppress(ProcessLookupError):
            if self._group_running(instance_id, record):
                os.killpg(record.pid, signal.SIGTERM)
        orphans_told: set[int] = set()
        while True:
            marked = _marked_processes(marker)
            group = self._group_running(instance_id, record)
            if not group and not marked:
                break
            if time.monotonic() >= deadline:
                self._kill(instance_id, record, marker)
                break
            if _same_process(record) is None:
                for pid, start_ticks in marked.items():
                    if pid not in orphans_told:
                        _signal(pid, start_ticks, signal.SIGTERM)
                        orphans_told.add(pid)
            time.sleep(_POLL_S)
        self._reap(instance_id)

    def _kill(self, instance_id: str, record: _Record, marker: bytes) -> None:
        """SIGKILL the runner's group and every marked process until none runs (or a timeout)."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while time.monotonic() < deadline:
            marked = _marked_processes(marker)
            group = self._group_running(instance_id, record)
            if not group and not marked:
                return
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pid, signal.SIGKILL)
            for pid, start_ticks in marked.items():
                _signal(pid, start_ticks, signal.SIGKILL)
            time.sleep(_POLL_S)

    def _group_running(self, instance_id: str, record: _Record) -> bool:
        """Whether any process of the runner's group still runs. The runner, this worker's
        child, is reaped first; a group with no process at all is seen without reading /proc
        (each read of it costs more the more runners there are)."""
        self._reap(instance_id)
        try:
            os.killpg(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # a process of another user has the id: _group_members tells
        if _same_process(record) is not None:
            return True  # the runner itself
        return bool(_group_members(record))
