"""ruff and mypy are part of the suite, so CI fails on what they find."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_import_graph import PRODUCT

ROOT = Path(__file__).resolve().parent.parent
# What mypy checks: the product, every room of it (the import graph test's list).
TYPED = PRODUCT
# What ruff checks: every package of the project, tests and benchmarks included.
PACKAGES = [*PRODUCT, "tests", "bench"]


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
