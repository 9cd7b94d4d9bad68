"""One logging setup for the long-running processes (worker, relay): timestamps and levels."""

from __future__ import annotations

import logging
import time

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def configure_logging(level: int = logging.INFO) -> None:
    """INFO and up to stderr, one line each, UTC timestamps with milliseconds.

    Replaces any handlers already on the root logger, so a library's earlier setup (or none at
    all, where Python prints only warnings) cannot hide the INFO lines.
    """
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
