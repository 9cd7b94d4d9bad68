"""A fake Vast API served over HTTP, and a VastProvider pointed at it, for the Vast tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from common.settings import Settings

from .fakes.vast_api import VAST_LIMITS, FakeVast
from .http_support import serve_asgi

VAST_KEY = "vast-account-key-0123456789abcdef"
# Vast's rate limits shrunk for tests, in the fake (when it enforces them) and in the provider.
LIMIT_SCALE = 0.05


def scaled_limits(scale: float = LIMIT_SCALE) -> dict[str, Any]:
    """The provider's settings for Vast's documented limits times `scale`."""
    return {
        "vast_show_interval_s": VAST_LIMITS["show"] * scale,
        "vast_destroy_interval_s": VAST_LIMITS["destroy"] * scale,
        "vast_create_interval_s": VAST_LIMITS["create"] * scale,
        "vast_create_penalty_s": VAST_LIMITS["create_penalty"] * scale,
        "vast_list_interval_s": VAST_LIMITS["list"] * scale,
        "vast_searches_per_window": VAST_LIMITS["searches_per_minute"],
        "vast_search_window_s": 60.0 * scale,
    }


@contextlib.contextmanager
def fake_vast(
    settings: Settings, workdir: Path, offers: list[dict[str, Any]], **options: Any
) -> Iterator[tuple[FakeVast, Settings]]:
    """The fake on a free loopback port, and settings whose Vast provider talks to it.

    The provider keeps to Vast's limits times LIMIT_SCALE; the fake enforces them only with
    `limits=True`.
    """
    options.setdefault("limit_scale", LIMIT_SCALE)
    fake = FakeVast(api_key=VAST_KEY, offers=offers, workdir=workdir, **options)
    try:
        with serve_asgi(fake.app) as url:
            fake.base_url = url
            yield (
                fake,
                settings.model_copy(
                    update={
                        "gpu_provider": "vast",
                        "vast_api_key": SecretStr(VAST_KEY),
                        "vast_base_url": url,
                        # Fast tests: the fake's image is tiny and its boot instant.
                        "vast_image": "ghcr.io/loratrain/loratrain-gpu:test",
                        "vast_image_bytes": 1_000_000_000,
                        **scaled_limits(options["limit_scale"]),
                    }
                ),
            )
    finally:
        fake.close()


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
