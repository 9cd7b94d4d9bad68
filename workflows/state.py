"""Everything a run knows, in one model: the next execution's input after continue-as-new."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.civitai import ResolvedModel
    from activities.providers.base import Instance
    from activities.storage import ImagesZip
    from gpu_runner.protocol import ModelUploadedData, RunFailedData

    from .models import RunStatus, S3Location, TrainingRequest
    from .status import Fact
    from .webhooks import WebhookQueueState

# Sequence numbers of the current attempt remembered for deduplication. Events are facts or
# coalesced progress, so one replayed from before the window changes nothing wrong.
SEEN_WINDOW = 256


class GpuSpan(BaseModel):
    dollars_per_hour: float
    start: datetime
    end: datetime | None = None


class PreparedInputs(BaseModel):
    images_zip: ImagesZip
    model: ResolvedModel


class RunState(BaseModel):
    # The run's first execution id: S3 keys and child ids carry it, so a reused run id never
    # mixes two runs.
    execution: str
    status: RunStatus
    executions: int = 1
    facts: list[Fact] = []
    prepared: PreparedInputs | None = None
    instance: Instance | None = None
    output: S3Location | None = None
    gpu_spans: list[GpuSpan] = []
    excluded_machines: list[str] = []
    seen_seqs: list[int] = []
    last_progress_seq: int = 0
    last_step: int = 0
    last_step_at: datetime | None = None
    runner_failure: RunFailedData | None = None
    uploaded: ModelUploadedData | None = None
    webhooks: WebhookQueueState = WebhookQueueState()
    # Its GPUs' labels, job URLs and runner secrets name the first execution, and only events
    # relayed for that execution count (runs started since the run-identity patch).
    execution_bound: bool = False
    # While the relay is down at a deadline, or just back, the deadline waits until this.
    deadline_grace_until: datetime | None = None
    relay_down_since: datetime | None = None
    # When this status began waiting for the relay (bounds the wait), and when an event last
    # reached the run (a recent one proves the relay delivers).
    relay_wait_started_at: datetime | None = None
    last_event_at: datetime | None = None


class ContinuedRun(BaseModel):
    """The input of an execution that continues a run: its request and everything it knew."""

    request: TrainingRequest
    state: RunState
