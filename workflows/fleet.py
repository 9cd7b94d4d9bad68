"""FleetWatchWorkflow: the deployment's one fleet watch (activities/fleet.py), for good.

Each worker makes sure it runs at startup (worker/main.py). It watches in rounds of an hour,
one long-lived heartbeating activity each, so its history grows by a few events an hour; a
worker that dies mid-round loses nothing: the round goes on on another worker from its last
heartbeat.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.fleet import FleetWatchActivities, FleetWatchInput

FLEET_WATCH_ID = "loratrain-fleet-watch"
ROUNDS_PER_EXECUTION = 24
# A worker that stops heartbeating hands the watch to another within this.
WATCH_HEARTBEAT_TIMEOUT = timedelta(minutes=1)
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)


@workflow.defn(name="FleetWatchWorkflow")
class FleetWatchWorkflow:
    @workflow.run
    async def run(self, watch: FleetWatchInput) -> None:
        for _ in range(ROUNDS_PER_EXECUTION):
            done = await workflow.execute_activity_method(
                FleetWatchActivities.watch_fleet,
                watch,
                start_to_close_timeout=timedelta(seconds=watch.round_s) + timedelta(minutes=10),
                heartbeat_timeout=WATCH_HEARTBEAT_TIMEOUT,
                retry_policy=RETRY_FOREVER,
                summary="watch the fleet",
            )
            watch = FleetWatchInput(seen=done.seen, round_s=watch.round_s)
        workflow.continue_as_new(watch)
