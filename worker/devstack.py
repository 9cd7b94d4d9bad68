"""The embedded stack behind `loratrain dev`: Temporal's dev server, local S3, relay and worker.

Every piece is a child process in its own process group, logging under `<state_dir>/logs/`, so
stopping the stack can signal each group and nothing is left behind. `DevStack` is shared by the
`dev` and `demo` commands and by tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import ClientError
from dotenv import dotenv_values
from pydantic import SecretStr
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from .converter import new_codec_key
from .settings import SEARCH_ATTRIBUTE, Settings

DEFAULT_LOCAL_S3_URL = "http://127.0.0.1:9000"
# Where the relay serves the codec endpoint that lets the Temporal UI decrypt payloads.
CODEC_PATH = "/codec"
DEV_ENV_NAME = "dev.env"
PIDS_NAME = "dev.pids"

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
    def __init__(self, busy: list[Endpoint], leftovers: dict[str, int] | None = None) -> None:
        self.busy = busy
        lines = [
            f"port {e.port} ({e.name}) is already in use: is another `loratrain dev` running?"
            for e in busy
        ]
        if leftovers:
            running = ", ".join(f"{name} pid {pid}" for name, pid in leftovers.items())
            groups = " ".join(f"-{pid}" for pid in leftovers.values())
            lines.append(
                f"processes of a `loratrain dev` in this directory are still running ({running}); "
                f"if it was killed, stop them with: kill -- {groups}"
            )
        super().__init__("\n".join(lines))


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
            "# Written by `loratrain dev` on its first start and reused after, so runs recorded\n"
            "# with this codec key stay readable. Environment variables override these values.\n"
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
    return Settings(_env_file=None, **{**from_file, **own})


class DevStack:
    """Temporal dev server, moto's S3 server, relay and worker as child processes.

    `start()` checks every port first and starts nothing when one is taken; `stop()` (also on
    a failed start) terminates every child's process group, then kills what is left.
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
        # Read (never write) an existing dev env now, so the port check sees the same endpoints
        # the stack will use.
        self.settings = _settings_with(settings, read_dev_env(self.dev_env_path))
        self.children: list[Child] = []
        self._stop_requested = threading.Event()

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
    def relay(self) -> Endpoint:
        return _host_port(RELAY, self.settings.relay_host, self.settings.relay_port, 8088)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [self.temporal, self.temporal_ui, self.local_s3, self.relay]

    def check_endpoints(self) -> None:
        """Raise unless every endpoint is on this machine, distinct, and free."""
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
        seen: dict[int, str] = {}
        for e in self.endpoints:
            if e.port in seen:
                raise DevStackError(
                    f"{seen[e.port]} and {e.name} are both configured for port {e.port}"
                )
            seen[e.port] = e.name
        busy = [e for e in self.endpoints if not port_is_free(e.host, e.port)]
        if busy:
            raise PortsInUse(busy, self._leftover_children())

    def _leftover_children(self) -> dict[str, int]:
        """Children recorded by an earlier stack that are still alive (it may have been killed)."""
        try:
            recorded = json.loads(self.pids_path.read_text())
        except (OSError, ValueError):
            return {}
        alive = {}
        for name, pid in recorded.items():
            try:
                os.kill(int(pid), 0)
            except (ProcessLookupError, PermissionError, ValueError, TypeError):
                continue
            alive[str(name)] = int(pid)
        return alive

    # ---------------------------------------------------------------------------------------
    # Lifecycle
    # ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything and return once all of it answers; on any failure, stop it all."""
        self.check_endpoints()
        try:
            self._prepare_state()
            self._start_temporal()
            self._start_s3()
            self._wait_until(lambda: self._temporal_answers(), "Temporal", self.children[0])
            self._wait_until(
                lambda: _answers_http(self.settings.temporal_ui_url),
                "Temporal UI",
                self.children[0],
            )
            self._wait_until(lambda: _answers_http(self.s3_url), "local S3", self.children[1])
            self._create_bucket()
            relay = self._launch(RELAY, [sys.executable, "-m", "worker.cli", "relay"])
            self._launch(WORKER, [sys.executable, "-m", "worker.cli", "worker"])
            self._wait_until(lambda: _accepts_tcp(self.relay), "relay", relay)
        except BaseException:
            self.stop()
            raise

    def request_stop(self) -> None:
        """Ask `start()` / `wait()` to return; safe from a signal handler or another thread."""
        self._stop_requested.set()

    def wait(self) -> Child | None:
        """Block until stop is requested (None) or a child exits on its own (that child)."""
        while not self._stop_requested.wait(0.2):
            for child in self.children:
                if not child.running():
                    return child
        return None

    def stop(self) -> None:
        """SIGTERM every child's process group, services first; SIGKILL what outlives the grace."""
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

    def _prepare_state(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        existing = read_dev_env(self.dev_env_path)
        wanted = {
            "LORA_CODEC_KEY": new_codec_key(),
            "LORA_WEBHOOK_MASTER_SECRET": secrets.token_urlsafe(32),
            "LORA_S3_ENDPOINT_URL": self.s3_url,
            # moto accepts any credentials; boto3 only needs some.
            "LORA_S3_ACCESS_KEY_ID": "loratrain",
            "LORA_S3_SECRET_ACCESS_KEY": "loratrain-dev",
            "LORA_BUCKET": self.settings.bucket,
            "LORA_GPU_PROVIDER": "local",
        }
        # Keys already there are kept: a new codec key would make old histories unreadable.
        missing = {k: v for k, v in wanted.items() if k not in existing}
        if missing or not self.dev_env_path.exists():
            _write_dev_env(self.dev_env_path, {**existing, **missing})
        self.dev_env_path.chmod(0o600)  # it holds the codec key and the master secret
        settings = _settings_with(self.settings, read_dev_env(self.dev_env_path))
        ui_origin = settings.temporal_ui_url.rstrip("/")
        if ui_origin not in settings.codec_cors_origins:
            settings = settings.model_copy(
                update={"codec_cors_origins": [*settings.codec_cors_origins, ui_origin]}
            )
        self.settings = settings

    def _start_temporal(self) -> None:
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
        self._launch(TEMPORAL, command)

    def _start_s3(self) -> None:
        s3 = self.local_s3
        self._launch(LOCAL_S3, [_binary("moto_server"), "-H", s3.host, "-p", str(s3.port)])

    def _launch(self, name: str, command: list[str]) -> Child:
        log_path = self.logs_dir / f"{name.lower().replace(' ', '-')}.log"
        with log_path.open("ab") as log:
            log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(command)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                # Own process group: Ctrl-C reaches only us, and stop() can signal the group.
                start_new_session=True,
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        self.pids_path.write_text(json.dumps({c.name: c.pid for c in self.children}))
        return child

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in self.settings.model_fields_set:
            value = getattr(self.settings, name)
            if value is not None:
                env[f"LORA_{name.upper()}"] = _env_value(value)
        env["PYTHONUNBUFFERED"] = "1"
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

    def _create_bucket(self) -> None:
        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name=self.settings.s3_region,
            aws_access_key_id=self.settings.s3_access_key_id,
            aws_secret_access_key=(
                self.settings.s3_secret_access_key.get_secret_value()
                if self.settings.s3_secret_access_key
                else None
            ),
            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}),
        )
        kwargs: dict[str, Any] = {"Bucket": self.settings.bucket}
        if self.settings.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.s3_region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)
