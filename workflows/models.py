"""Data that crosses the workflow boundary: the request, the status, and the shared value types."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpu_runner.protocol import (
    ComponentRole,
    EpochFile,
    KeepPolicy,
    RunnerEvent,
    SampleSettings,
    TrainerName,
    TrainingConfig,
)

BucketName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunStatusName(StrEnum):
    PENDING = "pending"
    PENDING_GPU = "pendingGpu"
    PENDING_IMAGES = "pendingImages"
    PENDING_MODEL = "pendingModel"
    TRAINING = "training"
    COMPLETED = "completed"
    STALLED = "stalled"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        RunStatusName.COMPLETED,
        RunStatusName.STALLED,
        RunStatusName.FAILED,
        RunStatusName.CANCELLED,
    }
)


class S3Prefix(_Model):
    bucket: BucketName
    prefix: str = Field(default="", max_length=1024)


class S3Location(_Model):
    bucket: BucketName
    key: str = Field(min_length=1, max_length=1024)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class OutputLocation(_Model):
    """Where the trained model goes; unset parts default to the worker bucket and the run key."""

    bucket: BucketName | None = None
    key: str | None = Field(default=None, min_length=1, max_length=1024)


class GpuRequirements(_Model):
    min_vram_gb: int = Field(default=16, ge=4, le=200)
    max_dollars_per_hour: float = Field(default=1.0, gt=0, le=50)
    gpu_names: list[str] = Field(default_factory=list, description="Empty: any GPU that fits.")
    min_reliability: float = Field(default=0.95, ge=0, le=1)
    disk_gb: int = Field(default=40, ge=10, le=2000)
    min_download_mbps: float = Field(default=200, ge=0, le=100_000)
    countries: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = Field(
        default_factory=list, description="ISO codes of the only countries allowed; empty: any."
    )
    blocked_countries: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = Field(
        default_factory=list,
        description="ISO codes never rented in (Civitai geofences some regions).",
    )

    def describe(self) -> str:
        """One line for messages: the GPUs these requirements let the offer search take."""
        names = ", ".join(self.gpu_names) or "any GPU"
        return (
            f"{names} with at least {self.min_vram_gb} GB VRAM, at most "
            f"${self.max_dollars_per_hour:g}/h, reliability >= {self.min_reliability:g}, "
            f"{self.disk_gb} GB disk, download >= {self.min_download_mbps:g} Mbps"
        )


UserEventType = Literal[
    "training.status",
    "training.progress",
    "training.epoch",
    "training.completed",
    "training.failed",
    "training.stalled",
    "training.cancelled",
]


class UserWebhook(_Model):
    url: str = Field(pattern=r"^https?://", max_length=2048)
    secret: str = Field(repr=False, pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$")
    events: list[UserEventType] | None = Field(default=None, description="None: every event.")

    def wants(self, event_type: UserEventType) -> bool:
        return self.events is None or event_type in self.events


class Deadlines(_Model):
    """Seconds each status may last without progress (see DESIGN.md, Statuses)."""

    pending_s: int = Field(default=15 * 60, gt=0)
    pending_gpu_s: int = Field(default=20 * 60, gt=0)
    pending_images_s: int = Field(default=15 * 60, gt=0)
    pending_model_s: int = Field(default=30 * 60, gt=0)
    training_idle_s: int = Field(default=10 * 60, gt=0)
    training_total_s: int = Field(default=12 * 3600, gt=0)


class TrainingRequest(_Model):
    """A request for one training run. The workflow id is the run id."""

    images: S3Prefix
    model: str = Field(
        min_length=1,
        max_length=2048,
        description="civitai:<versionId>, an https URL, s3://bucket/key, or a local path "
        "(local provider only).",
    )
    model_files: dict[ComponentRole, str] = Field(
        default_factory=dict,
        description="Files the model's family loads beside it, by role (clip_l, clip_g, t5xxl, "
        "ae), in the same schemes as `model` plus hf:<repo>[@rev]/<file>. A role the checkpoint "
        "holds needs none; one left out takes the family's default source.",
    )
    training: TrainingConfig = TrainingConfig()
    gpu: GpuRequirements = GpuRequirements()
    output: OutputLocation = OutputLocation()
    webhook: UserWebhook | None = None
    deadlines: Deadlines = Deadlines()
    trainer: TrainerName = "sd-scripts"
    civitai_api_key: str | None = Field(default=None, repr=False, min_length=1, max_length=256)
    max_gpu_attempts: int = Field(default=3, ge=1, le=10)
    samples: SampleSettings = Field(
        default_factory=SampleSettings,
        description="Images rendered with each saved epoch's LoRA (`enabled: false`: none).",
    )
    keep: KeepPolicy = Field(
        default="lowest_loss",
        description="Which saved epoch's LoRA is the run's model: the lowest loss, or the last.",
    )
    resume: bool = Field(
        default=True,
        description="A replacement GPU resumes from the last complete saved epoch; false: it "
        "trains from the start.",
    )
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="The run ends failed (cost_cap), its GPU destroyed, before this is spent.",
    )
    continue_as_new_after_events: int = Field(
        # Small enough that the replay a hand-over may need stays short (see README).
        default=2000,
        ge=200,
        le=9000,
        description="History events per execution before the run continues as new (operations).",
    )


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


class WebhookDelivery(_Model):
    """Where one user webhook's delivery stands (the child's memo and result)."""

    event_type: str
    state: Literal["delivering", "failing", "delivered", "refused", "gave_up"]
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    # A receiver's Retry-After for the next attempt, when longer than the schedule's delay.
    retry_after: timedelta | None = None


class WebhookDeliveries(_Model):
    """A run's user webhooks, counted by where their delivery stands (set by clients, from
    the run's webhook children, never by the workflow)."""

    sent: int = 0
    delivering: int = 0
    failing: int = 0
    given_up: int = Field(default=0, description="Refused by the receiver, or out of attempts.")
    last_error: str | None = None


class RelayedEvent(_Model):
    """A runner's event as the relay delivers it (the `relayed_event` signal): with the first
    execution id of the run whose secret verified its signature."""

    event: RunnerEvent
    execution: str


class StatusChange(_Model):
    status: RunStatusName
    at: datetime


class Progress(_Model):
    step: int = 0
    total: int = 0
    epoch: int | None = None
    total_epochs: int | None = None
    percent: float = 0.0
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None


class GpuInfo(_Model):
    provider: str
    instance_id: str
    gpu_name: str | None = None
    dollars_per_hour: float | None = None
    started_at: datetime | None = None
    machine_id: str | None = None
    host_id: str | None = None
    country: str | None = None


class ModelResult(_Model):
    location: S3Location
    bytes: int
    sha256: str
    epoch: int | None = None
    loss: float | None = None


class SavedEpochInfo(_Model):
    """One epoch whose files are all in S3 (its manifest written last)."""

    epoch: int
    loss: float | None = None
    step: int = 0
    attempt: int = Field(description="The GPU attempt that trained it.")
    bucket: str | None = Field(default=None, description="Where the files' keys are.")
    lora: EpochFile
    samples: list[EpochFile] = Field(default_factory=list)
    state: EpochFile | None = Field(
        default=None,
        description="The training state a replacement resumes from (deleted when the run closes).",
    )
    manifest_key: str


class RunError(_Model):
    code: str
    message: str
    stage: str | None = None
    log_tail: list[str] = Field(default_factory=list)


class WaitingOn(_Model):
    """One activity of the run that has failed at least once and is being retried, as Temporal
    describes it (see client/waiting.py)."""

    activity: str  # the activity type
    waiting_for: str  # what it does, in words
    attempt: int  # the attempt running or due next
    maximum_attempts: int | None = None  # None: until the status's deadline
    state: str  # scheduled (waiting for its next attempt), started, cancel_requested
    last_error: str | None = None
    error_type: str | None = None
    next_attempt_at: datetime | None = None

    def describe(self) -> str:
        """One line: what, which attempt, when the next one starts, and why the last failed."""
        attempt = f"attempt {self.attempt}"
        if self.maximum_attempts:
            attempt += f" of {self.maximum_attempts}"
        if self.next_attempt_at is not None:
            attempt += f", next at {self.next_attempt_at.astimezone():%H:%M:%S}"
        error = ""
        if self.last_error:
            kind = f" ({self.error_type})" if self.error_type else ""
            error = f"; last error{kind}: {self.last_error}"
        return f"{self.waiting_for}: {attempt}{error}"


class RunStatus(_Model):
    """What the `status` query answers; `version` grows by one on every change."""

    run_id: str
    status: RunStatusName
    version: int = 0
    history: list[StatusChange] = Field(default_factory=list)
    attempt: int = 0
    progress: Progress | None = None
    gpu: GpuInfo | None = None
    cost_usd: float = 0.0
    best_checkpoint: int | None = Field(default=None, description="Epoch of the lowest loss.")
    epoch_losses: list[float] = Field(default_factory=list)
    epochs: list[SavedEpochInfo] = Field(
        default_factory=list, description="Every saved epoch, in order (`download --epoch N`)."
    )
    resumed: list[str] = Field(
        default_factory=list,
        description="Each resume of the run on a new host, e.g. 'resumed from epoch 7 on "
        "attempt 2'.",
    )
    result: ModelResult | None = None
    download_url: str | None = Field(
        default=None, repr=False, description="Presigned GET of the verified model."
    )
    gpu_failures: list[str] = Field(
        default_factory=list, description="Why each replaced GPU was given up, in order."
    )
    error: RunError | None = None
    webhooks: WebhookDeliveries | None = Field(
        default=None,
        description="Set by clients from the run's webhook children, never by the workflow.",
    )
    gpu_not_released: str | None = Field(
        default=None,
        description="A GPU the run could not destroy within its limit (instance id and last "
        "error); the reaper keeps destroying it.",
    )
    waiting_for_relay: str | None = Field(
        default=None,
        description="Set while a deadline passed with the relay down (why it is down): the "
        "GPU's events cannot reach the run, so the run waits for the relay instead of stalling.",
    )
    late_cancel_at: datetime | None = Field(
        default=None,
        description="When a cancel arrived after the run had reached its outcome (model verified "
        "and final webhook queued); the outcome stands.",
    )
    execution_status: str | None = Field(
        default=None,
        description="Set by clients from Temporal, never by the workflow: 'terminated' or "
        "'timed_out' when Temporal ended the run before it reached a final status.",
    )
    waiting_on: list[WaitingOn] = Field(
        default_factory=list,
        description="Set by clients from Temporal, never by the workflow: the run's activities "
        "that failed and are being retried (why the status does not move); empty otherwise.",
    )
