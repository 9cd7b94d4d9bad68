"""What a GPU must have for a run: the user's requirements raised to what the family needs.

Pure and deterministic (no I/O, no clock): the workflow calls `effective_requirements` before it
rents, and `loratrain estimate` calls it to show which GPUs qualify.

The per-family minimums are the sd-scripts trainer's (`vram_needed_gb`, `disk_needed_gb` in
gpu_runner/trainers/sd_scripts.py), which knows the memory-saving options it turns on (fp8 base,
block swap) and chooses them on the GPU it gets.
"""

from __future__ import annotations

from pydantic import ValidationError

from gpu_runner.protocol import BaseModelFamily, TrainingConfig
from gpu_runner.trainers.sd_scripts import disk_needed_gb, vram_needed_gb
from workflows.models import GpuRequirements


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
