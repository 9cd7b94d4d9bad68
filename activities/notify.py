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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from common.http import tls_context
from gpu_runner.protocol import sign_payload
from workflows.models import UserEventType

if TYPE_CHECKING:
    from common.settings import Settings

USER_AGENT = "loratrain-webhooks/1"

# Cloud metadata services: they hand out the machine's credentials to whoever asks from inside.
# Refused even where private addresses are allowed (the embedded stack), like all of link-local.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, Oracle, DigitalOcean, ...
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("168.63.129.16"),  # Azure WireServer
    }
)
_NAT64 = IPv6Network("64:ff9b::/96")
# Local-use NAT64 (RFC 8215) is not global, though Python 3.11's tables say it is.
_LOCAL_NAT64 = IPv6Network("64:ff9b:1::/48")
_IPV4_TRANSLATED = IPv6Network("::ffff:0:0:0/96")


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


def webhook_body(
    input: UserWebhookInput,
    occurred_at: datetime,
    presign: Callable[[str], str] | None = None,
) -> bytes:
    """The exact bytes POSTed (and signed) for one user event. A saved epoch's files get a
    presigned GET `url` each (made at sending time: no URL is ever in the run's history)."""
    data = input.payload
    if input.event_type == "training.epoch" and presign is not None:
        data = {
            **data,
            "lora": {**data["lora"], "url": presign(data["lora"]["key"])},
            "samples": [{**f, "url": presign(f["key"])} for f in data.get("samples", [])],
        }
    body = {
        "type": input.event_type,
        "run_id": input.run_id,
        "timestamp": occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")


class NotifyActivities:
    def __init__(self, settings: Settings, presigner: Any = None) -> None:
        """`presigner`: an S3 client that signs GETs of the run's files for the user (None:
        epoch webhooks carry keys without URLs)."""
        self.settings = settings
        self._presigner = presigner

    def _presign(self, key: str) -> str:
        url: str = self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.settings.bucket, "Key": key},
            ExpiresIn=self.settings.download_url_ttl_s,
        )
        return url

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
        body = webhook_body(
            input, occurred_at, self._presign if self._presigner is not None else None
        )
        headers = {**sign_payload(input.secret, input.msg_id, body), "user-agent": USER_AGENT}
        where = _safe_url(input.url)
        urls, host = await self._pinned_destination(input, where)
        headers["host"] = host
        extensions = {"sni_hostname": urlsplit(input.url).hostname}
        try:
            async with httpx.AsyncClient(
                timeout=self.settings.http_timeout_s, follow_redirects=False, verify=tls_context()
            ) as client:
                response = await _post_to_first_reachable(
                    client, urls, content=body, headers=headers, extensions=extensions
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
    ) -> tuple[list[str], str]:
        """The URLs to try, one per checked address of the host, and the Host they stand for;
        refuses what the worker must never call (SSRF).

        Outside the embedded stack the URL must be https and every address its host resolves
        to must be public; link-local and cloud metadata addresses are refused everywhere (see
        `refusal_reason`). Requests go to the checked addresses themselves (TLS still verifies
        the host name), so a DNS answer that changes after the check cannot redirect them.
        """
        parts = urlsplit(input.url)
        if parts.scheme != "https" and not self.settings.webhook_allow_http:
            raise _refused(input, where, "only https webhook URLs are allowed")
        host = parts.hostname
        if not host:
            raise _refused(input, where, "the URL has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            # Also turns the spellings of a literal (2852039166, 0251.0376.0251.0376) into the
            # address a connection would really reach.
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as e:
            raise ApplicationError(
                f"{input.event_type} webhook to {where}: cannot resolve {host}: {e}; will retry",
                type="WebhookDeliveryFailed",
            ) from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        if not addresses:
            raise _refused(input, where, f"{host} resolves to no address")
        allow_private = self.settings.webhook_allow_private_addresses
        for address in addresses:
            reason = refusal_reason(address, allow_private=allow_private)
            if reason is not None:
                resolved = "" if _is_literal(host) else f"{host} resolves to {address}: "
                raise _refused(input, where, f"{resolved}{reason}")
        pinned = [
            parts._replace(netloc=f"{_url_host(str(address))}:{port}").geturl()
            for address in addresses
        ]
        netloc = _url_host(host) if parts.port is None else f"{_url_host(host)}:{parts.port}"
        return pinned, netloc


def refusal_reason(
    address: IPv4Address | IPv6Address | str, *, allow_private: bool = False
) -> str | None:
    """Why the worker must not send a webhook to `address`, or None when it may.

    The address and every IPv4 address embedded in it (IPv4-mapped and -compatible, NAT64,
    6to4, Teredo), which a translator or tunnel on the way would really reach, must be global.
    `allow_private` (the embedded stack) lets loopback and private ones through, never
    link-local or cloud metadata addresses.
    """
    address = ipaddress.ip_address(address)
    # The embedded addresses first: the message then names the one a connection would reach.
    for embedded, form in [*_embedded_ipv4(address), (address, None)]:
        kind = _never_allowed(embedded)
        if kind is None and not allow_private and not _is_global(embedded):
            kind = _non_global_kind(embedded)
        if kind is not None:
            if form is None:
                return f"{address} is a non-public address ({kind})"
            return f"{address} embeds {embedded} ({form}), a non-public address ({kind})"
    return None


def _embedded_ipv4(address: IPv4Address | IPv6Address) -> list[tuple[IPv4Address, str]]:
    if isinstance(address, IPv4Address):
        return []
    low32 = IPv4Address(int(address) & 0xFFFFFFFF)
    found: list[tuple[IPv4Address, str]] = []
    if address.ipv4_mapped is not None:
        found.append((address.ipv4_mapped, "IPv4-mapped"))
    if int(address) >> 32 == 0 and int(address) > 1:  # :: and ::1 are not IPv4-compatible
        found.append((low32, "IPv4-compatible"))
    if address in _IPV4_TRANSLATED:
        found.append((low32, "IPv4-translated"))
    if address in _NAT64:
        found.append((low32, "NAT64"))
    if address in _LOCAL_NAT64:
        found.append((low32, "local-use NAT64"))
    if address.sixtofour is not None:
        found.append((address.sixtofour, "6to4"))
    if address.teredo is not None:
        server, client = address.teredo
        found += [(server, "Teredo server"), (client, "Teredo client")]
    return found


def _never_allowed(address: IPv4Address | IPv6Address) -> str | None:
    # Compared by value: a zone (fd00:ec2::254%eth0) must not make it a different address.
    if type(address)(int(address)) in METADATA_ADDRESSES:
        return "cloud metadata service"
    if address.is_link_local:
        return "link-local"
    return None


def _is_global(address: IPv4Address | IPv6Address) -> bool:
    return address.is_global and address not in _LOCAL_NAT64


def _non_global_kind(address: IPv4Address | IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private or reserved"
    return "not globally routable"


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _post_to_first_reachable(
    client: httpx.AsyncClient, urls: list[str], **request: Any
) -> httpx.Response:
    """POSTs to each URL in turn until one connects (a name may have an IPv6 and an IPv4
    address, only one listening); a failed connection sent nothing, so moving on cannot
    deliver twice."""
    for url in urls[:-1]:
        try:
            return await client.post(url, **request)
        except httpx.ConnectError:
            continue
    return await client.post(urls[-1], **request)


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
