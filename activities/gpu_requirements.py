"""What a GPU must have for a run: the user's requirements raised to what the family needs.

Pure and deterministic (no I/O, no clock): the workflow calls `effective_requirements` before it
rents, and `loratrain estimate` calls it to show which GPUs qualify.

The per-family minimums come from the sd-scripts trainer (`vram_needed_gb`, `disk_needed_gb` in
gpu_runner/trainers/sd_scripts.py), which knows the memory-saving options it turns on. Where that
trainer module predates them, the table below stands in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import ValidationError

from gpu_runner.protocol import BaseModelFamily, TrainingConfig
from gpu_runner.trainers import sd_scripts
from workflows.models import GpuRequirements

# Minimal VRAM (GB) per family with sd-scripts' savings (cached latents, gradient checkpointing,
# fp8 base for Flux and SD 3.5 large); SDXL needs more when it trains the text encoders.
_VRAM_GB: dict[str, int] = {"sd15": 8, "sd2": 10, "sdxl": 12, "flux": 16}
_SDXL_TEXT_ENCODER_VRAM_GB = 16
_SD3_VRAM_GB = {"medium": 12, "large": 24}
# Files a family loads beside its checkpoint when the checkpoint lacks them (t5xxl fp16 9.8 GB,
# clip_l 0.25 GB, clip_g 1.4 GB, ae 0.34 GB), and room for latents, checkpoints and logs.
_COMPONENTS_GB: dict[str, float] = {"flux": 10.4, "sd3": 11.5}
_WORKING_DISK_GB = 10.0


def _table_vram_needed_gb(
    family: BaseModelFamily, variant: str | None, config: TrainingConfig
) -> int:
    if family == "sdxl" and (config.text_encoder_lr or 0) > 0:
        return _SDXL_TEXT_ENCODER_VRAM_GB
    if family == "sd3":
        # An unknown SD 3 variant is taken as the larger one: renting too small a GPU wastes
        # the run, too large a one only some cents.
        return _SD3_VRAM_GB.get((variant or "").lower(), _SD3_VRAM_GB["large"])
    return _VRAM_GB.get(family, 0)


def _table_disk_needed_gb(family: BaseModelFamily, config: TrainingConfig, model_bytes: int) -> int:
    needed = model_bytes / 1e9 + _COMPONENTS_GB.get(family, 0.0) + _WORKING_DISK_GB
    return math.ceil(needed)


vram_needed_gb: Callable[[BaseModelFamily, str | None, TrainingConfig], int] = getattr(
    sd_scripts, "vram_needed_gb", _table_vram_needed_gb
)
disk_needed_gb: Callable[[BaseModelFamily, TrainingConfig, int], int] = getattr(
    sd_scripts, "disk_needed_gb", _table_disk_needed_gb
)


def filled_config(config: TrainingConfig, family: BaseModelFamily) -> TrainingConfig:
    """The config with the family's defaults, or as given where they do not apply (the run's
    intake refuses such settings on its own; this never raises)."""
    try:
        return config.for_family(family)
    except ValidationError:
        return config


def family_minimums(
    family: BaseModelFamily, variant: str | None, config: TrainingConfig, model_bytes: int | None
) -> tuple[int, int]:
    """(VRAM GB, disk GB) the family's run needs with these settings; (0, 0) for `other`, which
    no trainer here takes."""
    if family == "other":
        return 0, 0
    filled = filled_config(config, family)
    return (
        vram_needed_gb(family, variant, filled),
        disk_needed_gb(family, filled, model_bytes or 0),
    )


def effective_requirements(
    request_gpu: GpuRequirements,
    family: BaseModelFamily,
    variant: str | None,
    config: TrainingConfig,
    model_bytes: int | None,
) -> GpuRequirements:
    """The requirements the offer search uses: the user's, with `min_vram_gb` and `disk_gb`
    raised to what the family needs with these settings (never lowered)."""
    vram_gb, disk_gb = family_minimums(family, variant, config, model_bytes)
    limits = GpuRequirements.model_fields
    vram_cap = _upper_bound(limits["min_vram_gb"].metadata, request_gpu.min_vram_gb)
    disk_cap = _upper_bound(limits["disk_gb"].metadata, request_gpu.disk_gb)
    return request_gpu.model_copy(
        update={
            "min_vram_gb": min(max(request_gpu.min_vram_gb, vram_gb), vram_cap),
            "disk_gb": min(max(request_gpu.disk_gb, disk_gb), disk_cap),
        }
    )


def _upper_bound(metadata: list[object], fallback: int) -> int:
    """A field's `le` limit, so the raised value still validates as a GpuRequirements."""
    for item in metadata:
        le = getattr(item, "le", None)
        if isinstance(le, int):
            return max(le, fallback)
    return fallback
