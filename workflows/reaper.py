"""ReaperWorkflow: destroys every instance of this system whose run is closed or unknown.

Started by the Temporal Schedule `loratrain-reaper` (worker/main.py). A training run gives its
GPUs back itself; the reaper catches what escapes that (a terminated run, a lost worker, an
instance created by a call that then failed), so no paid GPU outlives its run for long.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.gpu import GpuActivities, InstanceRef, RunLookupActivities, RunRef
    from activities.providers.base import Instance, run_of_label

# Bounded: what is still failing is left for the next scheduled pass, not retried forever
# (the schedule skips a pass while this one still runs).
RETRY_A_FEW_TIMES = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)
REAP_INCOMPLETE = "ReapIncomplete"


class ReaperSummary(BaseModel):
    """What one pass saw and did; instance ids in the provider's listing order."""

    instances_seen: int = 0
    destroyed: list[str] = Field(default_factory=list)
    already_gone: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list, description="Instances of runs still open.")
    unsettled: list[str] = Field(
        default_factory=list, description="Left for the next pass: a lookup or destroy failed."
    )


@workflow.defn(name="ReaperWorkflow")
class ReaperWorkflow:
    @workflow.run
    async def run(self) -> ReaperSummary:
        """List labelled instances, keep those of open runs, destroy the rest."""
        instances = await workflow.execute_activity_method(
            GpuActivities.list_labelled_instances,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RETRY_A_FEW_TIMES,
        )
        by_run = self._group_by_run(instances)
        runs = list(by_run)
        open_states = await asyncio.gather(*(self._run_is_open(run) for run in runs))

        summary = ReaperSummary(instances_seen=len(instances))
        orphans: list[tuple[str, Instance]] = []
        for run, is_open in zip(runs, open_states, strict=True):
            ids = [instance.instance_id for instance in by_run[run]]
            if is_open is None:
                summary.unsettled.extend(ids)
            elif is_open:
                # Never touch an open run's GPUs: the run gives them back itself when it closes.
                summary.kept.extend(ids)
            else:
                orphans.extend((run.run_id, instance) for instance in by_run[run])

        outcomes = await asyncio.gather(*(self._destroy(run_id, i) for run_id, i in orphans))
        for (_, instance), destroyed in zip(orphans, outcomes, strict=True):
            if destroyed is None:
                summary.unsettled.append(instance.instance_id)
            elif destroyed:
                summary.destroyed.append(instance.instance_id)
            else:
                summary.already_gone.append(instance.instance_id)

        workflow.logger.info(
            "reaper: %d instance(s) seen, destroyed %s, kept %s, unsettled %s",
            summary.instances_seen,
            summary.destroyed,
            summary.kept,
            summary.unsettled,
        )
        if summary.unsettled:
            # Fails this pass visibly in the UI; everything else was still done above.
            raise ApplicationError(
                f"could not settle {len(summary.unsettled)} instance(s) {summary.unsettled}; "
                "the next scheduled pass tries again (see this run's activity failures)",
                summary.model_dump(mode="json"),
                type=REAP_INCOMPLETE,
                non_retryable=True,
            )
        return summary

    @staticmethod
    def _group_by_run(instances: list[Instance]) -> dict[RunRef, list[Instance]]:
        """Instances per run (its id and, on newer labels, which run of that id), in listing
        order (a dict, never a set: replay must agree)."""
        by_run: dict[RunRef, list[Instance]] = {}
        for instance in instances:
            run = run_of_label(instance.label)
            if run is not None:
                run_id, execution = run
                by_run.setdefault(RunRef(run_id=run_id, execution=execution), []).append(instance)
        return by_run

    @staticmethod
    async def _run_is_open(run: RunRef) -> bool | None:
        """Whether the run is open; None when Temporal could not tell (its instances stay)."""
        try:
            return await workflow.execute_activity_method(
                RunLookupActivities.run_is_open,
                run,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RETRY_A_FEW_TIMES,
            )
        except ActivityError:
            workflow.logger.warning("reaper: could not look up run %s", run.run_id, exc_info=True)
            return None

    @staticmethod
    async def _destroy(run_id: str, instance: Instance) -> bool | None:
        """True when destroyed, False when already gone, None when destroying failed."""
        try:
            return await workflow.execute_activity_method(
                GpuActivities.deallocate_gpu,
                InstanceRef(
                    run_id=run_id, provider=instance.provider, instance_id=instance.instance_id
                ),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RETRY_A_FEW_TIMES,
            )
        except ActivityError:
            workflow.logger.warning(
                "reaper: could not destroy instance %s of run %s",
                instance.instance_id,
                run_id,
                exc_info=True,
            )
            return None
