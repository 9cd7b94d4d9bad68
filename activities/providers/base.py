"""The interface every GPU provider implements. Methods are sync (the vastai SDK is)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from workflows.models import GpuRequirements

LABEL_PREFIX = "loratrain:"
# A deployment name never holds ":", so the first field after the prefix is always it.
DEPLOYMENT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_DEPLOYMENT = re.compile(DEPLOYMENT_PATTERN)

InstanceState = Literal["starting", "running", "exited", "gone"]


@dataclass(frozen=True)
class Label:
    deployment: str
    run_id: str
    attempt: int


def instance_label(deployment: str, run_id: str, attempt: int) -> str:
    """The label every instance of this system carries: loratrain:<deployment>:<run_id>:<attempt>.

    The deployment keeps two deployments that share a provider account from touching each
    other's instances.
    """
    if not _DEPLOYMENT.fullmatch(deployment):
        raise ValueError(f"deployment name {deployment!r} must match {DEPLOYMENT_PATTERN}")
    return f"{LABEL_PREFIX}{deployment}:{run_id}:{attempt}"


def parse_label(label: str) -> Label | None:
    """The parts of one of our labels, or None when the label is not ours."""
    if not label.startswith(LABEL_PREFIX):
        return None
    deployment, _, rest = label[len(LABEL_PREFIX) :].partition(":")
    run_id, _, attempt = rest.rpartition(":")
    if not _DEPLOYMENT.fullmatch(deployment) or not run_id or not attempt.isdigit():
        return None
    return Label(deployment, run_id, int(attempt))


def run_label_prefix(deployment: str, run_id: str) -> str:
    """What the labels of every attempt of one run start with (run ids hold no ':')."""
    return instance_label(deployment, run_id, 0).removesuffix("0")


def run_id_of_label(label: str) -> str | None:
    """The run id in a label, or None when the label is not ours.

    Also reads the older loratrain:<run_id>:<attempt>: the reaper calls this in workflow code,
    and a pass recorded before deployments were named must replay the same way.
    """
    parsed = parse_label(label)
    if parsed is not None:
        return parsed.run_id
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

    def create(
        self,
        label: str,
        job_url: str,
        requirements: GpuRequirements,
        *,
        exclude_machine_ids: Sequence[str] = (),
        download_bytes: int = 0,
    ) -> Instance:
        """Rent an instance that runs the GPU runner with LORA_JOB_URL=job_url.

        `exclude_machine_ids`: machines that already failed in this run, never rented again.
        `download_bytes`: what the runner will fetch (model + images zip), for disk sizing and
        for ranking offers by the cost of the whole run; 0 when unknown.
        """

    def get(self, instance_id: str) -> Instance | None:
        """Current state, or None when the provider does not know the instance."""

    def destroy(self, instance_id: str) -> bool:
        """Destroy it; False when it was already gone."""

    def list_instances(self, label_prefix: str = "") -> list[Instance]:
        """Every instance of the account whose label starts with `label_prefix` (callers keep
        those whose label is theirs)."""
