"""Signed webhooks to the user's endpoint (Standard Webhooks, the user's secret).

The body follows the Standard Webhooks payload convention, `{"type", "timestamp", "data"}`, plus
the run id: `{"type": "training.completed", "run_id": "...", "timestamp": "<ISO 8601>",
"data": {...}}`. The `webhook-id` header is the same on every retry of one event, so receivers
can deduplicate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
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
        url, host = await self._pinned_destination(input, where)
        extensions: dict[str, Any] = {}
        if host is not None:
            headers["host"] = host
            extensions["sni_hostname"] = urlsplit(input.url).hostname
        try:
            async with httpx.AsyncClient(
                timeout=self.settings.http_timeout_s, follow_redirects=False
            ) as client:
                response = await client.post(
                    url, content=body, headers=headers, extensions=extensions
                )
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
        # The answer's body stays out of the error: it would land in workflow history.
        raise ApplicationError(f"{answer}{hint}", type="WebhookRejected", non_retryable=True)

    async def _pinned_destination(
        self, input: UserWebhookInput, where: str
    ) -> tuple[str, str | None]:
        """The URL to connect to and the Host it stands for; refuses what the worker must never
        call (SSRF).

        Outside the embedded stack the URL must be https and every address its host resolves
        to must be public. The request then goes to the checked address itself (TLS still
        verifies the host name), so a DNS answer that changes after the check cannot redirect it.
        """
        parts = urlsplit(input.url)
        if parts.scheme != "https" and not self.settings.webhook_allow_http:
            raise _refused(input, where, "only https webhook URLs are allowed")
        host = parts.hostname or ""
        if self.settings.webhook_allow_private_addresses:
            return input.url, None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as e:
            raise ApplicationError(
                f"{input.event_type} webhook to {where}: cannot resolve {host}: {e}; will retry",
                type="WebhookDeliveryFailed",
            ) from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        private = [str(a) for a in addresses if not a.is_global]
        if private or not addresses:
            raise _refused(
                input, where, f"{host} resolves to a non-public address ({', '.join(private)})"
            )
        address = addresses[0]
        literal = f"[{address}]" if address.version == 6 else str(address)
        pinned = parts._replace(netloc=f"{literal}:{port}").geturl()
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return pinned, netloc


def _refused(input: UserWebhookInput, where: str, reason: str) -> ApplicationError:
    return ApplicationError(
        f"{input.event_type} webhook to {where} refused: {reason}",
        type="WebhookRefused",
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
