"""Asks the relay whether GPUs can reach the run: before a run calls a stall on a missing event,
it checks that the silence is not the relay's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel
from temporalio import activity

from common.http import tls_context

if TYPE_CHECKING:
    from common.settings import Settings


class RelayHealth(BaseModel):
    up: bool
    # Why it counts as down: unreachable, an HTTP error, or no connection to Temporal.
    detail: str = ""


class RelayActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn
    async def relay_health(self) -> RelayHealth:
        """GET the relay's /healthz at the address GPUs post to. Up means it answers 200 and is
        connected to Temporal, i.e. a runner's event would reach its run now."""
        if not self.settings.relay_health_check:
            return RelayHealth(up=True, detail="not checked (LORA_RELAY_HEALTH_CHECK=false)")
        url = (
            self.settings.relay_health_url
            or f"{self.settings.relay_public_url.rstrip('/')}/healthz"
        )
        try:
            # Well under the activity's own timeout, so a relay that drops packets reads as down.
            async with httpx.AsyncClient(
                timeout=min(5.0, self.settings.http_timeout_s), verify=tls_context()
            ) as client:
                response = await client.get(url)
        except httpx.HTTPError as e:
            return RelayHealth(up=False, detail=f"{url} unreachable: {type(e).__name__}")
        if response.status_code != 200:
            return RelayHealth(up=False, detail=f"{url} answered HTTP {response.status_code}")
        try:
            connected = bool(response.json().get("temporal_connected"))
        except ValueError:
            return RelayHealth(up=False, detail=f"{url} answered something other than JSON")
        if not connected:
            return RelayHealth(up=False, detail="the relay is not connected to Temporal")
        return RelayHealth(up=True)
