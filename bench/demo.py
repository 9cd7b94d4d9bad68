"""P8: `loratrain demo` end to end as a user runs it (install excluded): a process of its own,
its own LORA_STATE_DIR and free ports. The first demo in a state dir also builds the tiny model;
the second reuses it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Row
from devstack.stack import free_local_s3_ports

TARGET_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stack_env(state: Path) -> dict[str, str]:
    """Every port of the embedded stack moved onto a free one (as tests/test_cli.py does)."""
    temporal, ui, relay = (free_port() for _ in range(3))
    s3 = free_local_s3_ports()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    return {
        **inherited,
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
        "LORA_STATE_DIR": str(state),
        "LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal}",
        "LORA_TEMPORAL_UI_URL": f"http://127.0.0.1:{ui}",
        "LORA_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3.s3}",
        "LORA_LOCAL_S3_INTERNAL_PORT": str(s3.internal),
        "LORA_RELAY_PORT": str(relay),
        "LORA_RELAY_PUBLIC_URL": f"http://127.0.0.1:{relay}",
    }


def _demo(cwd: Path, state: Path) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo"],
        cwd=cwd,
        env=_stack_env(state),
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"demo exited {done.returncode}: {done.stdout[-2000:]}")
    took = re.search(r"^took (.+)$", done.stdout, re.MULTILINE)
    return wall, took.group(1) if took else "(no timing line)"


def p8_demo_wall_time() -> Row:
    with tempfile.TemporaryDirectory(prefix="bench-p8-") as tmp:
        work = Path(tmp)
        state = work / "state"
        first, first_parts = _demo(work, state)
        second, second_parts = _demo(work, state)
    return Row(
        "P8",
        "`loratrain demo` end to end, fresh state dir (tiny model built), install excluded",
        f"{first:.0f} s",
        f"second demo, model reused: {second:.0f} s",
        f"{first / TARGET_S:.2f} x the target",
        "< 120 s",
        first < TARGET_S,
        f"first demo's parts: {first_parts}; second: {second_parts}",
    )
