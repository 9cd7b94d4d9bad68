"""Housekeeping of the embedded stack's local "GPUs": a destroyed instance leaves no work folder
(the runner's copies of the dataset and the base model) behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from activities.providers.base import instance_label
from activities.providers.local import LocalProvider
from common.settings import Settings
from workflows.models import GpuRequirements

# Like a runner: fills its work folder (LORA_RUNNER_WORKDIR), then works until it is stopped.
RUNNER = """
import os, pathlib, time
work = pathlib.Path(os.environ["LORA_RUNNER_WORKDIR"])
(work / "model").mkdir(parents=True)
(work / "model" / "base.safetensors").write_bytes(bytes(1024 * 1024))
(work / "ready").write_text("ok")
time.sleep(3600)
"""


def test_destroying_an_instance_removes_its_work_folder(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path / "state", local_runner_command=[sys.executable, "-c", RUNNER]
    )
    provider = LocalProvider(settings, stop_timeout_s=2)
    kept = provider.create(instance_label("tests", "kept", 1), "http://job", GpuRequirements())
    gone = provider.create(instance_label("tests", "gone", 1), "http://job", GpuRequirements())
    directory = settings.instances_dir / gone.instance_id
    deadline = time.monotonic() + 10
    while not all(
        (settings.instances_dir / i / "work" / "ready").exists()
        for i in (kept.instance_id, gone.instance_id)
    ):
        assert time.monotonic() < deadline, "the runners never wrote their work folders"
        time.sleep(0.05)

    assert provider.destroy(gone.instance_id)

    assert not (directory / "work").exists()
    # What says what happened to the instance stays, and so does every other instance's work.
    assert (directory / "instance.json").exists() and (directory / "runner.log").exists()
    assert provider.get(gone.instance_id).state == "gone"  # type: ignore[union-attr]
    assert (settings.instances_dir / kept.instance_id / "work" / "model").is_dir()

    assert provider.destroy(kept.instance_id)
    assert not (settings.instances_dir / kept.instance_id / "work").exists()
