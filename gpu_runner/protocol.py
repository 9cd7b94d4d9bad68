"""The contract between the orchestrator and the GPU runner.

Everything that crosses the wire between the Temporal side and a rented GPU is defined here: the
job spec the runner reads, the training settings, the events it sends back, and how those events
are signed (Standard Webhooks, one secret per run derived from a master secret).

This module depends on pydantic and standardwebhooks only, so the GPU image stays small.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from standardwebhooks import Webhook, WebhookVerificationError

PROTOCOL_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
SIGNATURE_TOLERANCE_S = 5 * 60

BaseModelFamily = Literal["sd15", "sd2", "sdxl", "flux", "sd3", "other"]
"""Base model families; sd-scripts picks its script by family."""

TrainerName = Literal["sd-scripts", "builtin"]

Optimizer = Literal[
    "AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor", "DAdaptAdam", "SGDNesterov"
]
LrScheduler = Literal[
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_restarts",
    "linear",
    "polynomial",
]
MixedPrecision = Literal["no", "fp16", "bf16"]
# Which saved epoch's LoRA the run keeps as its model.
KeepPolicy = Literal["lowest_loss", "last"]
# sd-scripts' --sample_sampler values; the builtin trainer renders with the diffusers scheduler
# of the same name where it has one (SAMPLERS_BUILTIN) and with euler_a otherwise.
Sampler = Literal[
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
]

RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


# Base models people name on Civitai that are built on an architecture none of our families
# trains (Pony V7 is AuraFlow, not SDXL). Matched on the lowercased name's start.
UNSUPPORTED_BASE_MODELS: dict[str, str] = {
    "pony v7": "AuraFlow",
    "auraflow": "AuraFlow",
    "chroma": "Chroma",
    "qwen": "Qwen-Image",
    "hidream": "HiDream",
    "lumina": "Lumina",
    "kolors": "Kolors",
    "hunyuan": "Hunyuan",
    "pixart": "PixArt",
    "stable cascade": "Stable Cascade",
    "wan video": "Wan",
    "ltxv": "LTX-Video",
    "mochi": "Mochi",
    "cogvideox": "CogVideoX",
    "svd": "Stable Video Diffusion",
    "playground": "Playground",
    "sd 2.1 unclip": "SD 2.1 unCLIP",
}


def unsupported_architecture(base_model: str) -> str | None:
    """The architecture a named base model is built on when no family here trains it."""
    name = base_model.strip().lower().replace("_", " ")
    for prefix, architecture in UNSUPPORTED_BASE_MODELS.items():
        if name.startswith(prefix):
            return architecture
    return None


def base_model_family(base_model: str) -> BaseModelFamily:
    """Map a Civitai base model name ("SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D") to a family;
    "other" for every name no family here trains (`unsupported_architecture` names some)."""
    name = base_model.strip().lower().replace("_", " ")
    if unsupported_architecture(name) is not None:
        return "other"
    if name.startswith("flux"):
        return "flux"
    if name.startswith("sd 3") or name.startswith("sd3"):
        return "sd3"
    if "xl" in name or name in {"pony", "illustrious", "noobai"} or name.startswith("pony"):
        return "sdxl"
    if name.startswith("sd 1") or name in {"sd1", "sd15", "sd 1.5"}:
        return "sd15"
    if name.startswith("sd 2") or name in {"sd2", "sd21"}:
        return "sd2"
    return "other"


ComponentRole = Literal["clip_l", "clip_g", "t5xxl", "ae"]
"""Files beside the main checkpoint that a family's script loads on their own."""

# What each family's script needs besides its checkpoint, where the checkpoint does not hold
# it: Flux.1's transformer-only files never hold their text encoders or AE; SD 3.5 files may.
FAMILY_COMPONENTS: dict[str, tuple[ComponentRole, ...]] = {
    "flux": ("clip_l", "t5xxl", "ae"),
    "sd3": ("clip_l", "clip_g", "t5xxl"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Training settings
# --------------------------------------------------------------------------------------------

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {
        "resolution": 512,
        "batch_size": 2,
        "network_dim": 32,
        "network_alpha": 16,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "mixed_precision": "fp16",
        "gradient_checkpointing": True,
    },
    "sd2": {
        "resolution": 768,
        "batch_size": 2,
        "network_dim": 32,
        "network_alpha": 16,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "mixed_precision": "fp16",
        "gradient_checkpointing": True,
    },
    # SDXL trains the UNet only by default: it lets sd-scripts cache text encoder outputs.
    "sdxl": {
        "resolution": 1024,
        "batch_size": 1,
        "network_dim": 32,
        "network_alpha": 16,
        "unet_lr": 1e-4,
        "text_encoder_lr": 0.0,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
    },
    # sd-scripts' docs/flux_train_network.md: rank 16, lr 1e-4, "--timestep_sampling shift
    # --discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0" ("work
    # well"). Alpha 16, not the docs' 1: at lr 1e-4, alpha 1 scales every update by 1/16
    # (ai-toolkit's Flux recipe, rank 16 alpha 16 lr 1e-4, is the one people know). bf16: the
    # weights' dtype. Text encoders are not trained, so their outputs are cached.
    "flux": {
        "resolution": 1024,
        "batch_size": 1,
        "network_dim": 16,
        "network_alpha": 16,
        "unet_lr": 1e-4,
        "text_encoder_lr": 0.0,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "timestep_sampling": "shift",
        "discrete_flow_shift": 3.1582,
        "guidance_scale": 1.0,
    },
    # sd-scripts' docs/sd3_train_network.md: rank 16, lr 1e-4, weighting_scheme uniform.
    "sd3": {
        "resolution": 1024,
        "batch_size": 1,
        "network_dim": 16,
        "network_alpha": 16,
        "unet_lr": 1e-4,
        "text_encoder_lr": 0.0,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "weighting_scheme": "uniform",
    },
}

# Settings only some families' scripts have: set for another family, they are refused.
_FAMILY_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "blocks_to_swap": ("flux", "sd3"),
    "timestep_sampling": ("flux",),
    "discrete_flow_shift": ("flux",),
    "guidance_scale": ("flux",),
    "weighting_scheme": ("sd3",),
}

TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]


class TrainingConfig(_Model):
    """sd-scripts hyper-parameters. Fields left as None take the base model family's default."""

    resolution: int | None = Field(default=None, ge=64, le=2048, multiple_of=64)
    epochs: int = Field(default=10, ge=1, le=200)
    repeats: int = Field(default=10, ge=1, le=100)
    batch_size: int | None = Field(default=None, ge=1, le=16)
    network_dim: int | None = Field(default=None, ge=1, le=256)
    network_alpha: float | None = Field(default=None, gt=0, le=256)
    unet_lr: float | None = Field(default=None, gt=0, le=1e-2)
    text_encoder_lr: float | None = Field(default=None, ge=0, le=1e-2)
    optimizer: Optimizer = "AdamW8bit"
    lr_scheduler: LrScheduler = "cosine"
    lr_warmup_steps: int = Field(default=0, ge=0, le=10_000)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    mixed_precision: MixedPrecision | None = None
    output_name: str = Field(default="lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    trigger_word: str | None = Field(default=None, min_length=1, max_length=64)
    # What an image without a caption is: its caption becomes "<trigger_word>, <class_word>".
    class_word: str | None = Field(default=None, min_length=1, max_length=64)
    keep_tokens: int = Field(default=1, ge=0, le=10)
    max_train_steps: int | None = Field(default=None, ge=1, le=100_000)
    gradient_checkpointing: bool | None = None
    # Memory savings for Flux.1 / SD 3.5 (and fp8 for every family); None: chosen on the GPU
    # from its memory (gpu_runner/trainers/sd_scripts.py, memory_plan).
    fp8_base: bool | None = None
    blocks_to_swap: int | None = Field(default=None, ge=0, le=36)
    # Flux.1's flow matching (flux_train_network.py's options of the same names).
    timestep_sampling: TimestepSampling | None = None
    discrete_flow_shift: float | None = Field(default=None, gt=0, le=100)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    # SD 3.5's loss weighting by timestep (sd3_train_network.py's --weighting_scheme).
    weighting_scheme: WeightingScheme | None = None

    @model_validator(mode="after")
    def _only_the_familys_options(self, info: ValidationInfo) -> Self:
        family = (info.context or {}).get("family")
        if family is None:
            return self
        for name, families in _FAMILY_ONLY_FIELDS.items():
            value = getattr(self, name)
            if (
                value is not None
                and family not in families
                and not (name == "blocks_to_swap" and value == 0)
            ):
                names = " and ".join(families)
                raise ValueError(f"{name} applies to {names} models only, not {family}")
        return self

    @model_validator(mode="after")
    def _alpha_not_above_dim(self) -> Self:
        if (
            self.network_alpha is not None
            and self.network_dim is not None
            and self.network_alpha > self.network_dim
        ):
            raise ValueError(
                f"network_alpha ({self.network_alpha}) must not exceed network_dim "
                f"({self.network_dim})"
            )
        return self

    def for_family(self, family: BaseModelFamily) -> TrainingConfig:
        """This config with every unset field filled from the family's defaults."""
        return self.model_validate(
            {**self.model_dump(), **self._family_fill(family)}, context={"family": family}
        )

    def _family_fill(self, family: BaseModelFamily) -> dict[str, Any]:
        defaults = _FAMILY_DEFAULTS.get(family, _FAMILY_DEFAULTS["sd15"])
        return {k: v for k, v in defaults.items() if getattr(self, k) is None}

    def family_problems(self, family: BaseModelFamily) -> list[str]:
        """Why `for_family(family)` fails, one line per problem naming the fields and which of
        their values are the family's defaults; empty when it succeeds. The worker and the CLI
        both ask this, so a setting refused at the GPU is refused before anything starts."""
        filled = self._family_fill(family)
        try:
            self.for_family(family)
        except ValidationError as e:
            return [_family_problem(error, family, filled) for error in e.errors()]
        return []


def _family_problem(error: Any, family: BaseModelFamily, filled: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    line = f"{where}: {message}" if where else message
    named = [
        name for name in filled if name == where or re.search(rf"\b{name}\b", message) is not None
    ]
    if not named:
        return line
    values = ", ".join(f"{name}={filled[name]}" for name in named)
    if len(named) == 1:
        return f"{line}; {values} is the {family} default: set it as well"
    return f"{line}; {values} are the {family} defaults: set them as well"


# --------------------------------------------------------------------------------------------
# Samples and saved epochs
# --------------------------------------------------------------------------------------------


class SampleSettings(_Model):
    """Images rendered with each saved epoch's LoRA, so a user can judge the epochs."""

    enabled: bool = True
    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=list,
        max_length=16,
        description="Empty: the first `count` of the dataset's own captions, trigger word first.",
    )
    count: int = Field(default=2, ge=1, le=16, description="Captions sampled without prompts.")
    every_n_epochs: int = Field(default=1, ge=1, le=200)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    steps: int = Field(default=20, ge=1, le=150)
    width: int | None = Field(default=None, ge=64, le=2048, description="None: the resolution.")
    height: int | None = Field(default=None, ge=64, le=2048, description="None: the resolution.")
    guidance: float | None = Field(
        default=None, ge=0, le=30, description="None: the family's (7, Flux.1 3.5, SD 3.5 5)."
    )
    negative_prompt: str = Field(default="", max_length=1000)
    sampler: Sampler = "euler_a"

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Whether `epoch` gets samples: every n-th epoch, and the last one always."""
        return self.enabled and (epoch % self.every_n_epochs == 0 or epoch == last_epoch)


# A name inside one epoch's folder: the LoRA, the state archive, samples/<n>.png, the manifest.
EpochFileName = Annotated[str, Field(pattern=r"^(samples/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
EPOCH_LORA = "lora.safetensors"
EPOCH_STATE = "state.tar"
EPOCH_MANIFEST = "manifest.json"


class EpochFile(_Model):
    key: str
    bytes: int = Field(ge=0)
    sha256: Sha256Hex


class EpochManifest(_Model):
    """Written last, after every file it names is up: an epoch without it never counts."""

    run_id: RunId
    attempt: int = Field(ge=1)
    epoch: int = Field(ge=1)
    step: int = Field(ge=0)
    loss: float | None = None
    epoch_losses: list[float] = Field(default_factory=list, description="Epochs 1..epoch.")
    files: dict[EpochFileName, EpochFile]


class UploadUrlsRequest(_Model):
    """The runner asks the relay for presigned PUTs of one epoch's files (signed like events)."""

    run_id: RunId
    attempt: int = Field(ge=1)
    epoch: int = Field(ge=1, le=10_000)
    files: list[EpochFileName] = Field(min_length=1, max_length=64)


class UploadUrls(_Model):
    bucket: str
    urls: dict[str, str] = Field(repr=False)  # file name -> presigned PUT
    keys: dict[str, str]  # file name -> key
    expires_in_s: int


class RemoteFile(_Model):
    url: str = Field(repr=False, description="Presigned GET.")
    key: str
    bytes: int = Field(ge=0)
    sha256: Sha256Hex


class ResumeSource(_Model):
    """The last complete epoch of an earlier attempt: the replacement trains from the next."""

    epoch: int = Field(ge=1)
    step: int = Field(ge=0)
    attempt: int = Field(ge=1, description="The attempt that saved it.")
    epoch_losses: list[float]
    state: RemoteFile
    # The LoRAs this host may keep without training them: the resumed epoch's and the best
    # earlier one's, by epoch.
    loras: dict[int, RemoteFile] = Field(default_factory=dict)


class EpochUploads(_Model):
    """Where the runner asks for each epoch's upload URLs (the relay, with the run's secret)."""

    url: str


# --------------------------------------------------------------------------------------------
# Job spec
# --------------------------------------------------------------------------------------------


class ImagesSource(_Model):
    url: str = Field(repr=False, description="Presigned GET of the images zip.")
    sha256: Sha256Hex
    bytes: int = Field(ge=0)
    image_count: int = Field(ge=1)


class ModelComponent(_Model):
    """One file a family loads beside its checkpoint (a text encoder, the AE)."""

    role: ComponentRole
    url: str = Field(repr=False, description="Where to download it.")
    filename: str = Field(pattern=r"^[^/\\]{1,255}$")
    sha256: Sha256Hex | None = None
    bytes: int | None = Field(default=None, ge=0)
    needs_civitai_key: bool = False
    needs_hf_token: bool = False


class ModelSource(_Model):
    url: str = Field(repr=False, description="Where to download the base model.")
    filename: str = Field(pattern=r"^[^/\\]{1,255}$")
    sha256: Sha256Hex | None = None
    bytes: int | None = Field(default=None, ge=0)
    base_model: str = Field(description="As the source names it, e.g. 'SD 1.5'.")
    family: BaseModelFamily
    needs_civitai_key: bool = False
    needs_hf_token: bool = False
    # Read from the checkpoint's header: "dev"/"schnell" (Flux.1), "medium"/"large" (SD 3.5).
    variant: str | None = None
    # SD 2.x 768-v checkpoints predict v; the 512 ones (and every other family here) do not.
    v_parameterization: bool = False
    # The family's files that the checkpoint does not hold (FAMILY_COMPONENTS).
    components: list[ModelComponent] = Field(default_factory=list)


class UploadTarget(_Model):
    url: str = Field(repr=False, description="Presigned PUT for the best checkpoint.")
    bucket: str
    key: str
    max_bytes: int = Field(gt=0)


class RunnerLimits(_Model):
    max_runtime_s: int = Field(default=12 * 3600, gt=0)
    orphan_timeout_s: int = Field(
        default=30 * 60, gt=0, description="Give up when the relay is unreachable this long."
    )
    heartbeat_interval_s: int = Field(default=60, gt=0)


class JobSpec(_Model):
    """What the runner needs to do one run. Written to S3; holds secrets, so never logged."""

    protocol_version: int = PROTOCOL_VERSION
    run_id: RunId
    attempt: int = Field(default=1, ge=1, description="Which GPU attempt of the run this job is.")
    images: ImagesSource
    model: ModelSource
    civitai_api_key: str | None = Field(default=None, repr=False)
    # For gated Hugging Face files (Flux.1-dev); sent only when a file needs it.
    hf_token: str | None = Field(default=None, repr=False)
    training: TrainingConfig
    trainer: TrainerName = "sd-scripts"
    events_url: str = Field(description="The relay's POST endpoint for this run.")
    webhook_secret: str = Field(repr=False, pattern=r"^whsec_[A-Za-z0-9+/=]+$")
    upload: UploadTarget
    # Presigned PUT for the run's full log (runner and trainer output, secrets redacted).
    log_upload: UploadTarget | None = None
    # Presigned PUT for a .tar.gz of the trainer's TensorBoard logs, uploaded with the log.
    tensorboard_upload: UploadTarget | None = None
    limits: RunnerLimits = RunnerLimits()
    # Every epoch uploaded as it ends (None: only the kept LoRA, at the end, as before).
    epoch_uploads: EpochUploads | None = None
    samples: SampleSettings = SampleSettings(enabled=False)
    keep: KeepPolicy = "lowest_loss"
    resume: ResumeSource | None = None

    def secrets(self) -> list[str]:
        """Every value the runner must redact from logs it sends back."""
        values = [self.webhook_secret, self.civitai_api_key, self.hf_token]
        return [v for v in values if v]


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------

EventType = Literal[
    "gpu.ready",
    "images.ready",
    "model.ready",
    "files.ready",
    "training.progress",
    "training.completed",
    "model.uploaded",
    "run.failed",
    "heartbeat",
    "epoch.saved",
]

Stage = Literal["intake", "gpu", "images", "model", "files", "training", "upload", "runner"]


class GpuReadyData(BaseModel):
    gpu_name: str | None = None
    vram_mb: int | None = None
    driver: str | None = None
    free_disk_bytes: int | None = None


class ImagesReadyData(BaseModel):
    image_count: int = Field(ge=0)
    bytes: int = Field(ge=0)


class ModelReadyData(BaseModel):
    filename: str
    bytes: int = Field(ge=0)
    sha256_verified: bool


class FilesReadyData(BaseModel):
    total_steps: int | None = Field(default=None, ge=0)
    paths: dict[str, str] = {}
    # Where training runs ("cuda" or "cpu") and in what precision: "no" (fp32) without a GPU,
    # whatever the request asked for.
    device: str | None = None
    mixed_precision: MixedPrecision | None = None


class TrainingProgressData(BaseModel):
    step: int = Field(ge=0)
    total: int = Field(ge=0)
    epoch: int | None = Field(default=None, ge=0)
    total_epochs: int | None = Field(default=None, ge=0)
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None


class TrainingCompletedData(BaseModel):
    epoch_losses: list[float]
    best_epoch: int = Field(ge=1)


class ModelUploadedData(BaseModel):
    key: str
    bytes: int = Field(gt=0)
    sha256: Sha256Hex
    epoch: int = Field(ge=1)
    loss: float | None = None


class EpochSavedData(BaseModel):
    """An epoch whose files and manifest are all up (EpochManifest)."""

    epoch: int = Field(ge=1)
    total_epochs: int | None = Field(default=None, ge=1)
    step: int = Field(ge=0)
    loss: float | None = None
    bucket: str | None = None  # where the keys are
    lora: EpochFile
    samples: list[EpochFile] = []
    state: EpochFile | None = None
    manifest_key: str


class RunFailedData(BaseModel):
    stage: Stage
    code: str
    message: str
    log_tail: list[str] = []


class HeartbeatData(BaseModel):
    stage: Stage
    bytes_done: int | None = None
    bytes_total: int | None = None
    # The trainer's last step, so the workflow tells "alive but stuck" from "alive and training".
    step: int | None = Field(default=None, ge=0)
    # While a retried upload waits: which attempt failed and why (no URLs: query strings are
    # redacted), so a slow S3 reads as "retrying", not as silence.
    retry: int | None = Field(default=None, ge=1)
    error: str | None = Field(default=None, max_length=500)


EVENT_DATA: dict[str, type[BaseModel]] = {
    "gpu.ready": GpuReadyData,
    "images.ready": ImagesReadyData,
    "model.ready": ModelReadyData,
    "files.ready": FilesReadyData,
    "training.progress": TrainingProgressData,
    "training.completed": TrainingCompletedData,
    "model.uploaded": ModelUploadedData,
    "run.failed": RunFailedData,
    "heartbeat": HeartbeatData,
    "epoch.saved": EpochSavedData,
}


class RunnerEvent(_Model):
    """One event from a runner. `seq` increases by one per event of one attempt, starting at 1.

    A replaced GPU's runner starts again at seq 1, so events carry the attempt they belong to and
    the orchestrator ignores events of attempts other than the current one.
    """

    run_id: RunId
    attempt: int = Field(default=1, ge=1)
    seq: int = Field(ge=1)
    type: EventType
    at: datetime
    data: dict[str, Any] = {}

    @model_validator(mode="after")
    def _data_matches_type(self) -> Self:
        EVENT_DATA[self.type].model_validate(self.data)
        return self

    def parsed(self) -> BaseModel:
        """The event's data as its typed model (see EVENT_DATA)."""
        return EVENT_DATA[self.type].model_validate(self.data)

    @property
    def webhook_id(self) -> str:
        """The idempotency key: <run_id>:<attempt>:<seq>."""
        return f"{self.run_id}:{self.attempt}:{self.seq}"


def make_event(
    run_id: str, seq: int, data: BaseModel, event_type: EventType, attempt: int = 1
) -> RunnerEvent:
    """Build an event stamped now, with typed data."""
    return RunnerEvent(
        run_id=run_id,
        attempt=attempt,
        seq=seq,
        type=event_type,
        at=datetime.now(UTC),
        data=data.model_dump(mode="json", exclude_none=True),
    )


# --------------------------------------------------------------------------------------------
# Signing (Standard Webhooks)
# --------------------------------------------------------------------------------------------


class SignatureError(Exception):
    """A webhook whose signature headers are missing, malformed, wrong or outside tolerance."""


def derive_run_secret(master_secret: str, run_id: str, execution: str | None = None) -> str:
    """The run's webhook secret: whsec_ + base64(HMAC-SHA256(master, "runner:<run_id>:<first
    execution id>")), so a GPU can only ever sign for its own run, never for a later run that
    reuses the id. Without `execution`: "runner:<run_id>" (runs started before that)."""
    message = f"runner:{run_id}" if execution is None else f"runner:{run_id}:{execution}"
    digest = hmac.new(master_secret.encode("utf-8"), message.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode("ascii")


def sign_payload(
    secret: str, msg_id: str, body: bytes, at: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for `body` (the exact bytes that will be sent)."""
    timestamp = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, timestamp, body.decode("utf-8"))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def verify_payload(secret: str, headers: dict[str, str], body: bytes) -> None:
    """Raise SignatureError unless `body` is signed with `secret` within the tolerance."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError) as e:
        # standardwebhooks raises ValueError/binascii.Error on malformed headers, not only its own.
        raise SignatureError(str(e) or type(e).__name__) from None


def encode_event(event: RunnerEvent) -> bytes:
    """The canonical JSON body of an event."""
    return event.model_dump_json().encode("utf-8")


def sign_event(
    secret: str, event: RunnerEvent, at: datetime | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for POSTing `event` to the relay."""
    body = encode_event(event)
    return body, sign_payload(secret, event.webhook_id, body, at)


def parse_event(body: bytes) -> RunnerEvent:
    """Parse a verified body; raises ValueError with a readable message when it is not an event."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not JSON: {e}") from None
    try:
        return RunnerEvent.model_validate(payload)
    except ValidationError as e:
        raise ValueError(f"body is not a valid event: {describe_invalid(e)}") from None


def describe_invalid(error: ValidationError) -> str:
    """Where and what, never the input values (they may be secrets)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in error.errors()
    )
