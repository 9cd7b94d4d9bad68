"""Each status has exactly one deadline, counted from entering it (DESIGN.md, Statuses).

Training is the one status whose deadline moves: it is the earlier of "no training step for
`training_idle_s`" and "`training_total_s` in all". Heartbeats do not move it: a live process
whose trainer is stuck is a stall.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .models import Deadlines, RunStatusName


@dataclass(frozen=True)
class Deadline:
    at: datetime
    # Shown on the timer in the Temporal UI: "stall deadline: training idle 10 min".
    summary: str
    # The run's error when the deadline passes.
    message: str
    # pendingGpu: a GPU that never became ready is replaced, not the end of the run.
    replace_gpu: bool = False
    # Training's "no step for training_idle_s": the host's trainer is stuck.
    trainer_idle: bool = False


def _human(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def status_deadline(
    status: RunStatusName,
    entered_at: datetime,
    deadlines: Deadlines,
    last_step_at: datetime | None,
) -> Deadline:
    """The one deadline of `status`, entered at `entered_at`."""
    if status == RunStatusName.TRAINING:
        idle_from = max(entered_at, last_step_at) if last_step_at else entered_at
        idle_at = idle_from + timedelta(seconds=deadlines.training_idle_s)
        total_at = entered_at + timedelta(seconds=deadlines.training_total_s)
        if total_at <= idle_at:
            return Deadline(
                at=total_at,
                summary=f"stall deadline: training {_human(deadlines.training_total_s)} in all",
                message=f"training did not finish within {deadlines.training_total_s} s",
            )
        return Deadline(
            at=idle_at,
            summary=f"stall deadline: training idle {_human(deadlines.training_idle_s)}",
            message=f"no training step for {deadlines.training_idle_s} s",
            trainer_idle=True,
        )
    limit_s = {
        RunStatusName.PENDING: deadlines.pending_s,
        RunStatusName.PENDING_GPU: deadlines.pending_gpu_s,
        RunStatusName.PENDING_IMAGES: deadlines.pending_images_s,
        RunStatusName.PENDING_MODEL: deadlines.pending_model_s,
    }[status]
    return Deadline(
        at=entered_at + timedelta(seconds=limit_s),
        summary=f"stall deadline: {status.value} {_human(limit_s)}",
        message=f"{status.value} lasted longer than {limit_s} s",
        replace_gpu=status == RunStatusName.PENDING_GPU,
    )
