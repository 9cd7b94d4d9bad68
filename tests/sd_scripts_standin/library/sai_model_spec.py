"""Stand-in for sd-scripts' library/sai_model_spec.py: the ModelSpec metadata of a LoRA.

What it computes, and how, is sd-scripts' own (checked at commit 48d368fa); only the
architectures and implementations of SD 1.x, SD 2.x and SDXL LoRAs are here.
"""

from __future__ import annotations

import datetime

ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"


def get_implementation_version() -> str:
    """sd-scripts asks `git rev-parse HEAD` in its folder and falls back to "sd-scripts/unknown",
    as on the GPU image, which deletes sd-scripts' .git (see train_util.get_git_revision_hash)."""
    return "sd-scripts/unknown"


def determine_resolution(
    reso: int | tuple[int, int] | None, sdxl: bool, v2: bool, v_parameterization: bool
) -> str:
    """The training resolution from --resolution; without it, the model type's default size
    (sd-scripts does not look at the dataset config here)."""
    if reso is not None:
        if isinstance(reso, str):
            reso = tuple(map(int, reso.split(",")))  # type: ignore[assignment]
        if isinstance(reso, int):
            reso = (reso, reso)
        if len(reso) == 1:
            reso = (reso[0], reso[0])
    elif sdxl:
        reso = (1024, 1024)
    elif v2 and v_parameterization:
        reso = (768, 768)
    else:
        reso = (512, 512)
    return f"{reso[0]}x{reso[1]}"


def build_metadata(
    v2: bool,
    v_parameterization: bool,
    sdxl: bool,
    timestamp: float,
    title: str,
    reso: int | tuple[int, int] | None,
) -> dict[str, str]:
    """A LoRA's modelspec.* keys, None values left out as sd-scripts' to_metadata_dict does."""
    if sdxl:
        architecture = ARCH_SD_XL_V1_BASE
    elif v2:
        architecture = ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512
    else:
        architecture = ARCH_SD_V1
    return {
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPL_STABILITY_AI if sdxl else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.resolution": determine_resolution(reso, sdxl, v2, v_parameterization),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.implementation_version": get_implementation_version(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
