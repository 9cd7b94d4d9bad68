"""What the runner needs from a trainer: prepare the files, train, report, pick the best epoch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpu_runner.protocol import (
    BaseModelFamily,
    ComponentRole,
    MixedPrecision,
    Stage,
    TrainingConfig,
    TrainingProgressData,
)


@dataclass(frozen=True)
class TrainingInputs:
    run_dir: Path
    dataset_dir: Path  # the unzipped images and .txt captions
    model_path: Path  # the downloaded base model checkpoint
    family: BaseModelFamily
    config: TrainingConfig  # already filled with the family's defaults
    output_dir: Path
    secrets: list[str] = field(default_factory=list)  # redact these from any log line
    cuda: bool = True  # whether the runner found a GPU; without one, training runs in fp32
    # The family's files beside the checkpoint, downloaded (FAMILY_COMPONENTS), by role.
    components: dict[ComponentRole, Path] = field(default_factory=dict)
    variant: str | None = None  # "dev"/"schnell" (Flux.1), "medium"/"large" (SD 3.5)
    v_parameterization: bool = False  # SD 2.x 768-v
    vram_mb: int | None = None  # the GPU's memory, when the runner found one


@dataclass(frozen=True)
class PreparedTraining:
    inputs: TrainingInputs
    total_steps: int | None
    paths: dict[str, str]  # files written (dataset toml, config toml, ...) for files.ready
    device: str | None = None  # where training runs: "cuda" or "cpu"
    mixed_precision: MixedPrecision | None = None  # what it runs in ("no": fp32)
    # Where the trainer writes its TensorBoard logs; the runner uploads them when training ends.
    tensorboard_dir: Path | None = None


@dataclass(frozen=True)
class TrainingResult:
    epoch_losses: list[float]  # index 0 is epoch 1
    best_epoch: int  # 1-based, lowest epoch-average loss
    checkpoint: Path  # the file holding best_epoch's weights
    loss: float


class TrainerError(Exception):
    """A failure to report as run.failed: stable code, readable message, redacted log tail."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        stage: Stage = "training",
        log_tail: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage: Stage = stage
        self.log_tail = log_tail or []


ProgressCallback = Callable[[TrainingProgressData], Awaitable[None] | None]


class Trainer(Protocol):
    def prepare(self, inputs: TrainingInputs) -> PreparedTraining:
        """Write the dataset layout and config files; raise TrainerError for unsupported input."""

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        """Run to the end and return the best checkpoint; raise TrainerError on any failure."""

    async def stop(self) -> None:
        """Stop training now (SIGTERM from the host): no trainer process may survive this."""
