"""Runner test helpers: a misbehaving file server, zips, job specs in S3, the runner process."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_runner.protocol import (
    EpochUploads,
    ImagesSource,
    JobSpec,
    ModelSource,
    RunnerLimits,
    SampleSettings,
    TrainingConfig,
    UploadTarget,
    derive_run_secret,
)
from tests.fake_civitai import model_bytes

ROOT = Path(__file__).resolve().parents[2]
MASTER_SECRET = "test-master-secret"
CIVITAI_KEY = "civitai-key-0123456789abcdef"
FAKE_TRAINER = "tests.runner.fake_trainer:FakeTrainer"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pseudo_random(label: str, size: int) -> bytes:
    return model_bytes(label, size)


# --------------------------------------------------------------------------------------------
# A file server that can drop connections, ignore Range, demand a Bearer token and redirect
# --------------------------------------------------------------------------------------------


@dataclass
class ServedFile:
    content: bytes
    drop_after: int | None = None  # the first request's connection breaks after this many bytes
    ranges: bool = True  # False: ignore Range and send the whole file with 200
    bearer: str | None = None  # demand `Authorization: Bearer <bearer>` (else 401)
    redirect_to: str | None = None  # answer 302 to this URL instead
    status: int | None = None  # always answer this status
    fail_first: int = 0  # answer 503 to this many requests first
    chunk_delay_s: float = 0.0  # send 64 KiB at a time with this pause between (a slow link)
    served: int = 0


@dataclass(frozen=True)
class SeenRequest:
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """A raw ASGI app (so it can break a response half way), serving `files` at /files/<name>."""

    files: dict[str, ServedFile] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)

    def add(self, name: str, content: bytes, **options: Any) -> ServedFile:
        served = ServedFile(content, **options)
        self.files[name] = served
        return served

    def seen(self, name: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.path == f"/files/{name}"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        self.requests.append(SeenRequest(path, headers))
        served = (
            self.files.get(path.removeprefix("/files/")) if path.startswith("/files/") else None
        )
        if served is None:
            return await _respond(send, 404, b"not found")
        served.served += 1
        if served.status is not None:
            return await _respond(send, served.status, b"no")
        if served.fail_first >= served.served:
            return await _respond(send, 503, b"busy")
        if served.bearer and headers.get("authorization") != f"Bearer {served.bearer}":
            return await _respond(send, 401, b"unauthorized")
        if served.redirect_to:
            return await _respond(send, 302, b"", [(b"location", served.redirect_to.encode())])
        content, status, extra = served.content, 200, []
        wanted = re.fullmatch(r"bytes=(\d+)-", headers.get("range", ""))
        if wanted and served.ranges:
            start = int(wanted.group(1))
            total = len(content)
            content, status = content[start:], 206
            extra.append((b"content-range", f"bytes {start}-{total - 1}/{total}".encode()))
        extra.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": extra})
        if served.drop_after is not None and served.served == 1:
            # Half the body, then return without finishing: uvicorn closes the connection.
            await send(
                {
                    "type": "http.response.body",
                    "body": content[: served.drop_after],
                    "more_body": True,
                }
            )
            return
        if served.chunk_delay_s:
            for start in range(0, len(content), 64 * 1024):
                await asyncio.sleep(served.chunk_delay_s)
                chunk = content[start : start + 64 * 1024]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": content})


async def _respond(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [*(headers or []), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# Zips
# --------------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def dataset_zip(images: int = 3) -> bytes:
    entries: dict[str, bytes] = {}
    for i in range(images):
        entries[f"img{i}.png"] = PNG + bytes([i])
        entries[f"img{i}.txt"] = f"a photo of sks person, {i}".encode()
    return make_zip(entries)


def symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("img0.png", PNG)
        link = zipfile.ZipInfo("evil.png")
        link.create_system = 3  # unix, so the mode bits count
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def bomb_zip(uncompressed: int) -> bytes:
    return make_zip({"img0.png": PNG, "huge.png": b"\x00" * uncompressed})


# --------------------------------------------------------------------------------------------
# Jobs in S3
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    spec: JobSpec
    job_url: str
    bucket: str
    upload_key: str

    @property
    def log_key(self) -> str:
        return f"runs/{self.spec.run_id}/logs/attempt-1.log"

    @property
    def tensorboard_key(self) -> str:
        return f"runs/{self.spec.run_id}/tensorboard/attempt-1.tar.gz"


def presigned_get(s3: Any, bucket: str, key: str) -> str:
    return str(
        s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900
        )
    )


def put_object(s3: Any, bucket: str, key: str, body: bytes) -> str:
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return presigned_get(s3, bucket, key)


def make_job(
    s3: Any,
    bucket: str,
    events_url_for: Any,
    *,
    images_zip: bytes | None = None,
    model_url: str | None = None,
    model_content: bytes | None = None,
    model_sha256: str | None = "auto",
    model_bytes: int | str | None = "auto",
    needs_civitai_key: bool = False,
    civitai_api_key: str | None = CIVITAI_KEY,
    trainer: str = "sd-scripts",
    epochs: int = 3,
    max_upload_bytes: int = 10 * 1024 * 1024,
    limits: RunnerLimits | None = None,
    run_id: str | None = None,
    upload_s3: Any = None,
    log_upload: bool = False,
    tensorboard_upload: bool = False,
    training: TrainingConfig | None = None,
    epoch_uploads_url: str | None = None,
    samples: SampleSettings | None = None,
) -> Job:
    """Put the images (and, unless `model_url` is given, the model) in S3 and write job.json.

    `upload_s3`: the client that presigns the uploads (one pointed at a proxy); `log_upload`:
    the job also gets a presigned PUT for the run's log at `runs/<run_id>/logs/attempt-1.log`;
    `tensorboard_upload`: one for the TensorBoard logs at
    `runs/<run_id>/tensorboard/attempt-1.tar.gz`.
    """
    run_id = run_id or f"run-{uuid.uuid4().hex[:10]}"
    images_zip = dataset_zip() if images_zip is None else images_zip
    images_url = put_object(s3, bucket, f"runs/{run_id}/images.zip", images_zip)
    model_content = pseudo_random("model", 400_000) if model_content is None else model_content
    if model_url is None:
        model_url = put_object(s3, bucket, "models/base.safetensors", model_content)
    upload_key = f"runs/{run_id}/lora.safetensors"
    upload_s3 = upload_s3 or s3
    upload_url = str(
        upload_s3.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": upload_key}, ExpiresIn=900
        )
    )

    def put_target(key: str) -> UploadTarget:
        url = upload_s3.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900
        )
        return UploadTarget(url=str(url), bucket=bucket, key=key, max_bytes=1024 * 1024)

    spec = JobSpec(
        run_id=run_id,
        images=ImagesSource(
            url=images_url,
            sha256=sha256(images_zip),
            bytes=len(images_zip),
            image_count=3,
        ),
        model=ModelSource(
            url=model_url,
            filename="base.safetensors",
            sha256=sha256(model_content) if model_sha256 == "auto" else model_sha256,
            bytes=len(model_content) if model_bytes == "auto" else model_bytes,
            base_model="SD 1.5",
            family="sd15",
            needs_civitai_key=needs_civitai_key,
        ),
        civitai_api_key=civitai_api_key,
        training=training or TrainingConfig(epochs=epochs),
        trainer=trainer,
        events_url=events_url_for(run_id),
        webhook_secret=derive_run_secret(MASTER_SECRET, run_id),
        upload=UploadTarget(
            url=upload_url, bucket=bucket, key=upload_key, max_bytes=max_upload_bytes
        ),
        log_upload=put_target(f"runs/{run_id}/logs/attempt-1.log") if log_upload else None,
        tensorboard_upload=(
            put_target(f"runs/{run_id}/tensorboard/attempt-1.tar.gz")
            if tensorboard_upload
            else None
        ),
        limits=limits
        or RunnerLimits(max_runtime_s=120, orphan_timeout_s=20, heartbeat_interval_s=1),
        epoch_uploads=EpochUploads(url=epoch_uploads_url) if epoch_uploads_url else None,
        samples=samples or SampleSettings(enabled=False),
    )
    job_url = put_object(s3, bucket, f"runs/{run_id}/job.json", spec.model_dump_json().encode())
    return Job(spec=spec, job_url=job_url, bucket=bucket, upload_key=upload_key)


# --------------------------------------------------------------------------------------------
# The runner as a real process
# --------------------------------------------------------------------------------------------


def runner_env(job_url: str, workdir: Path, **settings: str) -> dict[str, str]:
    """The environment of `python -m gpu_runner`: no GPU required, quick retries, fake trainer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    env.update(
        {
            "LORA_JOB_URL": job_url,
            "LORA_RUNNER_WORKDIR": str(workdir),
            "LORA_RUNNER_REQUIRE_GPU": "false",
            "LORA_RUNNER_RETRY_INITIAL_S": "0.05",
            "LORA_RUNNER_RETRY_MAX_S": "0.2",
            "LORA_RUNNER_DISK_MARGIN_BYTES": "0",
            "LORA_RUNNER_HTTP_TIMEOUT_S": "5",
            "LORA_RUNNER_TRAINER_FACTORY": FAKE_TRAINER,
        }
    )
    env.update({f"LORA_RUNNER_{k.upper()}": v for k, v in settings.items()})
    return env


@dataclass
class RunnerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the runner did not exit in {timeout_s}s; log:\n{self.log}"
            ) from None


def start_runner(env: dict[str, str], log_path: Path) -> RunnerProcess:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_runner"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    return RunnerProcess(proc, log_path)


@dataclass
class Finished:
    code: int
    log: str
    seconds: float


def run_runner(env: dict[str, str], log_path: Path, timeout_s: float = 60.0) -> Finished:
    started = time.monotonic()
    runner = start_runner(env, log_path)
    code = runner.wait(timeout_s)
    return Finished(code, runner.log, time.monotonic() - started)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    return not (status.exists() and ") Z " in status.read_text())


def wait_until(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# --------------------------------------------------------------------------------------------
# What a run leaves behind: safetensors metadata, TensorBoard event files
# --------------------------------------------------------------------------------------------


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file: 8 bytes little-endian length, then JSON."""
    (size,) = struct.unpack("<Q", data[:8])
    metadata: dict[str, str] = json.loads(data[8 : 8 + size]).get("__metadata__", {})
    return metadata


def tensorboard_scalars(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file.

    Event files are TFRecords (length, masked CRC-32C of it, the Event protobuf, its masked
    CRC-32C); an Event has the step in field 2 and a Summary in field 5, whose values (field 1)
    have a tag (1) and a simple_value (2, float32). The CRCs are checked: a cut file fails here.
    """
    scalars = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        (length_crc,) = struct.unpack_from("<I", data, offset + 8)
        record = data[offset + 12 : offset + 12 + length]
        (record_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
        assert length_crc == _masked_crc32c(data[offset : offset + 8]), "bad length CRC"
        assert record_crc == _masked_crc32c(record), "bad record CRC"
        offset += 16 + length
        event = _proto_fields(record)
        step = int(event.get(2, [0])[0])
        for summary in event.get(5, []):
            for value in _proto_fields(bytes(summary)).get(1, []):
                fields = _proto_fields(bytes(value))
                if 1 in fields and 2 in fields:
                    tag = bytes(fields[1][0]).decode()
                    (number,) = struct.unpack("<f", bytes(fields[2][0]))
                    scalars.append((tag, step, number))
    return scalars


def _proto_fields(data: bytes) -> dict[int, list[Any]]:
    """Field number -> values (ints for varints, bytes otherwise) of one protobuf message."""
    fields: dict[int, list[Any]] = {}
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, offset = _varint(data, offset)
        elif wire == 1:
            value, offset = data[offset : offset + 8], offset + 8
        elif wire == 2:
            size, offset = _varint(data, offset)
            value, offset = data[offset : offset + size], offset + size
        elif wire == 5:
            value, offset = data[offset : offset + 4], offset + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, offset


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def no_secrets_in(text: str, job: Job) -> None:
    for secret in job.spec.secrets():
        assert secret not in text, "a secret leaked"
    assert "X-Amz-Signature" not in text, "a presigned URL's signature leaked"
