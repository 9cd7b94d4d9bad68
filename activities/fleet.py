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
HEARTBEAT_S = 10.0

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
    # Passes in a row that did not list it: gone only at 2 (one short listing is not enough).
    missed: int = 0


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
        heartbeats = asyncio.create_task(_heartbeat_every(HEARTBEAT_S, result))
        try:
            while True:
                started = time.monotonic()
                try:
                    instances = await asyncio.to_thread(self.gpu.list_labelled_instances)
                except Exception:
                    # The next pass asks again; a run's own rare check still stands behind it.
                    log.warning("fleet watch: listing the instances failed", exc_info=True)
                else:
                    down, result.seen = _hosts_down(result.seen, instances)
                    result.passes += 1
                    now = time.monotonic()
                    news = []
                    for host in down:
                        key = (host.run_id, host.instance_id)
                        if now - told.get(key, -RETELL_AFTER_S) >= RETELL_AFTER_S:
                            told[key] = now
                            news.append(host)
                    result.hosts_reported += len(news)
                    await asyncio.gather(*(self._tell(host) for host in news))
                if time.monotonic() >= ends_at:
                    return result
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        finally:
            heartbeats.cancel()

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


async def _heartbeat_every(every_s: float, result: FleetWatchRound) -> None:
    """The round's heartbeat, whatever one listing takes (a provider call waiting its turn at
    Vast's pace can take longer than the heartbeat timeout): what it saw last goes with it."""
    while True:
        activity.heartbeat(result.model_dump(mode="json"))
        await asyncio.sleep(every_s)


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


def _hosts_down(
    seen: list[WatchedHost], instances: list[Instance]
) -> tuple[list[WatchedHost], list[WatchedHost]]:
    """(hosts down, what to remember for the next pass): hosts listed as exited or gone now,
    and those listed alive before and missing from two listings in a row."""
    current = _watched(instances)
    listed = {host.instance_id for host in current}
    down = [host for host in current if host.state in ("exited", "gone")]
    remembered = list(current)
    for host in seen:
        if host.instance_id in listed or host.state in ("exited", "gone"):
            continue
        missing = host.model_copy(update={"missed": host.missed + 1})
        if missing.missed >= 2:
            down.append(missing.model_copy(update={"state": "gone"}))
        else:
            remembered.append(missing)
    return down, remembered
