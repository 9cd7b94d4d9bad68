"""The one settings class. Every value comes from an environment variable prefixed `LORA_`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SEARCH_ATTRIBUTE = "LoraTrainingStatus"

# Written by `loratrain dev` into its state dir on its first start (codec key, master secret,
# local S3), so every command, run from any directory, talks to the embedded stack. Real
# environment variables win over it.
DEV_ENV_NAME = "dev.env"
STATE_DIR_VARIABLE = "LORA_STATE_DIR"


def default_state_dir() -> Path:
    """The per-user state location: `$XDG_STATE_HOME/loratrain` or `~/.local/state/loratrain`."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "loratrain"


def read_pem(path: Path) -> bytes:
    """A PEM file's bytes; ValueError saying why when it cannot be read or holds no PEM block."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path} is not a PEM file (no -----BEGIN line)")
    return data


def dev_env_file(init_values: dict[str, Any] | None = None) -> Path:
    """The dev env file of the state dir these settings will have (init value, env, default)."""
    given = (init_values or {}).get("state_dir") or os.environ.get(STATE_DIR_VARIABLE)
    return (Path(given) if given else default_state_dir()) / DEV_ENV_NAME


class Settings(BaseSettings):
    # No env file of its own: `()` marks "not given", so settings_customise_sources can put the
    # state dir's dev.env there, while an explicit `_env_file` (None: none) still replaces it.
    model_config = SettingsConfigDict(
        env_prefix="LORA_", env_file=(), env_file_encoding="utf-8", extra="ignore"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Below init values and the environment: the state dir's dev env file, wherever the
        command runs (unless `_env_file` names other files, or None)."""
        if isinstance(dotenv_settings, DotEnvSettingsSource) and dotenv_settings.env_file == ():
            init_values = (
                init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
            )
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=dev_env_file(init_values))
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "loratrain"
    # Names this deployment in instance labels (loratrain:<deployment>:<run_id>:<attempt>), so
    # deployments sharing a provider account never reap each other; default: namespace.queue.
    deployment: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    # Temporal Cloud or a cluster with TLS on. TLS is on when temporal_tls is true or any of the
    # others is set: an API key (Temporal Cloud's API-key auth, sent as a bearer token, so never
    # in plain text), a client certificate and its key (mTLS; PEM files), the CA that signed the
    # server's certificate (default: the system's roots), the name that certificate carries where
    # the address does not.
    temporal_api_key: SecretStr | None = None
    temporal_tls: bool = False
    temporal_tls_cert_path: Path | None = None
    temporal_tls_key_path: Path | None = Field(default=None, validate_default=True)
    temporal_tls_ca_path: Path | None = None
    temporal_tls_server_name: str | None = None
    temporal_ui_url: str = "http://127.0.0.1:8233"
    # How long a CLI command waits for a run to answer its status query (a worker must be up).
    query_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # AES-256-GCM key for workflow payloads, base64 of 32 bytes. Required outside the dev stack.
    codec_key: SecretStr | None = None
    codec_key_id: str = "k1"

    # S3 (real S3, R2, MinIO or the embedded stack's SeaweedFS)
    s3_endpoint_url: str | None = None
    # The S3 address a GPU box reaches (the internet's view); used only to presign its URLs.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    bucket: str = "loratrain"
    job_url_ttl_s: int = 15 * 60
    download_url_ttl_s: int = 24 * 3600
    upload_url_ttl_s: int = 7 * 24 * 3600 - 60
    # The relay's presigned PUTs for one saved epoch's files: long enough for a large training
    # state on a slow uplink, short enough that a lost GPU cannot write for long.
    epoch_upload_url_ttl_s: int = Field(default=2 * 3600, ge=60, le=7 * 24 * 3600)

    # Dataset limits
    max_image_bytes: int = 50 * 1024 * 1024
    max_images: int = 1000
    max_dataset_bytes: int = 5 * 1024 * 1024 * 1024
    max_model_bytes: int = 2 * 1024 * 1024 * 1024

    # Relay
    relay_host: str = "127.0.0.1"
    relay_port: int = 8088
    relay_public_url: str = "http://127.0.0.1:8088"
    # Before a run calls a stall on a GPU's missing event, the worker asks the relay's /healthz
    # whether events can reach runs at all, and waits out an outage of its own relay instead.
    # relay_health_url: where the worker reaches that (default: relay_public_url's /healthz;
    # set it where the worker cannot reach the public address). The check is off only where no
    # relay serves runs (workflow tests signal runs directly).
    relay_health_check: bool = True
    relay_health_url: str | None = None
    webhook_master_secret: SecretStr | None = None
    # User webhooks go to https URLs on public addresses only. The embedded stack (and tests)
    # allow http and loopback/private receivers; never turn these on where users are strangers.
    # Link-local and cloud metadata addresses are refused even then (activities/notify.py).
    webhook_allow_http: bool = False
    webhook_allow_private_addresses: bool = False
    # Signed runner events one relay process accepts per run and minute. A runner sends about
    # 7 (progress every 10 s, a heartbeat a minute); a flood would only grow the run's history.
    relay_max_events_per_minute: int = 30
    # Progress and heartbeats of a run reach its workflow at most once per this many seconds
    # (the newest of them; milestones at once); 0 signals every event as it comes.
    relay_progress_interval_s: float = Field(default=10.0, ge=0)
    # A run nobody watches wants its progress less often (every few minutes: a progress signal
    # is most of a training run's history); the relay asks each run this often.
    relay_progress_recheck_s: float = Field(default=30.0, gt=0)
    # When set, the codec routes answer only requests with `Authorization: Bearer <token>`;
    # set it wherever GPU boxes (the public internet) can reach the relay.
    codec_auth_token: SecretStr | None = None
    codec_cors_origins: list[str] = ["http://127.0.0.1:8233", "http://localhost:8233"]

    # Civitai
    civitai_base_url: str = "https://civitai.com"
    civitai_api_key: SecretStr | None = None

    # Hugging Face (hf:<repo>[@rev]/<file> models and the families' default text encoders/AE);
    # the token is for gated or private repos (Flux.1-dev, SD 3.5) and travels only to GPUs
    # whose job downloads such a file.
    hf_base_url: str = "https://huggingface.co"
    hf_token: SecretStr | None = None

    # Workflows one worker keeps in memory (about 0.35 MB each): past it, every signal, timer
    # and query of an evicted run replays its history. Above the runs one worker carries, with
    # room for their webhook children and the fleet watch.
    worker_max_cached_workflows: int = Field(default=2000, ge=10)

    # GPU providers
    gpu_provider: Literal["local", "vast"] = "local"
    # The deployment's fleet watch lists its instances once per this many seconds and tells
    # the runs whose host exited or went (one provider call per interval for all runs).
    fleet_watch_interval_s: float = Field(default=10.0, gt=0)
    # Every worker starts the fleet watch again within this many seconds once it stops.
    fleet_watch_ensure_s: float = Field(default=60.0, gt=0)
    local_runner_command: list[str] = Field(
        default_factory=lambda: [sys.executable, "-m", "gpu_runner"]
    )
    vast_api_key: SecretStr | None = None
    vast_base_url: str = "https://console.vast.ai"
    # The GPU image (gpu_runner/Dockerfile) pushed to a registry Vast hosts can pull from.
    vast_image: str = "ghcr.io/loratrain/loratrain-gpu:latest"
    vast_image_bytes: int = 10 * 1024**3
    # The newest CUDA the image needs from the host's driver (nvidia/cuda:12.4 base).
    vast_min_cuda: float = 12.4
    # Free disk beyond the image and twice the downloads (unzipped copy), for checkpoints.
    vast_disk_margin_gb: int = 10
    # Ranking estimate: training seconds on a GPU with dlperf = vast_reference_dlperf, and the
    # bytes a run uploads: activities/estimate.py's `upload_bytes` for 10 epochs of an SDXL LoRA
    # at its defaults (rank 32, AdamW8bit, 2 samples an epoch), each epoch's LoRA and state.
    vast_reference_training_s: float = 3600.0
    vast_reference_dlperf: float = 30.0
    vast_reference_upload_bytes: int = Field(default=7_300_000_000, ge=0)
    # Container start after the image is on the host, seconds.
    vast_boot_overhead_s: float = 60.0
    # How many ranked offers one allocation tries before it gives up (and retries later).
    vast_offers_per_allocation: int = Field(default=5, ge=1, le=50)
    # Offers within this fraction of the best expected cost are near-equals: allocations start
    # at different ones (by label), so runs renting at once rarely ask for the same offer.
    vast_offer_tier_tolerance: float = Field(default=0.05, ge=0, le=1)
    vast_offer_search_limit: int = Field(default=64, ge=1, le=1000)
    # Tries per call on 502/503/504 and connection errors (never for a create, which is looked
    # up by its label instead of being sent again).
    vast_sdk_retries: int = Field(default=4, ge=1, le=10)
    # Vast's limits per endpoint and API key (its OpenAPI `x-rate-limit`): the least seconds
    # between two calls, the create's penalty when one comes sooner, and the offer searches
    # allowed per window. One process keeps within them for its key; 429s are waited out.
    vast_show_interval_s: float = Field(default=2.0, ge=0)
    vast_destroy_interval_s: float = Field(default=3.0, ge=0)
    vast_create_interval_s: float = Field(default=4.5, ge=0)
    vast_create_penalty_s: float = Field(default=12.0, ge=0)
    vast_list_interval_s: float = Field(default=1.0, ge=0)
    vast_searches_per_window: int = Field(default=10, ge=1)
    vast_search_window_s: float = Field(default=60.0, ge=0)
    # 429s one call waits out (Vast sends no Retry-After) before it fails and the activity retries.
    vast_rate_limit_retries: int = Field(default=5, ge=0, le=50)
    # A create can be slow (the SDK's own default); one whose answer is lost is looked up by its
    # label for this long before the allocation fails and retries.
    vast_create_timeout_s: float = Field(default=120.0, gt=0)
    vast_create_settle_s: float = Field(default=45.0, ge=0)
    # How long destroy checks (at the show endpoint's pace, backing off) that Vast unlisted it.
    vast_destroy_confirm_s: float = Field(default=30.0, ge=0)
    # The longest a call other than create waits for its turn at the pace before it fails as
    # unanswered (an instance check then counts as not asked; the next one tries again), so
    # queued checks never hold the worker's activity threads. Creates wait their turn.
    vast_pace_max_wait_s: float = Field(default=20.0, gt=0)

    # Where the embedded stack keeps its state (SQLite, dev.env, logs, instances, S3 data);
    # one per user, so every command finds the running stack from any directory.
    state_dir: Path = Field(default_factory=default_state_dir)
    # The embedded S3 server (SeaweedFS) listens on the S3 endpoint's port and, inside, on four
    # consecutive ports from this one (master, volume, filer, admin); each of those five also
    # on its port + 10000 (gRPC).
    local_s3_internal_port: int = Field(default=19333, ge=1024, le=65535 - 10000 - 3)

    # HTTP timeouts for every outbound call, seconds.
    http_timeout_s: float = 30.0

    @field_validator("temporal_tls_cert_path", "temporal_tls_ca_path", "temporal_tls_key_path")
    @classmethod
    def _readable_pem(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        """A TLS file is read here, so a wrong path stops every command at once, in one line."""
        if path is not None:
            try:
                read_pem(path)
            except ValueError as e:
                raise PydanticCustomError("tls_file", str(e)) from None
        if info.field_name == "temporal_tls_key_path":
            # Absent when the certificate's own check failed: that error is enough.
            cert = info.data.get("temporal_tls_cert_path", path)
            if (cert is None) != (path is None):
                raise PydanticCustomError(
                    "tls_pair",
                    "mTLS needs both LORA_TEMPORAL_TLS_CERT_PATH and LORA_TEMPORAL_TLS_KEY_PATH",
                )
        return path

    def require_master_secret(self) -> str:
        if self.webhook_master_secret is None:
            raise RuntimeError("LORA_WEBHOOK_MASTER_SECRET is not set")
        return self.webhook_master_secret.get_secret_value()

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def deployment_name(self) -> str:
        """This deployment's name in instance labels: `deployment`, or namespace.task_queue."""
        if self.deployment:
            return self.deployment
        derived = re.sub(
            r"[^a-z0-9._-]+", "-", f"{self.temporal_namespace}.{self.task_queue}".lower()
        )
        return derived.strip("-._")[:63] or "loratrain"
