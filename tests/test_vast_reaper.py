"""The reaper on a Vast account shared by two deployments: one pass destroys this deployment's
orphans and nothing else (not a live run's GPU, not the other deployment's instances)."""

from __future__ import annotations

import uuid
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from activities.providers.base import instance_label
from activities.providers.vast import VastProvider
from common.settings import Settings
from workflows.models import GpuRequirements

from .fakes.vast_api import make_offer
from .test_reaper import FinishedRun, OpenRun, reap, stand_in_runs
from .vast_support import fake_vast
from .workflow_support import SLEEPING_RUNNER, running_worker

JOB_URL = "http://unused.invalid/job"


async def test_one_pass_destroys_this_deployments_orphans_only(
    time_skipping_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    client = time_skipping_env.client
    runs_queue = f"{settings.task_queue}-runs"
    finished_run = f"run-finished-{uuid.uuid4().hex[:8]}"
    open_run = f"run-open-{uuid.uuid4().hex[:8]}"
    never_started = f"run-unknown-{uuid.uuid4().hex[:8]}"
    offers = [make_offer(i) for i in range(1, 6)]
    with fake_vast(settings, tmp_path, offers, runner_command=SLEEPING_RUNNER) as (fake, s):
        ours = VastProvider(s)
        neighbour_settings = s.model_copy(update={"deployment": "staging.loratrain"})
        theirs = VastProvider(neighbour_settings)
        assert s.deployment_name != neighbour_settings.deployment_name
        gpu = GpuRequirements()

        def rent(provider: VastProvider, deployment: str, run_id: str) -> str:
            label = instance_label(deployment, run_id, 1)
            return provider.create(label, JOB_URL, gpu).instance_id

        async with (
            stand_in_runs(client, runs_queue),
            running_worker(client, s, ours),  # type: ignore[arg-type]
        ):
            with time_skipping_env.auto_time_skipping_disabled():
                await client.execute_workflow(
                    FinishedRun.run, id=finished_run, task_queue=runs_queue
                )
                live = await client.start_workflow(OpenRun.run, id=open_run, task_queue=runs_queue)
                orphan_finished = rent(ours, s.deployment_name, finished_run)
                orphan_unknown = rent(ours, s.deployment_name, never_started)
                still_training = rent(ours, s.deployment_name, open_run)
                # The other deployment's instances: orphans by our runs' ids, still not ours.
                other_finished = rent(theirs, neighbour_settings.deployment_name, finished_run)
                other_unknown = rent(theirs, neighbour_settings.deployment_name, never_started)

                summary = await reap(client, s)

                await live.signal(OpenRun.finish)
                await live.result()

    assert sorted(summary.destroyed) == sorted([orphan_finished, orphan_unknown])
    assert summary.kept == [still_training]
    assert summary.instances_seen == 3  # the other deployment's are not even looked at
    assert sorted(fake.destroyed_ids()) == sorted(int(i) for i in (orphan_finished, orphan_unknown))
    alive = sorted(str(i.id) for i in fake.live())
    assert alive == sorted([still_training, other_finished, other_unknown])
