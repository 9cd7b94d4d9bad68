"""A user's webhook endpoint for tests: records every delivery and checks its Standard Webhooks
signature against the user's secret.

    receiver = WebhookReceiver(secret="whsec_...")
    with serve_asgi(receiver.app) as base_url:
        ...  # POST to f"{base_url}/hooks" (any path is accepted)
        event = receiver.wait_for(1)[0]
        assert event.verified and event.json["type"] == "training.completed"

`respond_with` scripts the status codes answered, one per delivery, e.g. [500, 200] to make a sender
retry once; once the script runs out every delivery gets `default_status`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpu_runner.protocol import SignatureError, verify_payload


@dataclass(frozen=True)
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    verified: bool
    verify_error: str | None
    answered: int

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def type(self) -> str | None:
        return self.json.get("type") if isinstance(self.json, dict) else None


@dataclass
class WebhookReceiver:
    secret: str | None = field(default=None, repr=False)
    respond_with: list[int] = field(default_factory=list)
    default_status: int = 200
    events: list[ReceivedWebhook] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST", "PUT"])])

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = False
        error: str | None = "no secret configured"
        if self.secret is not None:
            try:
                verify_payload(self.secret, headers, body)
                verified, error = True, None
            except SignatureError as e:
                error = str(e)
        try:
            parsed: Any | None = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = None
        with self._changed:
            status = self.respond_with.pop(0) if self.respond_with else self.default_status
            self.events.append(
                ReceivedWebhook(
                    path=request.url.path,
                    headers=headers,
                    body=body,
                    json=parsed,
                    verified=verified,
                    verify_error=error,
                    answered=status,
                )
            )
            self._changed.notify_all()
        return Response(status_code=status)

    def accepted(self) -> list[ReceivedWebhook]:
        """Deliveries answered 2xx, once per webhook-id (what a deduplicating receiver keeps)."""
        seen: dict[str | None, ReceivedWebhook] = {}
        for event in list(self.events):
            if 200 <= event.answered < 300:
                seen.setdefault(event.webhook_id, event)
        return list(seen.values())

    def of_type(self, *types: str) -> list[ReceivedWebhook]:
        return [e for e in list(self.events) if e.type in types]

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedWebhook]:
        """Block until at least `count` deliveries arrived (for sync tests)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {count} webhooks, got {len(self.events)}")
                self._changed.wait(left)
            return list(self.events)

    async def wait_for_async(
        self, count: int, timeout_s: float = 10.0, types: Iterable[str] | None = None
    ) -> list[ReceivedWebhook]:
        """Wait without blocking the event loop until `count` deliveries (of `types`) arrived."""
        wanted = set(types) if types is not None else None
        deadline = time.monotonic() + timeout_s
        while True:
            events = [e for e in list(self.events) if wanted is None or e.type in wanted]
            if len(events) >= count:
                return events
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {count} webhooks, got {len(events)}")
            await asyncio.sleep(0.02)
