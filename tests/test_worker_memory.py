"""The worker gives large freed buffers back to the system (worker.memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A process that frees 100 buffers of 1 MB, each followed by a small object that stays: the
# pattern of S3 bodies and zip parts among the worker's own small objects. Prints how much of
# the 100 MB its RSS still holds.
FREED_BUFFERS = """
import sys
from pathlib import Path
from worker.memory import return_large_buffers_to_the_os

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

if sys.argv[1] == "set":
    assert return_large_buffers_to_the_os()
first = bytes(1024 * 1024)
del first  # without the setting, glibc raises its mmap threshold past 1 MB here
before = rss_mb()
large, small = [], []
for _ in range(100):
    large.append(bytearray(1024 * 1024))
    small.append(bytearray(100))
del large
print(rss_mb() - before)
"""


def held_mb(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FREED_BUFFERS, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_freed_large_buffers_leave_the_worker_process() -> None:
    assert held_mb("set") < 10
    # The same process with malloc's defaults keeps most of them: what the setting is for.
    assert held_mb("default") > 50
