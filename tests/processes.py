"""A child process whose output a thread reads as it comes, so a test can wait for a line and
still get everything the process printed, before and after it.

Reading a text pipe line by line and then calling `communicate()` loses what Python's reader had
already buffered past the line: `communicate()` reads the raw pipe. One reader avoids that.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path


class Captured:
    """`Popen` with stdout and stderr merged and read by one thread into `output`."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._seen.append(line)
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def output(self) -> str:
        return "".join(self._seen)

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout_s: float) -> str:
        """The first line from here on that matches; fails with the output so far if the
        process exits first or no such line comes in time."""
        compiled = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {compiled.pattern!r} in {timeout_s} s:\n{self.output}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.proc.args!r} exited ({self.proc.wait()}) before a line matching "
                    f"{compiled.pattern!r}:\n{self.output}"
                )
            if compiled.search(line):
                return line

    def finish(self, timeout_s: float) -> str:
        """Everything it printed, once it has exited and its output is read to the end."""
        self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=30)
        return self.output

    def stop(self, how: signal.Signals = signal.SIGINT, timeout_s: float = 60) -> str:
        """Signals it as a user would and returns all its output once it has exited."""
        self.proc.send_signal(how)
        return self.finish(timeout_s)

    def kill(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.finish(timeout_s=30)
