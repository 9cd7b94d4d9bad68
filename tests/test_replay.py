"""Replays histories recorded from real runs (tests/test_integration.py with
LORA_RECORD_HISTORIES=1) against today's workflow code: a change that would break a running
workflow fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from worker.converter import data_converter
from worker.main import WORKFLOWS
from worker.settings import Settings

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_recorded_histories_exist() -> None:
    assert {p.stem for p in HISTORIES} >= {"completed-run-1", "baddata-run-1"}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path, base_settings: Settings) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(base_settings))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
