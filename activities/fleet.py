"""The fleet watch: one provider listing per interval for every run of the deployment.

Runs do not ask the provider about their own instance every few seconds (1,000 runs would be
50 calls a second, far past what Vast allows one API key). One long-lived activity lists the
deployment's instances once per `fleet_watch_interval_s` and tells only the runs whose host
exited or vanished from the listing; such a run asks the provider once to confirm, then
replaces its GPU. The activity heartbeats what it last saw, so the watch resumes where it was on
another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from common.settings import Settings

from .gpu import GpuActivities
from .providers.base import Instance, parse_label

HOST_DOWN_SIGNAL = "host_down"
# A host still down (a run that has not replaced it yet, or one closed and left to the
# reaper) is told again this often, not at every pass.
RETELL_AFTER_S = 120.0
SIGNAL_RPC_TIMEOUT = timedelta(seconds=10)

log = logging.getLogger("loratrain.fleet")


class HostDown(BaseModel):
    """What the fleet watch saw of one run's host: exited, or gone from the listing."""

    instance_id: str
    state: str
    message: str | None = None


class WatchedHost(BaseModel):
    instance_id: str
    run_id: str
    state: str
    message: str | None = None


class FleetWatchInput(BaseModel):
    # What the last pass of the previous round saw: an instance listed then and missing now
    # is gone.
    seen: list[WatchedHost] = Field(default_factory=list)
    # How long this round watches before the workflow starts the next (its history stays
    # a few events per round).
    round_s: float = 3600.0


class FleetWatchRound(BaseModel):
    seen: list[WatchedHost] = Field(default_factory=list)
    passes: int = 0
    hosts_reported: int = 0


class FleetWatchActivities:
    def __init__(self, client: Client, gpu: GpuActivities, settings: Settings) -> None:
        self.client = client
        self.gpu = gpu
        self.settings = settings

    @activity.defn
    async def watch_fleet(self, input: FleetWatchInput) -> FleetWatchRound:
        """List the deployment's instances every interval for one round; tell each run whose
        host exited or went, once per RETELL_AFTER_S."""
        details = activity.info().heartbeat_details
        result = FleetWatchRound.model_validate(details[0]) if details else None
        result = result or FleetWatchRound(seen=input.seen)
        told: dict[tuple[str, str], float] = {}
        ends_at = time.monotonic() + input.round_s
        interval_s = self.settings.fleet_watch_interval_s
        while True:
            started = time.monotonic()
            try:
                instances = await asyncio.to_thread(self.gpu.list_labelled_instances)
            except Exception:
                # The next pass asks again; a run's own rare check still stands behind this.
                log.warning("fleet watch: listing the instances failed", exc_info=True)
            else:
                down = _hosts_down(result.seen, instances)
                result.seen = _watched(instances)
                result.passes += 1
                now = time.monotonic()
                for host in down:
                    key = (host.run_id, host.instance_id)
                    if now - told.get(key, -RETELL_AFTER_S) >= RETELL_AFTER_S:
                        told[key] = now
                        result.hosts_reported += 1
                        await self._tell(host)
            activity.heartbeat(result.model_dump(mode="json"))
            if time.monotonic() >= ends_at:
                return result
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def _tell(self, host: WatchedHost) -> None:
        log.info("fleet watch: run %s: instance %s %s", host.run_id, host.instance_id, host.state)
        handle = self.client.get_workflow_handle(host.run_id)
        try:
            await handle.signal(
                HOST_DOWN_SIGNAL,
                HostDown(instance_id=host.instance_id, state=host.state, message=host.message),
                rpc_timeout=SIGNAL_RPC_TIMEOUT,
            )
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:  # closed: the reaper's business now
                log.warning("fleet watch: could not tell run %s: %s", host.run_id, e.message)


def _watched(instances: list[Instance]) -> list[WatchedHost]:
    watched = []
    for instance in instances:
        label = parse_label(instance.label)
        if label is not None:
            watched.append(
                WatchedHost(
                    instance_id=instance.instance_id,
                    run_id=label.run_id,
                    state=instance.state,
                    message=instance.message,
                )
            )
    return watched


def _hosts_down(seen: list[WatchedHost], instances: list[Instance]) -> list[WatchedHost]:
    """Hosts listed as exited or gone now, and those listed before and missing now."""
    current = {host.instance_id: host for host in _watched(instances)}
    down = [host for host in current.values() if host.state in ("exited", "gone")]
    down += [
        WatchedHost(instance_id=host.instance_id, run_id=host.run_id, state="gone")
        for host in seen
        if host.instance_id not in current and host.state not in ("exited", "gone")
    ]
    return down
