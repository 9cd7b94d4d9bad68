"""`loratrain demo` as a user runs it: it starts the embedded stack, builds the tiny model once,
trains a real LoRA with the builtin trainer through a real run, and downloads it; Ctrl-C cancels
the run and leaves no trainer behind; a running `loratrain dev` is used, and left running."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import read_dev_env

from .processes import Captured
from .test_cli import stack_env
from .test_devstack import running_dev

ROOT = Path(__file__).resolve().parent.parent
# The display prints each status the run enters as "HH:MM:SS  status".
ENTERED_TRAINING = re.compile(r"^\d\d:\d\d:\d\d  training$")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir for the module's demos (`running_dev` puts its state in `<dir>/state`):
    the tiny model is built by the first demo only."""
    return tmp_path_factory.mktemp("demo") / "state"


def start_demo(cwd: Path, env: dict[str, str]) -> Captured:
    """`loratrain demo` in `cwd` with `env` as its only LORA_ variables, as a user runs it."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    return Captured(
        [sys.executable, "-m", "cli", "demo"],
        cwd=cwd,
        env={**inherited, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env},
    )


@pytest.fixture
def demo(state: Path, tmp_path: Path) -> Iterator[Captured]:
    """The demo with a stack of its own: its state dir and free ports."""
    running = start_demo(tmp_path, {**stack_env(), "LORA_STATE_DIR": str(state)})
    try:
        yield running
    finally:
        running.kill()
        # The stack's children and runners live in groups of their own: none may outlive a test.
        for pid in processes_of(state):
            os.kill(pid, signal.SIGKILL)


def processes_of(state: Path) -> list[int]:
    """Processes of the demo's stack: those started with its LORA_STATE_DIR, and runners (whose
    environment holds no LORA_STATE_DIR) working in an instance directory under it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if f"LORA_STATE_DIR={state}".encode() in environ or cwd.is_relative_to(state):
            found.append(int(entry.name))
    return found


def runners_of(state: Path) -> list[str]:
    """`python -m gpu_runner` processes working under the state dir (pid and command line)."""
    found = []
    for pid in processes_of(state):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "gpu_runner" in command:
            found.append(f"{pid} {command}")
    return found


def safetensors_header(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header: dict[str, object] = json.loads(data[8 : 8 + length])
    return header


def test_demo_trains_a_lora_and_downloads_it(demo: Captured, state: Path, tmp_path: Path) -> None:
    output = demo.finish(timeout_s=240)

    assert demo.proc.returncode == 0, output
    assert "Traceback" not in output
    losses_line = re.search(r"loss per epoch\s+(.+)", output)
    kept = re.search(r"kept epoch\s+(\d+) \(the lowest loss\)", output)
    lora_line = re.search(r"LoRA\s+(\S+\.safetensors) \(", output)
    assert losses_line and kept and lora_line, output
    losses = [float(loss) for loss in re.findall(r"\d+: ([\d.]+)", losses_line.group(1))]
    assert len(losses) == 5
    assert int(kept.group(1)) == losses.index(min(losses)) + 1

    lora = Path(lora_line.group(1))
    assert lora.parent == tmp_path / "outputs" and lora.is_file()
    header = safetensors_header(lora)
    metadata = header["__metadata__"]
    assert isinstance(metadata, dict)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_epoch"] == kept.group(1)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in header)
    assert any(k.startswith("lora_te_") and k.endswith(".alpha") for k in header)

    run_id = lora.name.removesuffix("-demo.safetensors")
    ui = r"http://127\.0\.0\.1:\d+/namespaces/default/workflows/"
    assert re.search(rf"Temporal UI\s+{ui}{run_id}$", output, re.MULTILINE), output
    assert (state / "demo" / "tiny-sd15.safetensors").is_file()
    # It stopped the stack it started, runners included.
    assert processes_of(state) == []


def test_ctrl_c_cancels_the_run_and_stops_its_trainer_on_a_running_dev(
    state: Path, tmp_path: Path
) -> None:
    """On a `loratrain dev` that keeps running, so the trainer is gone because the run was
    cancelled, not because a stack stopped."""
    with running_dev(state.parent) as dev:
        ui_url = read_dev_env(state / "dev.env")["LORA_TEMPORAL_UI_URL"]
        # As typed in another terminal: only the state dir says where the stack is.
        demo = start_demo(tmp_path, {"LORA_STATE_DIR": str(state)})
        demo.wait_for_line(ENTERED_TRAINING, timeout_s=180)
        assert runners_of(state), "no runner was training"

        demo.proc.send_signal(signal.SIGINT)
        output = demo.finish(timeout_s=120)

        assert demo.proc.returncode == 130, output
        assert f"using the running `loratrain dev` (state in {state})" in output
        assert "interrupted: cancelling run" in output
        assert re.search(r"^status\s+cancelled$", output, re.MULTILINE), output
        assert f"Temporal UI: {ui_url}/namespaces/default/workflows/run-" in output
        assert "Traceback" not in output
        assert runners_of(state) == []
        assert "stopping the embedded stack" not in output
        assert dev.process.proc.poll() is None, "the demo stopped the dev stack it did not start"
        dev.stop()
