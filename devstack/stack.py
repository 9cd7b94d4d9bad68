"""The embedded stack behind `loratrain dev`: Temporal's dev server, local S3, relay and worker.

Every piece is a child process in its own process group, logging under `<state_dir>/logs/`, so
stopping the stack can signal each group and nothing is left behind. While the stack runs, a
child that dies is started again in place (with backoff); the others, and open runs' GPUs, are
left alone. `DevStack` is shared by the `dev` and `demo` commands and by tests.

The local S3 server is SeaweedFS (`weed mini`): it keeps its data under `<state_dir>/s3/`, checks
signatures, presigned URLs' expiry and checksums like real S3. `local_s3_server` runs one for
tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from dotenv import dotenv_values
from pydantic import SecretStr
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from activities.providers.procfs import group_members, read_stat, start_ticks
from common.converter import new_codec_key
from common.settings import DEV_ENV_NAME, SEARCH_ATTRIBUTE, Settings

DEFAULT_LOCAL_S3_URL = "http://127.0.0.1:9000"
# Where the relay serves the codec endpoint that lets the Temporal UI decrypt payloads.
CODEC_PATH = "/codec"
# The running `dev`'s children: each one's pid (which is also its process group) and start
# time, so a later `dev` can stop what a killed one left running, and nothing else.
PIDS_NAME = "dev.pids"
# Held (flock) by the running `loratrain dev` and released by the kernel however it ends; holds
# its pid, so a second `dev` can say which one runs.
LOCK_NAME = "dev.lock"
S3_DATA_DIR = "s3"

# SeaweedFS puts each server's gRPC port at its HTTP port + 10000; its embedded maintenance
# worker assumes that offset for the admin server whatever -admin.port.grpc says, so every
# gRPC port is pinned there.
GRPC_OFFSET = 10000
MAX_LOCAL_S3_PORT = 65535 - GRPC_OFFSET
# A restarted child that then runs this long is healthy again: its next crash waits 1 s again.
RESTART_BACKOFF_INITIAL_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0

TEMPORAL = "Temporal"
TEMPORAL_UI = "Temporal UI"
LOCAL_S3 = "local S3"
RELAY = "relay"
WORKER = "worker"

# Stopped first, so they shut down while Temporal and S3 still answer.
_SERVICES = (WORKER, RELAY)


class DevStackError(Exception):
    """The stack cannot start or went down; the message says what to do."""


class PortsInUse(DevStackError):
    def __init__(
        self, busy: list[Endpoint], state_dir: Path, leftovers: dict[str, int] | None = None
    ) -> None:
        self.busy = busy
        lines = [
            f"port {e.port} ({e.name}) is already in use: is another `loratrain dev` running?"
            for e in busy
        ]
        if leftovers:
            running = ", ".join(f"{name} pid {pid}" for name, pid in leftovers.items())
            groups = " ".join(f"-{pid}" for pid in leftovers.values())
            lines.append(
                f"processes of an earlier `loratrain dev` with state in {state_dir} are still "
                f"running ({running}), but that `loratrain dev` itself is not; stop them with: "
                f"kill -- {groups}"
            )
        super().__init__("\n".join(lines))


class AlreadyRunning(DevStackError):
    def __init__(self, state_dir: Path, owner: dict[str, Any]) -> None:
        self.pid = owner.get("pid")
        where = f" (pid {self.pid})" if self.pid else ""
        ui = f"; its Temporal UI is {owner['temporal_ui']}" if owner.get("temporal_ui") else ""
        super().__init__(
            f"`loratrain dev` is already running{where} with state in {state_dir}{ui}. "
            "Use it from any directory; to run a second stack, give it its own LORA_STATE_DIR "
            "and ports."
        )


class ChildExited(DevStackError):
    def __init__(self, child: Child) -> None:
        self.child = child
        super().__init__(
            f"{child.name} exited unexpectedly with code {child.popen.returncode}; "
            f"its log is {child.log_path}"
        )


class StartInterrupted(DevStackError):
    """Stop was requested (Ctrl-C) while the stack was still starting."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    env: dict[str, str]
    started_at: float = field(default_factory=time.monotonic)
    # From /proc: with the pid, it names this process and no later one that reuses the pid.
    start_ticks: int | None = None
    restarts: int = 0
    # When a dead child is due to be started again (monotonic), while it waits out its backoff.
    restart_at: float | None = None
    backoff_s: float = RESTART_BACKOFF_INITIAL_S

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


def _host_port(name: str, host: str | None, port: int | None, default_port: int) -> Endpoint:
    host = (host or "127.0.0.1").strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    return Endpoint(name, host, port or default_port)


def _url_endpoint(name: str, url: str, default_port: int) -> Endpoint:
    parts = urlsplit(url)
    return _host_port(name, parts.hostname, parts.port, default_port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Like the servers themselves: a port in TIME_WAIT is free, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _accepts_tcp(endpoint: Endpoint) -> bool:
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=1.0):
            return True
    except OSError:
        return False


def _answers_http(url: str) -> bool:
    try:
        httpx.get(url, timeout=2.0)
    except httpx.HTTPError:
        return False
    return True


def _binary(name: str) -> str:
    """A console script of this environment first (the pinned version), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DevStackError(
            f"`{name}` was not found next to {sys.executable} or on PATH: "
            "install the embedded stack with `pip install 'loratrain[dev]'`"
        )
    return found


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Recorded in dev.env on every start, from the environment the stack's worker gets.
RECORDED_RUNNER_SETTINGS = ("LORA_RUNNER_SD_SCRIPTS_DIR", "LORA_RUNNER_TRAINER_FACTORY")


def read_dev_env(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _write_dev_env(path: Path, values: dict[str, str]) -> None:
    """Write the file readable by its owner only, atomically (no half-written key on a crash)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(
            "# Written by `loratrain dev`: its keys are generated on its first start and reused\n"
            "# after (runs recorded with this codec key stay readable); its addresses are those\n"
            "# of the last start. Every loratrain command reads this file; environment variables\n"
            "# override it.\n"
        )
        for key, value in values.items():
            f.write(f"{key}={json.dumps(value)}\n")
    os.replace(tmp, path)


def _settings_with(settings: Settings, dev_env: dict[str, str]) -> Settings:
    """`settings` with the dev env file's values for every field it did not set itself."""
    from_file = {
        k.removeprefix("LORA_").lower(): v for k, v in dev_env.items() if k.startswith("LORA_")
    }
    own: dict[str, Any] = settings.model_dump(include=settings.model_fields_set)
    return Settings(**{**from_file, **own})


# ------------------------------------------------------------------------------------------------
# The local S3 server (SeaweedFS)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalS3Ports:
    """Every port `weed mini` opens: S3 and, from `internal`, its master, volume, filer and
    admin servers; each of the five also at its port + GRPC_OFFSET (gRPC). The Iceberg and Lance
    catalogs and WebDAV, which it would also open, are turned off."""

    s3: int
    internal: int

    def named(self) -> list[tuple[str, int]]:
        http = [
            ("S3", self.s3),
            ("master", self.internal),
            ("volume", self.internal + 1),
            ("filer", self.internal + 2),
            ("admin", self.internal + 3),
        ]
        return http + [(f"{name} gRPC", port + GRPC_OFFSET) for name, port in http]


def free_local_s3_ports(host: str = "127.0.0.1") -> LocalS3Ports:
    """Ports for a `weed mini` that are free now, its gRPC ports included (for tests, benches)."""
    rng = random.SystemRandom()

    def free_block(size: int) -> int:
        while True:
            # HTTP ports in 20000-28999 and gRPC ports in 30000-38999: clear of the dev stack's
            # defaults (9000, 19000, 19333-19336, 29333-29336), so tests never take the ports
            # of a developer's own stack, and of most of the kernel's ephemeral range.
            first = rng.randrange(20000, 29000 - size)
            ports = [p + offset for p in range(first, first + size) for offset in (0, GRPC_OFFSET)]
            if all(port_is_free(host, port) for port in ports):
                return first

    s3 = free_block(1)
    while True:
        internal = free_block(4)
        if not internal <= s3 < internal + 4:
            return LocalS3Ports(s3=s3, internal=internal)


def local_s3_command(data_dir: Path, host: str, ports: LocalS3Ports, bucket: str) -> list[str]:
    """`weed mini` on `host` with every port pinned, its data in `data_dir`. Its credentials
    come from local_s3_env()."""
    p = ports
    return [
        _binary("weed"),
        # Its own log lines go to our log file, not to files under /tmp.
        "-logtostderr",
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-bucket={bucket}",
        "-master.telemetry=false",
        # Each bucket takes a volume of its own; the automatic limit stops writes after about 75
        # buckets (InternalError). Small volumes, and many of them, for a stack of many runs.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=5000",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={p.s3}",
        f"-s3.port.grpc={p.s3 + GRPC_OFFSET}",
        f"-master.port={p.internal}",
        f"-master.port.grpc={p.internal + GRPC_OFFSET}",
        f"-volume.port={p.internal + 1}",
        f"-volume.port.grpc={p.internal + 1 + GRPC_OFFSET}",
        f"-filer.port={p.internal + 2}",
        f"-filer.port.grpc={p.internal + 2 + GRPC_OFFSET}",
        f"-admin.port={p.internal + 3}",
        f"-admin.port.grpc={p.internal + 3 + GRPC_OFFSET}",
    ]


def local_s3_env(access_key_id: str, secret_access_key: str) -> dict[str, str]:
    """The environment that gives `weed mini` its one (admin) identity."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
    }


def _s3_client(url: str, access_key_id: str, secret_access_key: str, region: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}),
    )


def ensure_bucket(s3: Any, bucket: str, region: str = "us-east-1") -> None:
    """Create `bucket` unless this identity already has it."""
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise


def local_s3_volumes_served(data_dir: Path, host: str, ports: LocalS3Ports) -> bool:
    """Whether the master knows every volume on disk. Until the volume server's first heartbeat
    it does not, and reads of stored objects fail (InternalError) though the S3 port answers."""
    on_disk = len(list(data_dir.glob("*.dat")))
    if on_disk == 0:
        return True
    try:
        status = httpx.get(f"http://{host}:{ports.internal}/dir/status", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return False
    served = sum(
        int(node.get("Volumes", 0))
        for center in status.get("Topology", {}).get("DataCenters") or []
        for rack in center.get("Racks") or []
        for node in rack.get("DataNodes") or []
    )
    return served >= on_disk


@contextlib.contextmanager
def local_s3_server(
    data_dir: Path,
    *,
    access_key_id: str,
    secret_access_key: str,
    bucket: str,
    ports: LocalS3Ports | None = None,
    log_path: Path | None = None,
    startup_timeout_s: float = 30.0,
    stop_grace_s: float = 10.0,
) -> Iterator[str]:
    """A `weed mini` child process for tests and benchmarks; yields its S3 URL once a signed
    request succeeds and `bucket` exists. On exit SIGTERM, and SIGKILL after `stop_grace_s`
    (0: at once, as a crash); the data stays."""
    ports = ports or free_local_s3_ports()
    url = f"http://127.0.0.1:{ports.s3}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            local_s3_command(data_dir, "127.0.0.1", ports, bucket),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=local_s3_env(access_key_id, secret_access_key),
            start_new_session=True,
            # A test run killed by a timeout must not leave its S3 server behind.
            preexec_fn=_die_with_parent,
        )
    try:
        s3 = _s3_client(url, access_key_id, secret_access_key, "us-east-1")
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if popen.poll() is not None:
                raise DevStackError(
                    f"weed mini exited with code {popen.returncode}; see {log_path}"
                )
            try:
                ensure_bucket(s3, bucket)
                if local_s3_volumes_served(data_dir, "127.0.0.1", ports):
                    break
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise DevStackError(f"weed mini did not load its volumes; see {log_path}")
            time.sleep(0.1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM if stop_grace_s > 0 else signal.SIGKILL)
        try:
            popen.wait(timeout=stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


# ------------------------------------------------------------------------------------------------
# The stack
# ------------------------------------------------------------------------------------------------


class DevStack:
    """Temporal dev server, SeaweedFS's S3 server, relay and worker as child processes.

    `start()` checks that no other stack holds the state dir and that every port is free, and
    starts nothing otherwise; `supervise()` restarts a child that dies; `stop()` (also on a
    failed start) terminates every child's process group, kills what is left, and gives local
    GPU instances back.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        grace_s: float = 10.0,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.grace_s = grace_s
        self.startup_timeout_s = startup_timeout_s
        self.state_dir = settings.state_dir
        self.logs_dir = self.state_dir / "logs"
        self.dev_env_path = self.state_dir / DEV_ENV_NAME
        self.pids_path = self.state_dir / PIDS_NAME
        self.lock_path = self.state_dir / LOCK_NAME
        # Read (never write) an existing dev env now, so the port check sees the same endpoints
        # the stack will use.
        self.settings = _settings_with(settings, read_dev_env(self.dev_env_path))
        self.children: list[Child] = []
        self._stop_requested = threading.Event()
        self._lock_file: Any = None

    # ---------------------------------------------------------------------------------------
    # Endpoints
    # ---------------------------------------------------------------------------------------

    @property
    def s3_url(self) -> str:
        return self.settings.s3_endpoint_url or DEFAULT_LOCAL_S3_URL

    @property
    def codec_url(self) -> str:
        return self.settings.relay_public_url.rstrip("/") + CODEC_PATH

    @property
    def temporal(self) -> Endpoint:
        host, _, port = self.settings.temporal_address.rpartition(":")
        if not port.isdigit():
            raise DevStackError(
                f"LORA_TEMPORAL_ADDRESS={self.settings.temporal_address!r} is not host:port"
            )
        return _host_port(TEMPORAL, host, int(port), 7233)

    @property
    def temporal_ui(self) -> Endpoint:
        return _url_endpoint(TEMPORAL_UI, self.settings.temporal_ui_url, 8233)

    @property
    def local_s3(self) -> Endpoint:
        return _url_endpoint(LOCAL_S3, self.s3_url, 9000)

    @property
    def local_s3_ports(self) -> LocalS3Ports:
        return LocalS3Ports(s3=self.local_s3.port, internal=self.settings.local_s3_internal_port)

    @property
    def relay(self) -> Endpoint:
        return _host_port(RELAY, self.settings.relay_host, self.settings.relay_port, 8088)

    @property
    def endpoints(self) -> list[Endpoint]:
        s3_host = self.local_s3.host
        s3_internal = [
            Endpoint(f"{LOCAL_S3} {name}", s3_host, port)
            for name, port in self.local_s3_ports.named()
            if port != self.local_s3.port
        ]
        return [self.temporal, self.temporal_ui, self.local_s3, *s3_internal, self.relay]

    def check_endpoints(self) -> None:
        """Raise unless every endpoint is on this machine, distinct, and free."""
        self._check_endpoint_settings()
        self._check_ports_free()

    def _check_endpoint_settings(self) -> None:
        for e in (self.temporal, self.temporal_ui, self.local_s3):
            if not _is_loopback(e.host):
                raise DevStackError(
                    f"`loratrain dev` runs {e.name} on this machine, but it is configured at "
                    f"{e.host}:{e.port}; unset that LORA_ variable or use 127.0.0.1"
                )
        if urlsplit(self.s3_url).scheme != "http":
            raise DevStackError(
                f"the local S3 server speaks plain http, but LORA_S3_ENDPOINT_URL is {self.s3_url}"
            )
        if self.local_s3.port > MAX_LOCAL_S3_PORT:
            raise DevStackError(
                f"the local S3 server also listens on its port + {GRPC_OFFSET} (gRPC), so "
                f"LORA_S3_ENDPOINT_URL's port must be at most {MAX_LOCAL_S3_PORT}, "
                f"not {self.local_s3.port}"
            )
        seen: dict[int, str] = {}
        for e in self.endpoints:
            if e.port in seen:
                raise DevStackError(
                    f"{seen[e.port]} and {e.name} are both configured for port {e.port}"
                    + (
                        " (LORA_LOCAL_S3_INTERNAL_PORT moves the local S3 server's own ports)"
                        if LOCAL_S3 in seen[e.port] + e.name
                        else ""
                    )
                )
            seen[e.port] = e.name

    def _check_ports_free(self) -> None:
        busy = [e for e in self.endpoints if not port_is_free(e.host, e.port)]
        if busy:
            raise PortsInUse(busy, self.state_dir, self._leftover_children())

    def running_stack(self) -> dict[str, Any] | None:
        """What the `loratrain dev` holding this state dir wrote about itself, if one runs."""
        try:
            lock = self.lock_path.open("r")
        except FileNotFoundError:
            return None
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(lock.read() or "{}")
                except ValueError:
                    owner = {}
                return owner if isinstance(owner, dict) else {}
        return None

    def _leftover_children(self) -> dict[str, int]:
        """Children recorded by an earlier stack that still run and that `stop_leftovers` could
        not stop: those a pid file without start times names, which may be anyone's now."""
        alive = {}
        for child in read_recorded_children(self.pids_path):
            if child.start_ticks is None:
                try:
                    os.kill(child.pid, 0)
                except (ProcessLookupError, PermissionError):
                    continue
            elif not child.group_running():
                continue
            alive[child.name] = child.pid
        return alive

    def stop_leftovers(self) -> list[StoppedChild]:
        """Stop the children that an earlier `dev` of this state dir left running when it was
        killed (its pid file stays behind; a `dev` that stops cleanly removes it): SIGTERM each
        recorded process group, services first, SIGKILL what outlives the grace. Only groups
        whose leader is still the recorded process (same pid and start time) are signalled.
        Call it only while no `dev` holds the state dir."""
        recorded = [c for c in read_recorded_children(self.pids_path) if c.is_running()]
        services = [c for c in recorded if c.name in _SERVICES]
        infrastructure = [c for c in recorded if c.name not in _SERVICES]
        killed: set[str] = set()
        for batch in (services, infrastructure):
            for child in batch:
                if child.is_running():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while any(c.group_running() for c in batch) and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in batch:
                if child.group_running():
                    killed.add(child.name)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + self.grace_s
        while any(c.group_running() for c in recorded) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [StoppedChild(c.name, c.pid, c.name in killed) for c in recorded]

    # ---------------------------------------------------------------------------------------
    # Lifecycle
    # ---------------------------------------------------------------------------------------

    def start(self, report: Callable[[str], None] | None = None) -> None:
        """Start everything and return once all of it answers; on any failure, stop it all.

        Children that an earlier `dev` left running when it was killed are stopped first, with
        one line to `report`."""
        owner = self.running_stack()
        if owner is not None:
            raise AlreadyRunning(self.state_dir, owner)
        self._check_endpoint_settings()
        if self.pids_path.exists():
            # Held while the leftovers are stopped, so a `dev` that starts meanwhile is refused
            # instead of having its own new children taken for them.
            self._hold_lock()
        try:
            stopped = self.stop_leftovers()
            if stopped and report is not None:
                report(stopped_leftovers_line(self.state_dir, stopped))
            self._check_ports_free()
            if self._lock_file is None:
                self._hold_lock()
        except BaseException:
            self._release_lock()
            raise
        try:
            self._prepare_state()
            temporal = self._start_temporal()
            s3 = self._start_s3()
            self._wait_until(self._temporal_answers, "Temporal", temporal)
            self._wait_until(
                lambda: _answers_http(self.settings.temporal_ui_url), "Temporal UI", temporal
            )
            self._wait_until(lambda: _answers_http(self.s3_url), "local S3", s3)
            self._wait_until(self._bucket_ready, "the local S3 bucket", s3)
            self._wait_until(
                lambda: local_s3_volumes_served(
                    self.state_dir / S3_DATA_DIR, self.local_s3.host, self.local_s3_ports
                ),
                "the local S3 server's stored data",
                s3,
            )
            relay = self._launch(RELAY, [sys.executable, "-m", "cli", "relay"])
            self._launch(WORKER, [sys.executable, "-m", "cli", "worker"])
            self._wait_until(lambda: _accepts_tcp(self.relay), "relay", relay)
        except BaseException:
            self.stop()
            raise

    def request_stop(self) -> None:
        """Ask `start()` / `supervise()` to return; safe from a signal handler or another thread."""
        self._stop_requested.set()

    def supervise(self, report: Callable[[str], None]) -> None:
        """Until stop is requested: start again, in place, any child that died, after a backoff
        (1 s doubling to 30 s, back to 1 s once it ran a minute). The others keep running and
        open runs keep their GPUs. `report` gets one line per exit and per restart."""
        while not self._stop_requested.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is None:
                    if child.running():
                        continue
                    if now - child.started_at >= HEALTHY_AFTER_S:
                        child.backoff_s = RESTART_BACKOFF_INITIAL_S
                    child.restart_at = now + child.backoff_s
                    last = child.log_tail(1)
                    report(
                        f"{child.name} exited unexpectedly ({_exit_reason(child)}); "
                        f"restarting it in {child.backoff_s:.0f} s. Its log is {child.log_path}"
                        + (f", which ends: {last[0].strip()}" if last and last[0].strip() else "")
                    )
                elif now >= child.restart_at:
                    self._restart(child)
                    report(f"{child.name} restarted (pid {child.pid}, restart {child.restarts})")

    def stop(self) -> None:
        """SIGTERM every child's process group, services first; SIGKILL what outlives the grace.
        Then give local GPU instances back: only stopping the stack does that."""
        self._stop_requested.set()
        services = [c for c in self.children if c.name in _SERVICES]
        infrastructure = [c for c in self.children if c.name not in _SERVICES]
        for batch in (services, infrastructure):
            for child in batch:
                if child.running():
                    _signal_group(child, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for child in batch:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children:
            # Also sweeps up anything a child left behind in its group.
            _signal_group(child, signal.SIGKILL)
            child.popen.wait()
        self._destroy_local_gpus()
        self.pids_path.unlink(missing_ok=True)
        self._release_lock()

    def _destroy_local_gpus(self) -> None:
        """Local runners live in groups of their own: give those "GPUs" back too. A run still
        open finds its instance gone on the next start and rents another."""
        if self.settings.gpu_provider != "local":
            return
        from activities.providers.local import LocalProvider

        provider = LocalProvider(self.settings)
        for instance in provider.list_instances():
            provider.destroy(instance.instance_id)

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------

    def _hold_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = self.lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            try:
                owner = json.loads(lock.read() or "{}")
            except ValueError:
                owner = {}
            lock.close()
            raise AlreadyRunning(self.state_dir, owner) from None
        lock.truncate(0)
        lock.write(json.dumps({"pid": os.getpid(), "temporal_ui": self.settings.temporal_ui_url}))
        lock.flush()
        self._lock_file = lock

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            # The file stays: deleting it would race with a `dev` starting right now.
            self._lock_file.close()
            self._lock_file = None

    def _prepare_state(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        existing = read_dev_env(self.dev_env_path)
        generated = {
            "LORA_CODEC_KEY": new_codec_key(),
            "LORA_WEBHOOK_MASTER_SECRET": secrets.token_urlsafe(32),
            "LORA_S3_ACCESS_KEY_ID": "loratrain",
            "LORA_S3_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "LORA_GPU_PROVIDER": "local",
        }
        s = self.settings
        # Where this stack listens, rewritten on every start: every command reads this file,
        # so from any directory it finds the stack that runs now.
        location = {
            "LORA_TEMPORAL_ADDRESS": s.temporal_address,
            "LORA_TEMPORAL_NAMESPACE": s.temporal_namespace,
            "LORA_TASK_QUEUE": s.task_queue,
            "LORA_TEMPORAL_UI_URL": s.temporal_ui_url,
            "LORA_S3_ENDPOINT_URL": self.s3_url,
            "LORA_LOCAL_S3_INTERNAL_PORT": str(s.local_s3_internal_port),
            "LORA_BUCKET": s.bucket,
            "LORA_RELAY_HOST": s.relay_host,
            "LORA_RELAY_PORT": str(s.relay_port),
            "LORA_RELAY_PUBLIC_URL": s.relay_public_url,
            # One machine, one user: webhooks to a receiver on this machine are the point.
            "LORA_WEBHOOK_ALLOW_HTTP": "true",
            "LORA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
        }
        # What this stack's local runners will see of their own settings (they inherit the
        # worker's LORA_RUNNER_ variables), so `train` in any terminal knows whether sd-scripts
        # can run here. Only a record: the worker reads none of it.
        children = self._child_env()
        runner = {name: children[name] for name in RECORDED_RUNNER_SETTINGS if name in children}
        earlier = {k: v for k, v in existing.items() if k not in RECORDED_RUNNER_SETTINGS}
        # Generated keys already there are kept: a new codec key would make old histories
        # unreadable, new S3 credentials would lock the stored data away.
        values = {**generated, **earlier, **location, **runner}
        if values != existing or not self.dev_env_path.exists():
            _write_dev_env(self.dev_env_path, values)
        self.dev_env_path.chmod(0o600)  # it holds the codec key and the master secret
        settings = _settings_with(self.settings, read_dev_env(self.dev_env_path))
        ui_origin = settings.temporal_ui_url.rstrip("/")
        if ui_origin not in settings.codec_cors_origins:
            settings = settings.model_copy(
                update={"codec_cors_origins": [*settings.codec_cors_origins, ui_origin]}
            )
        self.settings = settings

    def _start_temporal(self) -> Child:
        temporal, ui = self.temporal, self.temporal_ui
        command = [
            _binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            temporal.host,
            "--port",
            str(temporal.port),
            "--ui-ip",
            ui.host,
            "--ui-port",
            str(ui.port),
            "--db-filename",
            str(self.state_dir / "temporal.db"),
            "--search-attribute",
            f"{SEARCH_ATTRIBUTE}=Keyword",
            "--ui-codec-endpoint",
            self.codec_url,
            "--dynamic-config-value",
            "frontend.enableUpdateWorkflowExecution=true",
            "--log-level",
            "warn",
        ]
        if self.settings.temporal_namespace != "default":
            command += ["--namespace", self.settings.temporal_namespace]
        return self._launch(TEMPORAL, command)

    def _start_s3(self) -> Child:
        access_key, secret_key = self._s3_credentials()
        command = local_s3_command(
            self.state_dir / S3_DATA_DIR,
            self.local_s3.host,
            self.local_s3_ports,
            self.settings.bucket,
        )
        return self._launch(LOCAL_S3, command, local_s3_env(access_key, secret_key))

    def _s3_credentials(self) -> tuple[str, str]:
        secret = self.settings.s3_secret_access_key
        if not self.settings.s3_access_key_id or secret is None:
            raise DevStackError(
                "the local S3 server needs LORA_S3_ACCESS_KEY_ID and LORA_S3_SECRET_ACCESS_KEY "
                f"(kept in {self.dev_env_path})"
            )
        return self.settings.s3_access_key_id, secret.get_secret_value()

    def _launch(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.logs_dir / f"{name.lower().replace(' ', '-')}.log"
        env = env if env is not None else self._child_env()
        child = Child(name, _spawn(command, env, log_path), log_path, command, env)
        child.start_ticks = start_ticks(child.pid)
        self.children.append(child)
        self._write_pids()
        return child

    def _restart(self, child: Child) -> None:
        # Whatever the dead child left in its group (none of it is a local GPU: runners have
        # groups of their own) goes with it.
        _signal_group(child, signal.SIGKILL)
        child.popen.wait()
        child.popen = _spawn(child.command, child.env, child.log_path)
        child.start_ticks = start_ticks(child.pid)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.restarts += 1
        child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        self._write_pids()

    def _write_pids(self) -> None:
        # Atomically: a reader (a second `dev`, a test) never sees half a file.
        tmp = self.pids_path.with_name(f".{PIDS_NAME}.tmp")
        recorded = {
            c.name: {"pid": c.pid, "pgid": c.pid, "start_ticks": c.start_ticks}
            for c in self.children
        }
        tmp.write_text(json.dumps(recorded))
        os.replace(tmp, self.pids_path)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in self.settings.model_fields_set:
            value = getattr(self.settings, name)
            if value is not None:
                env[f"LORA_{name.upper()}"] = _env_value(value)
        env["PYTHONUNBUFFERED"] = "1"
        # The local provider's GPU is this machine, whatever it has: without one the runner
        # trains on the CPU (the builtin trainer). It reports progress often enough for a live
        # display, and still under the relay's cap on events per run and minute (about 20
        # progress events and the few others). LORA_RUNNER_ variables of the environment win.
        env.setdefault("LORA_RUNNER_REQUIRE_GPU", "false")
        env.setdefault("LORA_RUNNER_PROGRESS_INTERVAL_S", "3")
        return env

    def _wait_until(self, ready: Callable[[], bool], what: str, child: Child) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._stop_requested.is_set():
                raise StartInterrupted(f"stopped while waiting for {what}")
            for c in self.children:
                if not c.running():
                    raise ChildExited(c)
            if ready():
                return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"{what} did not answer within {self.startup_timeout_s:.0f} s; "
                    f"see {child.log_path}"
                )
            self._stop_requested.wait(0.2)

    def _temporal_answers(self) -> bool:
        if not _accepts_tcp(self.temporal):
            return False

        async def check() -> None:
            client = await Client.connect(
                self.settings.temporal_address, namespace=self.settings.temporal_namespace
            )
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=self.settings.temporal_namespace),
                timeout=timedelta(seconds=2),
            )

        # A thread of its own, so start() also works when called from inside an event loop.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            try:
                pool.submit(asyncio.run, asyncio.wait_for(check(), 5.0)).result()
            except Exception:
                return False
        return True

    def _bucket_ready(self) -> bool:
        """The bucket exists (SeaweedFS creates it just after its S3 port opens, or we do)."""
        access_key, secret_key = self._s3_credentials()
        s3 = _s3_client(self.s3_url, access_key, secret_key, self.settings.s3_region)
        try:
            ensure_bucket(s3, self.settings.bucket, self.settings.s3_region)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidBucketName"):
                raise DevStackError(
                    f"the local S3 server refused to create bucket {self.settings.bucket!r}: {code}"
                ) from None
            return False
        except BotoCoreError:
            return False
        return True


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: Ctrl-C reaches only us, and stop() can signal the group.
            start_new_session=True,
        )


def _die_with_parent() -> None:
    """In a child before it runs its program: be killed when the parent ends (Linux prctl)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _exit_reason(child: Child) -> str:
    code = child.popen.returncode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


# ------------------------------------------------------------------------------------------------
# The children an earlier `dev` left running
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedChild:
    """A child as `dev.pids` records it: its pid leads a process group (and session) of its own."""

    name: str
    pid: int
    start_ticks: int | None

    def is_running(self) -> bool:
        """Whether the recorded process itself still runs: same pid *and* start time, so a
        process that got its pid later is never taken for it."""
        stat = read_stat(self.pid)
        return (
            self.start_ticks is not None
            and stat is not None
            and stat.running
            and stat.start_ticks == self.start_ticks
        )

    def group_running(self) -> list[int]:
        """Running processes of its group: its session, started no earlier than it. The kernel
        gives the pid to no other process while the group has members."""
        if self.start_ticks is None:
            return []
        return group_members(self.pid, self.start_ticks)


def read_recorded_children(path: Path) -> list[RecordedChild]:
    """The children a `dev` recorded in `path` (dev.pids); an entry without a start time (a
    file from before start times were recorded) can never be verified, so it is never signalled."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(recorded, dict):
        return []
    children = []
    for name, entry in recorded.items():
        try:
            if isinstance(entry, dict):
                ticks = entry.get("start_ticks")
                children.append(
                    RecordedChild(
                        str(name), int(entry["pid"]), None if ticks is None else int(ticks)
                    )
                )
            else:
                children.append(RecordedChild(str(name), int(entry), None))
        except (KeyError, TypeError, ValueError):
            continue
    return children


@dataclass(frozen=True)
class StoppedChild:
    name: str
    pid: int
    killed: bool  # it outlived SIGTERM's grace and got SIGKILL


def stopped_leftovers_line(state_dir: Path, stopped: list[StoppedChild]) -> str:
    """The one line that says what a killed `dev` had left running and this one stopped."""
    names = ", ".join(f"{c.name} pid {c.pid}" for c in stopped)
    killed = [c.name for c in stopped if c.killed]
    late = f" ({', '.join(killed)} only by SIGKILL)" if killed else ""
    return (
        f"an earlier `loratrain dev` with state in {state_dir} ended without stopping its "
        f"children; stopped them{late}: {names}"
    )
