"""A stand-in trainer with a fixed step time, for runner benchmarks (P5, P7).

The runner loads it with LORA_RUNNER_TRAINER_FACTORY=bench.standin:FixedStepTrainer; when
BENCH_TRAIN_TIMES names a file, train() writes its own start and end (CLOCK_MONOTONIC, which
every process on the machine shares) there, so the benchmark can time the training phase alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from gpu_runner.trainers.base import PreparedTraining, ProgressCallback, TrainingResult
from tests.runner.fake_trainer import FakeTrainer

STEPS_PER_EPOCH = 150
STEP_S = 0.02


class FixedStepTrainer(FakeTrainer):
    """FakeTrainer's checkpoints and losses, 150 steps of 20 ms per epoch, progress every step."""

    steps_per_epoch = STEPS_PER_EPOCH
    step_s = STEP_S

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        started = time.monotonic()
        result = await super().train(prepared, on_progress)
        ended = time.monotonic()
        times = os.environ.get("BENCH_TRAIN_TIMES")
        if times:
            await asyncio.to_thread(
                Path(times).write_text, json.dumps({"start": started, "end": ended})
            )
        return result
