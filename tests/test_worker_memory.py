"""The worker gives large freed buffers back to the system (worker.memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A process that allocates 100 buffers of 1 MB, each followed by a small object that stays: the
# pattern of S3 bodies and zip parts among the worker's own small objects. Prints how many MB
# malloc holds in mapped blocks of their own (given back to the system on free) while the
# buffers live, then how much of the 100 MB its RSS still holds once they are freed.
FREED_BUFFERS = """
import ctypes
import sys
from pathlib import Path
from worker.memory import return_large_buffers_to_the_os

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

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
mapped = libc.mallinfo2().hblkhd >> 20
del large
print(mapped, rss_mb() - before)
"""


def run_freed_buffers(mode: str) -> tuple[int, int]:
    """(MB in mapped blocks while held, MB of RSS still held after the free)."""
    # glibc's own defaults, whatever the machine's environment tunes.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "PYTHONMALLOC"))
    }
    done = subprocess.run(
        [sys.executable, "-c", FREED_BUFFERS, mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    mapped, held = done.stdout.split()
    return int(mapped), int(held)


def test_freed_large_buffers_leave_the_worker_process() -> None:
    mapped, held = run_freed_buffers("set")
    assert mapped >= 100
    assert held < 10
    # With malloc's defaults the same buffers come from its heap, which keeps them once freed
    # for as long as a small object above them lives: what the setting is for. (Whether the
    # heap's top is trimmed depends on the machine, so this reads where they were, not the RSS.)
    mapped, _ = run_freed_buffers("default")
    assert mapped < 10
