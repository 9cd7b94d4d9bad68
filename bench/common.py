"""What every benchmark shares: the table row, percentiles, and the embedded stack's real parts
(Temporal dev server, SeaweedFS, the relay over HTTP) started on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from pydantic import SecretStr

from activities.storage import events_url
from common.settings import Settings
from devstack.stack import local_s3_server
from gpu_runner import protocol

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
S3_KEY_ID = "bench"
S3_SECRET = "bench-secret"
# Fixed benchmark-only keys: nothing of value is encrypted or signed with them.
CODEC_KEY = "YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMzI="
MASTER_SECRET = "bench-master-secret"


@dataclass
class Row:
    """One line of the table. `met` is None when the figure could not be measured."""

    id: str
    what: str
    figure: str
    compared: str
    ratio: str
    target: str
    met: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        return "met" if self.met else "MISSED"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: with 20 values, p99 is the largest."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
    )


@contextlib.contextmanager
def local_s3(bucket: str = "bench") -> Iterator[str]:
    """SeaweedFS (`weed mini`) on free loopback ports, data in a temporary directory."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-s3-") as data,
        local_s3_server(
            Path(data) / "s3",
            access_key_id=S3_KEY_ID,
            secret_access_key=S3_SECRET,
            bucket=bucket,
            log_path=Path(data) / "s3.log",
            stop_grace_s=0,
        ) as endpoint,
    ):
        yield endpoint


def bench_settings(endpoint: str, state_dir: Path, **update: Any) -> Settings:
    """Settings for a stack of this process's own: own bucket and task queue, loopback http."""
    return Settings(
        s3_endpoint_url=endpoint,
        s3_access_key_id=S3_KEY_ID,
        s3_secret_access_key=SecretStr(S3_SECRET),
        bucket="bench",
        codec_key=SecretStr(CODEC_KEY),
        webhook_master_secret=SecretStr(MASTER_SECRET),
        civitai_api_key=None,
        state_dir=state_dir,
        task_queue=f"bench-{uuid.uuid4()}",
        webhook_allow_http=True,
        webhook_allow_private_addresses=True,
    ).model_copy(update=update)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(command_part: str) -> int:
    """This process's child whose command line contains `command_part` (e.g. the dev server)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if parent == me and command_part in command:
            return int(entry.name)
    raise RuntimeError(f"no child process running {command_part!r}")


def signed_request(
    relay_url: str,
    event: protocol.RunnerEvent,
    execution: str | None = None,
    *,
    close: bool = False,
) -> bytes:
    """A whole signed HTTP/1.1 POST of `event` to the relay, as its run's runner sends it (with
    `execution`: to that execution's route, with that execution's secret); built before any
    timing, as runners sign on their own box. `close` asks the relay to close the connection
    after answering."""
    body, headers = protocol.sign_event(
        protocol.derive_run_secret(MASTER_SECRET, event.run_id, execution), event
    )
    url = urlsplit(events_url(relay_url, event.run_id, execution))
    lines = [
        f"POST {url.path} HTTP/1.1",
        f"Host: {url.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(["Connection: close"] if close else []),
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
