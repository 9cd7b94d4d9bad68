"""Stand-in trainers for runner tests (no GPU, no sd-scripts), loadable by the runner process.

Point the runner at one with LORA_RUNNER_TRAINER_FACTORY=tests.runner.fake_trainer:FakeTrainer.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
from pathlib import Path

from gpu_runner.protocol import TrainingProgressData
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import (
    PreparedTraining,
    ProgressCallback,
    SavedEpoch,
    TrainerError,
    TrainingInputs,
    TrainingResult,
)
from tests.fake_civitai import model_bytes
from tests.images import PNG

CHECKPOINT_BYTES = 300_000


def checkpoint_bytes(epoch: int) -> bytes:
    return model_bytes(f"epoch-{epoch}", CHECKPOINT_BYTES)


def epoch_loss(epoch: int) -> float:
    """Falls until epoch 2, then rises: the best epoch is 2 whenever there are 2 or more."""
    return round(0.30 - 0.05 * epoch if epoch <= 2 else 0.20 + 0.01 * epoch, 4)


async def _report(on_progress: ProgressCallback, data: TrainingProgressData) -> None:
    result = on_progress(data)
    if inspect.isawaitable(result):
        await result


class FakeTrainer:
    """Reports progress every step and writes one checkpoint per epoch; epoch 2 is the best."""

    steps_per_epoch = 4
    step_s = 0.01

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self.stopped = False

    def prepare(self, inputs: TrainingInputs) -> PreparedTraining:
        images = sorted(p.name for p in inputs.dataset_dir.rglob("*") if p.is_file())
        if not inputs.model_path.is_file():
            raise TrainerError("model_missing", f"no model at {inputs.model_path}", stage="files")
        config = inputs.run_dir / "fake_config.toml"
        config.write_text(f"images = {images!r}\nepochs = {inputs.config.epochs}\n")
        total = inputs.config.epochs * self.steps_per_epoch
        return PreparedTraining(inputs=inputs, total_steps=total, paths={"config": str(config)})

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        inputs = prepared.inputs
        epochs = inputs.config.epochs
        total = epochs * self.steps_per_epoch
        losses: list[float] = []
        step = 0
        for epoch in range(1, epochs + 1):
            for _ in range(self.steps_per_epoch):
                step += 1
                await asyncio.sleep(self.step_s)
                progress = TrainingProgressData(
                    step=step, total=total, epoch=epoch, total_epochs=epochs, loss=epoch_loss(epoch)
                )
                await _report(on_progress, progress)
            losses.append(epoch_loss(epoch))
            path = inputs.output_dir / f"{inputs.config.output_name}-{epoch:06d}.safetensors"
            path.write_bytes(checkpoint_bytes(epoch))
            if inputs.on_epoch is not None:
                inputs.on_epoch(self._epoch_files(inputs, epoch, epochs, step, path))
        best = min(range(epochs), key=lambda i: losses[i]) + 1
        checkpoint = inputs.output_dir / f"{inputs.config.output_name}-{best:06d}.safetensors"
        return TrainingResult(
            epoch_losses=losses, best_epoch=best, checkpoint=checkpoint, loss=losses[best - 1]
        )

    def _epoch_files(
        self, inputs: TrainingInputs, epoch: int, epochs: int, step: int, lora: Path
    ) -> SavedEpoch:
        """A state folder (FAKE_STATE_BYTES of it, default 1 KB) and a sample when one is due."""
        state = inputs.output_dir / f"{inputs.config.output_name}-{epoch:06d}-state"
        state.mkdir(exist_ok=True)
        size = int(os.environ.get("FAKE_STATE_BYTES", "1024"))
        (state / "optimizer.bin").write_bytes(os.urandom(size))
        samples = []
        if inputs.samples.due(epoch, epochs):
            name = f"{inputs.config.output_name}_e{epoch:06d}_00.png"
            sample = inputs.output_dir / "sample" / name
            sample.parent.mkdir(exist_ok=True)
            sample.write_bytes(PNG)
            samples.append(sample)
        return SavedEpoch(
            epoch=epoch,
            total_epochs=epochs,
            step=step,
            loss=epoch_loss(epoch),
            lora=lora,
            state_dir=state if epoch < epochs else None,
            samples=samples,
        )

    async def stop(self) -> None:
        self.stopped = True


class SlowTrainer(FakeTrainer):
    """Enough steps to overlap a relay outage."""

    steps_per_epoch = 20
    step_s = 0.02


GATE_ENV = "FAKE_TRAINER_GATE"
GATE_STEP = 2


class GatedTrainer(FakeTrainer):
    """Stops after step GATE_STEP (epoch 1) until the file named by $FAKE_TRAINER_GATE exists.

    The test holds training there for as long as it needs (a heartbeat to land), then creates
    the file; the runner's max runtime bounds the wait if it never does.
    """

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        gate = Path(os.environ[GATE_ENV])

        async def gated(progress: TrainingProgressData) -> None:
            await _report(on_progress, progress)
            if progress.step == GATE_STEP:
                # The test process creates the file: there is no event to await instead.
                while not gate.exists():  # noqa: ASYNC110, ASYNC240
                    await asyncio.sleep(0.02)

        return await super().train(prepared, gated)


class HangingTrainer(FakeTrainer):
    """Starts a child process in its own process group and waits for it, like sd-scripts does.

    The child's pid goes to <output_dir>/child.pid; stop() kills the whole group.
    """

    def __init__(self, settings: RunnerSettings) -> None:
        super().__init__(settings)
        self._proc: asyncio.subprocess.Process | None = None

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(300)", start_new_session=True
        )
        (prepared.inputs.output_dir / "child.pid").write_text(str(self._proc.pid))
        await _report(on_progress, TrainingProgressData(step=1, total=prepared.total_steps or 1))
        code = await self._proc.wait()
        raise TrainerError("trainer_crashed", f"the training process exited with code {code}")

    async def stop(self) -> None:
        self.stopped = True
        if self._proc is not None and self._proc.returncode is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            await self._proc.wait()


class FailingTrainer(FakeTrainer):
    """Fails like a crashing sd-scripts, with secrets and a presigned URL in its output."""

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        await _report(on_progress, TrainingProgressData(step=1, total=prepared.total_steps or 1))
        lines = [f"step {i}: loss 0.1" for i in range(70)]
        for secret in prepared.inputs.secrets:
            lines.append(f"debug: using credential {secret} for the download")
        lines.append(
            "fetching https://bucket.s3.example.com/runs/x/model.safetensors"
            "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeef01"
        )
        lines.append("RuntimeError: CUDA out of memory")
        raise TrainerError(
            "trainer_crashed",
            f"sd-scripts exited with code 1 ({Path(prepared.inputs.model_path).name})",
            log_tail=lines,
        )
