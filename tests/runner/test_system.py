"""nvidia-smi probing and the log redactor."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gpu_runner.runner import Redactor
from gpu_runner.system import free_disk_bytes, parse_nvidia_smi, probe_gpu, required_disk_bytes


def fake_tool(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_parses_nvidia_smi_csv() -> None:
    info = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 550.54.15\nNVIDIA H100, 81559, 550\n")
    assert info is not None
    assert (info.name, info.vram_mb, info.driver, info.count) == (
        "NVIDIA H100 80GB HBM3",
        81559,
        "550.54.15",
        2,
    )
    odd = parse_nvidia_smi("GRID A100, [N/A], [N/A]\n")
    assert odd is not None and odd.vram_mb is None and odd.driver is None
    assert parse_nvidia_smi("") is None


async def test_probe_runs_nvidia_smi(tmp_path: Path) -> None:
    tool = fake_tool(tmp_path, 'echo "NVIDIA RTX 4090, 24564, 550.90.07"')
    info = await probe_gpu(tool)
    assert info is not None and info.name == "NVIDIA RTX 4090" and info.vram_mb == 24564


async def test_probe_answers_none_without_a_working_gpu(tmp_path: Path) -> None:
    failing = fake_tool(tmp_path, 'echo "NVIDIA-SMI has failed" >&2; exit 9')
    assert await probe_gpu(failing) is None
    assert await probe_gpu(str(tmp_path / "absent-nvidia-smi")) is None
    assert await probe_gpu(fake_tool(tmp_path, "sleep 5"), timeout_s=0.2) is None


def test_disk_numbers(tmp_path: Path) -> None:
    assert free_disk_bytes(tmp_path / "not" / "yet") == os.statvfs(tmp_path).f_bavail * (
        os.statvfs(tmp_path).f_frsize
    )
    assert required_disk_bytes(100, 10, 5) == 125
    assert required_disk_bytes(None, 10, 0) == 20


def test_redactor_removes_secrets_and_url_queries() -> None:
    redact = Redactor(["whsec_abc123", "civitai-key"])
    line = (
        "key civitai-key secret whsec_abc123 url "
        "https://s3.example.com/b/k?X-Amz-Signature=ff&X-Amz-Credential=x done "
        "https://civitai.com/api/download/models/1?token=t0k3n end"
    )
    out = redact(line)
    assert "civitai-key" not in out and "whsec_abc123" not in out
    assert "X-Amz" not in out and "t0k3n" not in out
    assert "https://s3.example.com/b/k?[redacted] done" in out
    assert out.endswith("end")
