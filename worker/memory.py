"""Memory settings for the long-lived worker process."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BUFFER_BYTES = 128 * 1024


def return_large_buffers_to_the_os() -> bool:
    """Keep buffers of 128 KB and more (S3 bodies, zip parts) out of malloc's heaps, so that
    freeing one gives its memory back to the system at once.

    By default glibc raises this threshold after the first such buffer is freed, up to 32 MB,
    after which large buffers come from the heaps (one per thread) and stay there once freed:
    a worker that had zipped 300 MB of images on 8 threads held about 100 MB more than before,
    against about 50 MB with the threshold fixed (bench P4). Returns False where the C library
    has no such setting (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
