"""What a run is waiting on while one of its activities retries, read from Temporal itself.

The workflow's status names the phase (`pending`, `pendingGpu`, ...); while an activity of that
phase fails and retries (Civitai unreachable, S3 refusing), the status alone does not move. The
server knows the attempt, the last failure and the next attempt's time of every pending activity
(`DescribeWorkflowExecution`), so clients read it there: no workflow change, no history event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.failure.v1 import Failure
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import (
    WorkflowExecutionDescription,
)
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError, FailureError

from workflows.models import WaitingOn

# What each of the run's activities does, as the workflow's activity summaries say it.
_WHAT = {
    "resolve_model": "resolve the base model",
    "build_images_zip": "check and zip the dataset",
    "validate_images": "validate the dataset",
    "write_job_spec": "write the job for the GPU",
    "allocate_gpu": "rent a GPU",
    "get_gpu_instance": "check the GPU instance",
    "verify_upload": "verify the uploaded model",
    "deallocate_gpu": "give the GPU back",
    "release_run_gpus": "give every GPU of the run back",
    "delete_job_specs": "delete the run's job specs",
}
_STATES = {
    PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED: "scheduled",
    PendingActivityState.PENDING_ACTIVITY_STATE_STARTED: "started",
    PendingActivityState.PENDING_ACTIVITY_STATE_CANCEL_REQUESTED: "cancel_requested",
}
# How often `LoraClient.watch` asks what the run waits on, between its status changes.
WAITING_POLL_S = 2.0
_MAX_ERROR_CHARS = 500


async def waiting_on(
    description: WorkflowExecutionDescription, converter: DataConverter
) -> list[WaitingOn]:
    """The run's activities that are retrying (a failed attempt behind them), oldest first."""
    found = []
    for pending in description.raw_description.pending_activities:
        if pending.attempt > 1 or pending.HasField("last_failure"):
            found.append(await _waiting(pending, converter))
    return found


async def _waiting(pending: PendingActivityInfo, converter: DataConverter) -> WaitingOn:
    name = pending.activity_type.name
    error, error_type = None, None
    if pending.HasField("last_failure"):
        error, error_type = await _failure_text(pending.last_failure, converter)
    next_at = None
    if pending.HasField("next_attempt_schedule_time"):
        next_at = pending.next_attempt_schedule_time.ToDatetime(tzinfo=UTC)
    return WaitingOn(
        activity=name,
        waiting_for=_WHAT.get(name, name),
        attempt=pending.attempt,
        maximum_attempts=pending.maximum_attempts or None,
        state=_STATES.get(pending.state, "unknown"),
        last_error=error,
        error_type=error_type,
        next_attempt_at=next_at,
    )


async def _failure_text(failure: Failure, converter: DataConverter) -> tuple[str, str | None]:
    """The failure's message (payloads and message are encrypted by the codec) and its type."""
    copy = Failure()
    copy.CopyFrom(failure)
    try:
        error: BaseException = await converter.decode_failure(copy)
    except Exception:
        return failure.message[:_MAX_ERROR_CHARS], None
    if isinstance(error, ApplicationError):
        return error.message[:_MAX_ERROR_CHARS], error.type
    if isinstance(error, FailureError):
        return error.message[:_MAX_ERROR_CHARS], type(error).__name__
    return str(error)[:_MAX_ERROR_CHARS], type(error).__name__


def signature(waiting: Sequence[WaitingOn]) -> tuple[tuple[str, int, str | None], ...]:
    """What a watcher shows a new line for: another activity, attempt or error."""
    return tuple((w.activity, w.attempt, w.last_error) for w in waiting)
