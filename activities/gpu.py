"""Allocate, watch and deallocate GPU instances through a provider."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from common.settings import Settings
from workflows.models import GpuRequirements

from .providers.base import (
    GpuProvider,
    Instance,
    NoOfferError,
    execution_tag,
    instance_label,
    parse_label,
    run_id_of_label,
    run_label_prefix,
)

NO_GPU_OFFER = "NoGpuOffer"
GPU_PROVIDER_MISMATCH = "GpuProviderMismatch"
RUN_LOOKUP_TIMEOUT = timedelta(seconds=10)
# A create may take minutes (Vast's slow creates, its rate limits' waits): the allocation says
# it lives this often meanwhile, well inside the workflow's one-minute heartbeat timeout, so a
# slow create is never mistaken for a dead worker and sent again elsewhere.
CREATE_HEARTBEAT_S = 15.0
_CLOSED_STATUSES = frozenset(
    {
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.CANCELED,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.CONTINUED_AS_NEW,
        WorkflowExecutionStatus.TIMED_OUT,
    }
)


class AllocateGpuInput(BaseModel):
    run_id: str
    attempt: int
    # The run's first execution id, so a run never adopts the GPU of an earlier run of its id;
    # None from runs started before instances were labelled with it.
    execution: str | None = None
    job_url: str = Field(repr=False)
    requirements: GpuRequirements
    # Machines that already failed in this run: never offered again.
    exclude_machine_ids: list[str] = []
    # What the runner downloads (images zip + model), for disk sizing and offer ranking.
    download_bytes: int = Field(default=0, ge=0)


class InstanceRef(BaseModel):
    run_id: str
    provider: str
    instance_id: str


class RunRef(BaseModel):
    model_config = ConfigDict(frozen=True)  # the reaper groups instances by run

    run_id: str
    # Which run of this id: its first execution id (from the run itself) or, from the reaper,
    # the execution tag its instances' labels carry. None: any run of the id (older labels).
    execution: str | None = None


class GpuActivities:
    """Activities over one GPU provider (sync: provider SDKs block; they run on a thread pool)."""

    def __init__(self, provider: GpuProvider, settings: Settings) -> None:
        self.provider = provider
        self.settings = settings

    @activity.defn
    def allocate_gpu(self, input: AllocateGpuInput) -> Instance:
        """Rent the instance for this run and attempt, or return the one an earlier try rented."""
        label = instance_label(
            self.settings.deployment_name, input.run_id, input.attempt, input.execution
        )
        existing = self.provider.find(label)
        if existing is not None:
            activity.logger.info(
                "Run %s attempt %d already has %s instance %s (%s)",
                input.run_id,
                input.attempt,
                existing.provider,
                existing.instance_id,
                existing.state,
            )
            return existing
        # The last moment a cancel can stop this allocation; past it, the instance is created
        # and the activity completes, so the workflow's release finds it by its label.
        activity.heartbeat()
        try:
            instance = _heartbeating(
                functools.partial(
                    self.provider.create,
                    label,
                    input.job_url,
                    input.requirements,
                    exclude_machine_ids=input.exclude_machine_ids,
                    download_bytes=input.download_bytes,
                )
            )
        except NoOfferError as e:
            # Retryable: offers come and go, and the run's pending deadline bounds the wait.
            raise ApplicationError(
                f"No {self.provider.name} GPU offer matches the run's requirements "
                f"({input.requirements.describe()}): {e}. Retrying until one "
                "appears; raise gpu.max_dollars_per_hour or widen gpu.gpu_names to find one "
                "sooner.",
                type=NO_GPU_OFFER,
            ) from e
        activity.logger.info(
            "Run %s attempt %d got %s instance %s (%s, $%s/h)",
            input.run_id,
            input.attempt,
            instance.provider,
            instance.instance_id,
            instance.gpu_name,
            instance.dollars_per_hour,
        )
        return instance

    @activity.defn
    def get_gpu_instance(self, input: InstanceRef) -> Instance | None:
        """The instance's current state, or None when the provider does not know it."""
        self._check_provider(input)
        return self.provider.get(input.instance_id)

    @activity.defn
    def deallocate_gpu(self, input: InstanceRef) -> bool:
        """Destroy the instance; False (not an error) when it was already gone."""
        self._check_provider(input)
        destroyed = self.provider.destroy(input.instance_id)
        activity.logger.info(
            "Run %s: %s instance %s %s",
            input.run_id,
            input.provider,
            input.instance_id,
            "destroyed" if destroyed else "was already gone",
        )
        return destroyed

    @activity.defn
    def release_run_gpus(self, input: RunRef) -> list[str]:
        """Destroy every instance this deployment labelled for this run, any attempt; the ids it
        destroyed.

        The last word on a run's GPUs: it also finds an instance whose allocation raised after
        the provider had already created it.
        """
        released = []
        prefix = run_label_prefix(self.settings.deployment_name, input.run_id)
        for instance in self.provider.list_instances(prefix):
            if not _labels_this_run(instance.label, input):
                continue  # an earlier run of the same id: the reaper's, not this run's
            if self.provider.destroy(instance.instance_id):
                released.append(instance.instance_id)
        activity.logger.info(
            "Run %s: released %d %s instance(s) %s",
            input.run_id,
            len(released),
            self.provider.name,
            released,
        )
        return released

    @activity.defn
    def list_labelled_instances(self) -> list[Instance]:
        """Every instance whose label names a run of this deployment (for the reaper).

        Instances whose label does not parse as loratrain:<deployment>:<run_id>:<attempt>, or
        names another deployment, are left out: what cannot be tied to one of our runs is never
        destroyed on a guess.
        """
        return self._own_instances()

    def _own_instances(self) -> list[Instance]:
        deployment = self.settings.deployment_name
        return [
            instance
            for instance in self.provider.list_instances()
            if (label := parse_label(instance.label)) is not None and label.deployment == deployment
        ]

    def _check_provider(self, ref: InstanceRef) -> None:
        if ref.provider != self.provider.name:
            # Retryable: a worker with the right provider on this task queue can still do it,
            # and giving up on a deallocation would leak a paid GPU.
            raise ApplicationError(
                f"Instance {ref.instance_id} belongs to provider {ref.provider!r}, but this "
                f"worker runs provider {self.provider.name!r} (set LORA_GPU_PROVIDER="
                f"{ref.provider} on a worker for this task queue).",
                type=GPU_PROVIDER_MISMATCH,
            )


def _same_run(execution: str, first_execution_run_id: str) -> bool:
    """Whether `execution` (a first execution id, or its tag) names that run."""
    return execution in (first_execution_run_id, execution_tag(first_execution_run_id))


def _labels_this_run(label: str, run: RunRef) -> bool:
    parsed = parse_label(label)
    if parsed is None:
        return run_id_of_label(label) == run.run_id  # the oldest labels, without a deployment
    if parsed.run_id != run.run_id:
        return False
    return (
        parsed.execution is None
        or run.execution is None
        or _same_run(parsed.execution, run.execution)
    )


class RunLookupActivities:
    """Asks Temporal about runs (for the reaper); async, since the Temporal client is."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn
    async def run_is_open(self, input: RunRef) -> bool:
        """True while the run's workflow is running; False when it is closed or never existed.

        Any other RPC error raises, so the activity retries: an unanswered question never counts
        as "closed", which would destroy a live run's GPU.
        """
        try:
            description = await self.client.get_workflow_handle(input.run_id).describe(
                rpc_timeout=RUN_LOOKUP_TIMEOUT
            )
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        # Closed means one of these; any other status (or none reported) counts as open.
        if description.status in _CLOSED_STATUSES:
            return False
        if input.execution is None:
            return True
        # The id now names another run: the instance's own run closed long ago.
        first = description.raw_description.workflow_execution_info.first_run_id
        return not first or _same_run(input.execution, first)


_T = TypeVar("_T")


def _heartbeating(call: Callable[[], _T], every_s: float | None = None) -> _T:
    """`call()` on a thread of its own while this activity heartbeats every `every_s`. A cancel
    waits for it, heartbeating (a create that lands after the activity ended would be found
    only by the reaper): the cancel is raised once the call is done, and the run's release
    then finds what it created by its label."""
    with (
        activity.shield_thread_cancel_exception(),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="provider-call") as pool,
    ):
        # In this activity's context: what the call logs or asks of it stays the activity's.
        future = pool.submit(contextvars.copy_context().run, call)
        while True:
            try:
                return future.result(timeout=every_s or CREATE_HEARTBEAT_S)
            except FutureTimeout:
                activity.heartbeat()
