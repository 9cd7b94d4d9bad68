"""ruff and mypy are part of the suite, so CI fails on what they find."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every package of the project, tests and benchmarks included.
PACKAGES = [
    "workflows",
    "activities",
    "common",
    "worker",
    "relay",
    "client",
    "cli",
    "devstack",
    "gpu_runner",
    "tests",
    "bench",
]
# What mypy checks: the product, every room of it.
TYPED = [
    "workflows",
    "activities",
    "common",
    "worker",
    "relay",
    "client",
    "cli",
    "devstack",
    "gpu_runner",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean() -> None:
    check = run("ruff", "check", *PACKAGES)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = run("ruff", "format", "--check", *PACKAGES)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_is_clean() -> None:
    result = run("mypy", *TYPED)
    assert result.returncode == 0, result.stdout + result.stderr
