"""Replays histories recorded from real runs (tests/test_integration.py with
LORA_RECORD_HISTORIES=1) against today's workflow code: a change that would break a running
workflow fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from common.converter import data_converter
from common.settings import Settings
from worker.main import WORKFLOWS

from .workflow_support import CODE_VERSION

HISTORIES: dict[str, dict[str, Any]] = {
    path.stem: json.loads(path.read_text())
    for path in (Path(__file__).parent / "histories").glob("*.json")
}


# The corpus only grows; a name says which code version recorded it (v1 names carry none).
_PER_VERSION = [
    "completed-run",
    "stalled-in-pending",
    "stalled-in-pendingGpu",
    "stalled-in-pendingImages",
    "stalled-in-pendingModel",
    "stalled-in-training",
    "cancelled-in-training",
    "gpu-replaced-in-training",
    "runner-failed-in-training",
    "continued-as-new-first-execution",
    "continued-as-new-last-execution",
]
# Recorded by tests/test_cancel_anywhere.py: the cancel-anywhere patch's own paths.
_CANCEL_ANYWHERE = [
    "cancel-anywhere-late-cancel-kept-completed",
    "cancel-anywhere-cancelled-in-training-execution-1",
    "cancel-anywhere-cancelled-in-training-execution-2",
    "cancel-anywhere-completed-after-replacement-execution-1",
    "cancel-anywhere-completed-after-replacement-execution-2",
]
# The v7 patches' own paths: tests/test_faults.py (faults-end-right), tests/test_cost_edges.py
# (cost-edges) and tests/test_webhook_delivery.py (webhook-bounded-schedule). v8 (the standing
# alarm), v9 (the family-sized GPU) and v10 (durable epochs) record every set again.
_FAULTS = [
    "stuck-trainer-replaced",
    "waited-for-the-relay",
    "no-rental-past-budget",
    "gpu-not-released",
    "webhook-delivered",
    "webhook-gave_up",
    "webhook-refused",
]
# tests/test_durable_epochs.py: the durable-epochs patch's own paths (v10 on).
_EPOCHS = ["resumed-run", "epochs-saved"]
_FLEET = ["host-exits-told", "host-goes-told", "fleet-watch"]
REQUIRED = (
    {"completed-run-1", "baddata-run-1", "reaper-pass-1"}
    | {
        f"{v}-{name}"
        for v in ("v2", "v3", "v4", "v6", "v7", "v8", "v9", "v10", CODE_VERSION)
        for name in _PER_VERSION
    }
    | {f"{version}-bad-dataset" for version in ("v4", "v6", "v7", "v8", "v9", "v10", CODE_VERSION)}
    | {
        f"{v}-{name}"
        for v in ("v5", "v6", "v7", "v8", "v9", "v10", CODE_VERSION)
        for name in _CANCEL_ANYWHERE
    }
    | {f"{v}-{name}" for v in ("v7", "v8", "v9", "v10", CODE_VERSION) for name in _FAULTS}
    | {f"{v}-{name}" for v in ("v10", CODE_VERSION) for name in _EPOCHS}
    | {f"{CODE_VERSION}-{name}" for name in _FLEET}
)


def test_recorded_histories_exist() -> None:
    assert set(HISTORIES) >= REQUIRED, sorted(REQUIRED - set(HISTORIES))


@pytest.mark.parametrize("workflow_id", sorted(HISTORIES))
async def test_recorded_history_replays(workflow_id: str, base_settings: Settings) -> None:
    recorded = dict(HISTORIES[workflow_id])
    # v2 files carry the run's id; v1 files were recorded with their name as the run id.
    history = WorkflowHistory.from_json(recorded.pop("workflowId", workflow_id), recorded)
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(base_settings))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
