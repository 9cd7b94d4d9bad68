"""The Temporal worker process: every workflow and activity of loratrain on one task queue."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.worker import PollerBehaviorAutoscaling, Worker

from activities.civitai import ModelActivities
from activities.fleet import FleetWatchActivities, FleetWatchInput
from activities.gpu import GpuActivities, RunLookupActivities
from activities.notify import NotifyActivities
from activities.providers.base import GpuProvider
from activities.relay import RelayActivities
from activities.storage import StorageActivities
from common.logs import configure_logging
from common.s3 import s3_client
from common.settings import Settings
from common.temporal import connect_client
from workflows.fleet import FLEET_WATCH_ID, FleetWatchWorkflow
from workflows.notify import UserWebhookWorkflow
from workflows.reaper import ReaperWorkflow
from workflows.training import TrainingWorkflow

from .memory import return_large_buffers_to_the_os
from .shared_code import share_workflow_code

log = logging.getLogger("loratrain.worker")

WORKFLOWS: list[type] = [TrainingWorkflow, UserWebhookWorkflow, ReaperWorkflow, FleetWatchWorkflow]

REAPER_SCHEDULE_ID = "loratrain-reaper"
# Cheap (one list call when nothing is orphaned), so a terminated run's GPU goes within a minute.
REAPER_INTERVAL = timedelta(minutes=1)
# A pass that hangs must not block the reaper forever (the schedule skips while one runs).
REAPER_RUN_TIMEOUT = timedelta(minutes=30)
SCHEDULE_RPC_TIMEOUT = timedelta(seconds=10)


class ProviderConfigError(ValueError):
    """The GPU provider cannot work with these settings; the message says what to set."""


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def vast_settings_problem(settings: Settings) -> str | None:
    """Why the Vast provider cannot work with these settings (one line), or None."""
    if settings.vast_api_key is None:
        return "LORA_VAST_API_KEY is not set: the Vast provider rents GPUs with it"
    # A GPU on Vast fetches its job and files from S3 and reports to the relay over the
    # internet: an address only this machine answers would strand every run.
    for name, url in (
        ("LORA_S3_PUBLIC_ENDPOINT_URL", settings.s3_public_endpoint_url),
        ("LORA_RELAY_PUBLIC_URL", settings.relay_public_url),
    ):
        if not url:
            return f"{name} is not set: Vast GPUs need an address they can reach over the internet"
        host = urlsplit(url).hostname
        if not host:
            return f"{name}={url!r} is not an http(s) URL"
        if _is_loopback(host):
            return (
                f"{name}={url} is a loopback address that Vast GPUs cannot reach; set it to "
                "an address reachable from the internet"
            )
    return None


def gpu_provider(settings: Settings) -> GpuProvider:
    """The provider LORA_GPU_PROVIDER names; ProviderConfigError when it cannot work."""
    if settings.gpu_provider == "local":
        from activities.providers.local import LocalProvider

        return LocalProvider(settings)
    problem = vast_settings_problem(settings)
    if problem is not None:
        raise ProviderConfigError(problem)
    from activities.providers.vast import VastProvider

    return VastProvider(settings)


def activities_for(settings: Settings, provider: GpuProvider | None = None) -> list[Any]:
    """Every activity, bound to clients built from `settings`."""
    s3 = s3_client(settings)
    public_endpoint = settings.s3_public_endpoint_url
    presigner = s3_client(settings, public_endpoint) if public_endpoint else None
    storage = StorageActivities(s3, settings, presigner)
    models = ModelActivities(s3, settings, presigner)
    gpu = GpuActivities(provider or gpu_provider(settings), settings)
    notify = NotifyActivities(settings, presigner or s3)
    relay = RelayActivities(settings)
    return [
        storage.validate_images,
        storage.build_images_zip,
        storage.write_job_spec,
        storage.verify_upload,
        storage.delete_job_specs,
        models.resolve_model,
        gpu.allocate_gpu,
        gpu.get_gpu_instance,
        gpu.deallocate_gpu,
        gpu.release_run_gpus,
        gpu.list_labelled_instances,
        notify.send_user_webhook,
        relay.relay_health,
    ]


def build_worker(
    client: Client,
    settings: Settings,
    executor: ThreadPoolExecutor,
    provider: GpuProvider | None = None,
    **worker_options: Any,
) -> Worker:
    """The worker for `settings`; `worker_options` go to temporalio's Worker as they are."""
    provider = provider or gpu_provider(settings)
    fleet = FleetWatchActivities(client, GpuActivities(provider, settings), settings)
    # Pollers follow the backlog, as the server advises, instead of the SDK's fixed five per
    # kind, of which one polls for new runs' first workflow tasks: at 10 run starts a second
    # that one poller left tasks waiting 14 s on average, and every status query of a run with
    # a task waiting waits too (bench P6).
    worker_options.setdefault("workflow_task_poller_behavior", PollerBehaviorAutoscaling())
    worker_options.setdefault("activity_task_poller_behavior", PollerBehaviorAutoscaling())
    share_workflow_code()  # one copy of the workflows' code for every cached run's sandbox
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=[
            *activities_for(settings, provider),
            RunLookupActivities(client).run_is_open,
            fleet.watch_fleet,
        ],
        activity_executor=executor,
        max_concurrent_activities=32,
        max_cached_workflows=settings.worker_max_cached_workflows,
        **worker_options,
    )


async def run_worker(settings: Settings) -> None:
    """Run the worker until cancelled (Ctrl-C)."""
    configure_logging()
    return_large_buffers_to_the_os()
    # Refuse a provider that cannot work before connecting to anything.
    provider = gpu_provider(settings)
    client = await connect_client(settings)
    try:
        await ensure_reaper_schedule(client, settings)
    except Exception:
        # The worker is still useful without it; the next worker start tries again.
        log.exception("could not create or update the reaper schedule %s", REAPER_SCHEDULE_ID)
    keeping = asyncio.create_task(keep_fleet_watch(client, settings), name="keep-fleet-watch")
    try:
        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="activity") as executor:
            worker = build_worker(client, settings, executor, provider)
            log.info(
                "worker polling task queue %s at %s",
                settings.task_queue,
                settings.temporal_address,
            )
            try:
                await worker.run()
            except asyncio.CancelledError:
                await worker.shutdown()
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping


async def keep_fleet_watch(client: Client, settings: Settings) -> None:
    """Start the fleet watch now, and again within `fleet_watch_ensure_s` whenever it is not
    running (an operator terminated it, or it failed): one start call per interval, which
    finds the running watch and changes nothing. Runs without a watch still look at their own
    instance every 10 minutes."""
    while True:
        try:
            await ensure_fleet_watch(client, settings)
        except Exception:
            log.exception("could not start the fleet watch %s", fleet_watch_id(settings))
        await asyncio.sleep(settings.fleet_watch_ensure_s)


def reaper_schedule(settings: Settings) -> Schedule:
    """ReaperWorkflow every REAPER_INTERVAL on the worker's task queue, one pass at a time."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ReaperWorkflow.run,
            id=REAPER_SCHEDULE_ID,
            task_queue=settings.task_queue,
            execution_timeout=REAPER_RUN_TIMEOUT,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=REAPER_INTERVAL)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_reaper_schedule(client: Client, settings: Settings) -> ScheduleHandle:
    """Create the reaper's schedule, or bring an existing one up to date; safe to call often.

    Every worker calls it at startup, so concurrent calls are expected: the loser of the create
    race updates instead. An operator's pause (and its note) survives the update.
    """
    desired = reaper_schedule(settings)
    try:
        return await client.create_schedule(
            REAPER_SCHEDULE_ID, desired, rpc_timeout=SCHEDULE_RPC_TIMEOUT
        )
    except ScheduleAlreadyRunningError:
        pass

    def update(current: ScheduleUpdateInput) -> ScheduleUpdate:
        return ScheduleUpdate(
            schedule=dataclasses.replace(desired, state=current.description.schedule.state)
        )

    handle = client.get_schedule_handle(REAPER_SCHEDULE_ID)
    await handle.update(update, rpc_timeout=SCHEDULE_RPC_TIMEOUT)
    return handle


def fleet_watch_id(settings: Settings) -> str:
    return f"{FLEET_WATCH_ID}:{settings.task_queue}"


async def ensure_fleet_watch(client: Client, settings: Settings) -> str:
    """Start the deployment's fleet watch unless it runs; safe to call from every worker."""
    handle = await client.start_workflow(
        FleetWatchWorkflow.run,
        FleetWatchInput(),
        id=fleet_watch_id(settings),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        rpc_timeout=SCHEDULE_RPC_TIMEOUT,
    )
    return handle.id
