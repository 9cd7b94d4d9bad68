"""The interface every GPU provider implements. Methods are sync (the vastai SDK is)."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel

from workflows.models import GpuRequirements

LABEL_PREFIX = "loratrain:"

InstanceState = Literal["starting", "running", "exited", "gone"]


def instance_label(run_id: str, attempt: int) -> str:
    """The label every instance of this system carries: loratrain:<run_id>:<attempt>."""
    return f"{LABEL_PREFIX}{run_id}:{attempt}"


def run_id_of_label(label: str) -> str | None:
    """The run id in a label, or None when the label is not ours."""
    if not label.startswith(LABEL_PREFIX):
        return None
    run_id, _, attempt = label[len(LABEL_PREFIX) :].rpartition(":")
    return run_id if run_id and attempt.isdigit() else None


class Instance(BaseModel):
    provider: str
    instance_id: str
    label: str
    state: InstanceState
    gpu_name: str | None = None
    dollars_per_hour: float | None = None
    message: str | None = None
    # Where the instance runs (Vast: machine and host ids, the offer's country); None locally.
    machine_id: str | None = None
    host_id: str | None = None
    country: str | None = None


class NoOfferError(Exception):
    """No offer matches the requirements right now (retryable: offers come and go)."""


class GpuProvider(Protocol):
    name: str

    def find(self, label: str) -> Instance | None:
        """The live instance with this label, if any (so a retried allocation rents nothing)."""

    def create(self, label: str, job_url: str, requirements: GpuRequirements) -> Instance:
        """Rent an instance that runs the GPU runner with LORA_JOB_URL=job_url."""

    def get(self, instance_id: str) -> Instance | None:
        """Current state, or None when the provider does not know the instance."""

    def destroy(self, instance_id: str) -> bool:
        """Destroy it; False when it was already gone."""

    def list_instances(self) -> list[Instance]:
        """Every instance labelled by this system."""
