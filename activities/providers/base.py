"""The interface every GPU provider implements. Methods are sync (the vastai SDK is)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel

from workflows.models import GpuRequirements

LABEL_PREFIX = "loratrain:"
# A deployment name never holds ":", so the first field after the prefix is always it.
DEPLOYMENT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_DEPLOYMENT = re.compile(DEPLOYMENT_PATTERN)

InstanceState = Literal["starting", "running", "exited", "gone"]


_EXECUTION_TAG = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class Label:
    deployment: str
    run_id: str
    attempt: int
    # Which run of that id (execution_tag of its first execution); None on labels made before
    # runs were told apart, which name the run id alone.
    execution: str | None = None


def execution_tag(first_execution_run_id: str) -> str:
    """A short, fixed-length name for one run of a run id (a reused id is another run)."""
    return hashlib.sha256(first_execution_run_id.encode()).hexdigest()[:12]


def instance_label(deployment: str, run_id: str, attempt: int, execution: str | None = None) -> str:
    """The label every instance of this system carries:
    loratrain:<deployment>:<run_id>:<execution tag>:<attempt>.

    The deployment keeps two deployments that share a provider account from touching each
    other's instances; the execution tag keeps a run from adopting the GPU of an earlier run
    that had the same id. `execution` is the run's first execution id.
    """
    if not _DEPLOYMENT.fullmatch(deployment):
        raise ValueError(f"deployment name {deployment!r} must match {DEPLOYMENT_PATTERN}")
    if execution is None:
        return f"{LABEL_PREFIX}{deployment}:{run_id}:{attempt}"
    return f"{LABEL_PREFIX}{deployment}:{run_id}:{execution_tag(execution)}:{attempt}"


def parse_label(label: str) -> Label | None:
    """The parts of one of our labels, or None when the label is not ours."""
    if not label.startswith(LABEL_PREFIX):
        return None
    deployment, _, rest = label[len(LABEL_PREFIX) :].partition(":")
    parts = rest.split(":")  # run ids hold no ":"
    if len(parts) == 3 and _EXECUTION_TAG.fullmatch(parts[1]):
        run_id, execution, attempt = parts
    elif len(parts) == 2:
        (run_id, attempt), execution = parts, None
    else:
        return None
    if not _DEPLOYMENT.fullmatch(deployment) or not run_id or not attempt.isdigit():
        return None
    return Label(deployment, run_id, int(attempt), execution)


def run_label_prefix(deployment: str, run_id: str) -> str:
    """What the labels of every attempt of every run with this id start with (run ids hold no
    ':'); parse_label tells the runs apart."""
    return instance_label(deployment, run_id, 0).removesuffix("0")


def run_of_label(label: str) -> tuple[str, str | None] | None:
    """(run id, execution tag or None) of a label, or None when the label is not ours."""
    run_id = run_id_of_label(label)
    if run_id is None:
        return None
    parsed = parse_label(label)
    return run_id, parsed.execution if parsed is not None else None


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
    # When the provider created it: billing starts here, not when the allocation returned.
    created_at: datetime | None = None


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
