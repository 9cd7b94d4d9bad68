"""What the runner needs from a trainer: prepare the files, train, report, pick the best epoch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpu_runner.protocol import (
    BaseModelFamily,
    ComponentRole,
    KeepPolicy,
    MixedPrecision,
    SampleSettings,
    Stage,
    TrainingConfig,
    TrainingProgressData,
)


@dataclass(frozen=True)
class ResumePoint:
    """An earlier attempt's last complete epoch, downloaded: training goes on from the next."""

    epoch: int
    step: int
    state_dir: Path  # the trainer's own state folder, as it saved it
    epoch_losses: list[float]  # epochs 1..epoch
    # Earlier epochs' LoRAs on this disk, by epoch: the kept one may be among them.
    loras: dict[int, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedEpoch:
    """One epoch's files, complete on disk (the trainer reports it once it wrote them all)."""

    epoch: int
    total_epochs: int
    step: int
    loss: float
    lora: Path
    state_dir: Path | None = None  # None: the last epoch (nothing would resume from it)
    samples: list[Path] = field(default_factory=list)


EpochCallback = Callable[[SavedEpoch], None]


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
    samples: SampleSettings = field(default_factory=lambda: SampleSettings(enabled=False))
    keep: KeepPolicy = "lowest_loss"
    resume: ResumePoint | None = None
    # Called (from any thread) once an epoch's files are complete; None: nobody uploads them,
    # so no training state is saved either.
    on_epoch: EpochCallback | None = None


def kept_epoch(epoch_losses: list[float], keep: KeepPolicy) -> int:
    """The 1-based epoch the run keeps: the lowest loss (the earliest of equals), or the last."""
    if keep == "last":
        return len(epoch_losses)
    return min(range(1, len(epoch_losses) + 1), key=lambda e: epoch_losses[e - 1])


def sample_prompts(settings: SampleSettings, captions: list[str]) -> list[str]:
    """The request's prompts, or the first `count` distinct captions of the dataset."""
    if settings.prompts:
        return list(settings.prompts)
    chosen: list[str] = []
    for caption in captions:
        if caption and caption not in chosen:
            chosen.append(caption)
        if len(chosen) == settings.count:
            break
    return chosen


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
