"""What this machine has: the GPU (through nvidia-smi) and free disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gpu_runner.system")

NVIDIA_SMI_QUERY = [
    "--query-gpu=name,memory.total,driver_version",
    "--format=csv,noheader,nounits",
]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    vram_mb: int | None
    driver: str | None
    count: int = 1


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    """The first GPU of `nvidia-smi --query-gpu=name,memory.total,driver_version` CSV output."""
    rows = [line.strip() for line in output.splitlines() if line.strip()]
    if not rows:
        return None
    fields = [f.strip() for f in rows[0].split(",")]
    if not fields or not fields[0]:
        return None
    vram: int | None = None
    if len(fields) > 1:
        try:
            vram = int(float(fields[1]))
        except ValueError:  # "[N/A]" on some virtualised GPUs
            vram = None
    driver = fields[2] if len(fields) > 2 and fields[2] and not fields[2].startswith("[") else None
    return GpuInfo(name=fields[0], vram_mb=vram, driver=driver, count=len(rows))


async def probe_gpu(command: str = "nvidia-smi", timeout_s: float = 30.0) -> GpuInfo | None:
    """Ask nvidia-smi about the GPU; None when it is absent, fails, or hangs."""
    executable = shutil.which(command)
    if executable is None:
        log.info("%s not found: no NVIDIA GPU visible", command)
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            executable,
            *NVIDIA_SMI_QUERY,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a hung nvidia-smi and its children can all be killed
        )
    except OSError as e:
        log.warning("cannot run %s: %s", command, e)
        return None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.warning("%s did not answer in %.0f s", command, timeout_s)
        return None
    if proc.returncode != 0:
        log.warning(
            "%s failed (exit %s): %s",
            command,
            proc.returncode,
            stderr.decode(errors="replace").strip()[:300],
        )
        return None
    return parse_nvidia_smi(stdout.decode(errors="replace"))


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def required_disk_bytes(model_bytes: int | None, images_bytes: int, margin_bytes: int) -> int:
    """Model + the zip and its unzipped copy + room for checkpoints."""
    return (model_bytes or 0) + images_bytes * 2 + margin_bytes
