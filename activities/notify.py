"""Signed webhooks to the user's endpoint (Standard Webhooks, the user's secret).

The body follows the Standard Webhooks payload convention, `{"type", "timestamp", "data"}`, plus
the run id: `{"type": "training.completed", "run_id": "...", "timestamp": "<ISO 8601>",
"data": {...}}`. The `webhook-id` header is the same on every retry of one event, so receivers
can deduplicate.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from gpu_runner.protocol import sign_payload
from workflows.models import UserEventType

if TYPE_CHECKING:
    from worker.settings import Settings

USER_AGENT = "loratrain-webhooks/1"


class UserWebhookInput(BaseModel):
    run_id: str
    url: str
    secret: str = Field(repr=False)
    msg_id: str
    event_type: UserEventType
    payload: dict[str, Any]
    occurred_at: datetime | None = Field(
        default=None, description="When the event happened; None: when it is first sent."
    )


def webhook_body(input: UserWebhookInput, occurred_at: datetime) -> bytes:
    """The exact bytes POSTed (and signed) for one user event."""
    body = {
        "type": input.event_type,
        "run_id": input.run_id,
        "timestamp": occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": input.payload,
    }
    return json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")


class NotifyActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn
    async def send_user_webhook(self, input: UserWebhookInput) -> None:
        """POST one signed event to the user's URL.

        2xx: delivered. 408, 429, 5xx, timeouts and connection errors: retryable
        `WebhookDeliveryFailed` (the workflow retries for up to a day). Any other answer:
        non-retryable `WebhookRejected`.
        """
        # A retry resends the body with the first attempt's timestamp only when the workflow
        # gives one; the signature's own timestamp is always fresh (5 minute tolerance).
        occurred_at = input.occurred_at or datetime.now(UTC)
        body = webhook_body(input, occurred_at)
        headers = {**sign_payload(input.secret, input.msg_id, body), "user-agent": USER_AGENT}
        where = _safe_url(input.url)
        try:
            async with httpx.AsyncClient(
                timeout=self.settings.http_timeout_s, follow_redirects=False
            ) as client:
                response = await client.post(input.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise ApplicationError(
                f"{input.event_type} webhook to {where} timed out after "
                f"{self.settings.http_timeout_s}s; will retry",
                type="WebhookDeliveryFailed",
            ) from None
        except httpx.HTTPError as e:
            raise ApplicationError(
                f"{input.event_type} webhook to {where} failed: {type(e).__name__}: {e}; "
                "will retry",
                type="WebhookDeliveryFailed",
            ) from None

        status = response.status_code
        if 200 <= status < 300:
            activity.logger.info(
                "delivered %s webhook %s to %s (HTTP %s)",
                input.event_type,
                input.msg_id,
                where,
                status,
            )
            return
        answer = f"{input.event_type} webhook to {where} answered HTTP {status}"
        if status in (408, 429) or status >= 500:
            raise ApplicationError(
                f"{answer}; will retry",
                type="WebhookDeliveryFailed",
                next_retry_delay=_retry_after(response),
            )
        hint = " (redirects are not followed: configure the final URL)" if status < 400 else ""
        raise ApplicationError(
            f"{answer}{hint}: {response.text[:200]}".rstrip(": "),
            type="WebhookRejected",
            non_retryable=True,
        )


def _safe_url(url: str) -> str:
    """The URL without query or userinfo, which may hold tokens, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _retry_after(response: httpx.Response) -> timedelta | None:
    value = response.headers.get("retry-after", "")
    if value.isdigit():
        return timedelta(seconds=min(int(value), 3600)) or None
    return None
