"""The runner's own settings (it imports nothing from the orchestrator). Prefix LORA_."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORA_", extra="ignore")

    # The only value an instance is given: a presigned GET of runs/<run_id>/job.json.
    job_url: str | None = None

    # Everything below has image defaults; LORA_RUNNER_* overrides exist for tests and dev.
    runner_workdir: Path = Path("/workspace/loratrain")
    runner_sd_scripts_dir: Path = Path("/opt/sd-scripts")
    runner_accelerate_command: list[str] = ["accelerate"]
    runner_tokenizer_cache_dir: Path = Path("/opt/tokenizers")
    runner_require_gpu: bool = True
    runner_http_timeout_s: float = 30.0
    # Where the runner destroys its own Vast instance when it gives up (gpu_runner/self_destroy).
    runner_vast_api_url: str = "https://console.vast.ai"
    # At most one training.progress event this often (plus one per epoch and the last step).
    runner_progress_interval_s: float = 10.0
    runner_retry_initial_s: float = 1.0
    runner_retry_max_s: float = 60.0
    runner_max_unzipped_bytes: int = 6 * 1024**3
    # Free disk kept beyond model + images x2 (unzipped copy) for checkpoints and logs.
    runner_disk_margin_bytes: int = 2 * 1024**3
    # "module:callable" taking RunnerSettings and returning a Trainer; overrides the job's trainer.
    # For tests and the embedded demo on machines without sd-scripts; unset in the GPU image.
    runner_trainer_factory: str | None = None
    # How long the trainer's process group gets to exit after SIGTERM before SIGKILL. A healthy
    # sd-scripts exits at once (no handler of its own); one that takes longer is hung. Kept short
    # so that a host's SIGTERM-to-SIGKILL wait holds it and the runner's last events (the local
    # provider's STOP_TIMEOUT_S).
    runner_trainer_stop_grace_s: float = 5.0
