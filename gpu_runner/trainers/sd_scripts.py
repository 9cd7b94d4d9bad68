"""Train with kohya-ss sd-scripts as a child process (`accelerate launch <script> --config_file`).

How it fits together:
- `prepare` writes two TOML files: the dataset config (DreamBooth-style subsets with .txt captions)
  and the training arguments (a typed model whose field names are sd-scripts' argparse dests,
  because sd-scripts silently accepts unknown keys in `--config_file`).
- `prepare` also writes accelerate's config for this run from what the runner found on this
  machine (a GPU or not, the mixed precision), and `command` passes the same choices as flags:
  nothing about the machine is decided when the image is built, and no accelerate config already
  on the machine is read.
- `train` runs our launcher (launcher.py) under `accelerate launch` and logs that command. The
  launcher runs the chosen sd-scripts script with its NetworkTrainer's logging hooks reporting
  each step's loss and each epoch's average loss as JSON lines. Where those hooks are missing,
  the launcher runs the script as it is, and the epoch losses come from the tqdm bar's
  `avr_loss` instead (see OutputTracker).
- The LoRA's metadata names what made it: the launcher tells sd-scripts its commit
  (SD_SCRIPTS_COMMIT) where git cannot (the image deletes sd-scripts' .git), and the training
  arguments carry the resolution, which sd-scripts' modelspec.resolution reads from there (not
  from the dataset config).
- sd-scripts' TensorBoard logs (its logging_dir) are the prepared training's tensorboard_dir,
  which the runner uploads with its log.
- Output (stdout and stderr merged, so their order is kept) is parsed for step, epoch and loss;
  the checkpoint of the epoch with the lowest average loss is the result.
- `stop` signals the whole process group: accelerate alone would leave the trainer running.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from gpu_runner.protocol import (
    FAMILY_COMPONENTS,
    BaseModelFamily,
    MixedPrecision,
    TrainingConfig,
    TrainingProgressData,
)
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import (
    PreparedTraining,
    ProgressCallback,
    SavedEpoch,
    TrainerError,
    TrainingInputs,
    TrainingResult,
    kept_epoch,
    sample_prompts,
)

SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
"""The sd-scripts commit the image pins and this module's formats were checked against."""

LAUNCHER_PATH = Path(__file__).with_name("launcher.py")
EVENT_PREFIX = "@@loratrain "  # launcher.py writes its JSON lines after this marker
LOG_TAIL_LINES = 50
REDACTED = "***"

# sd-scripts' own image extensions (library/train_util.py IMAGE_EXTENSIONS); it does not recurse.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# What sd-scripts' strategies fetch from the HF hub unless tokenizer_cache_dir holds
# <model id with "/" replaced by "_">; the image bakes these in (see gpu_runner/Dockerfile).
TOKENIZER_IDS = (
    "openai/clip-vit-large-patch14",  # SD 1.x and SDXL's first text encoder
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",  # SDXL's second text encoder
    "stabilityai/stable-diffusion-2",  # SD 2.x (its "tokenizer" subfolder)
    "google/t5-v1_1-xxl",  # Flux.1 and SD 3.x's T5-XXL
)

_T = TypeVar("_T")

# Per family: the script, its LoRA module, and the files flags its parser takes beside the
# checkpoint (sd-scripts' docs/flux_train_network.md, sd3_train_network.md).
SCRIPTS: dict[str, str] = {
    "sd15": "train_network.py",
    "sd2": "train_network.py",
    "sdxl": "sdxl_train_network.py",
    "flux": "flux_train_network.py",
    "sd3": "sd3_train_network.py",
}
NETWORK_MODULES: dict[str, str] = {
    "sd15": "networks.lora",
    "sd2": "networks.lora",
    "sdxl": "networks.lora",
    "flux": "networks.lora_flux",
    "sd3": "networks.lora_sd3",
}
# Families whose captions go to T5-XXL as sentences: no tag shuffling, and their text encoder
# outputs are cached (which sd-scripts refuses together with shuffle_caption).
T5_FAMILIES = frozenset({"flux", "sd3"})


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


class _Toml(BaseModel):
    # sd-scripts rejects unknown dataset keys but silently ignores unknown training arguments:
    # forbidding extras here catches a misspelt name before it reaches either.
    model_config = ConfigDict(extra="forbid")


class DatasetSubset(_Toml):
    """One [[datasets.subsets]] entry (config_util's DreamBooth subset schema)."""

    image_dir: str
    num_repeats: int
    caption_extension: str = ".txt"  # sd-scripts' default is ".caption"
    class_tokens: str | None = None  # the caption of an image without a .txt file
    keep_tokens: int = 0


class DatasetGeneral(_Toml):
    """The [general] table (config_util's dataset-level keys)."""

    resolution: int
    batch_size: int
    enable_bucket: bool = True
    min_bucket_reso: int
    max_bucket_reso: int


class DatasetEntry(_Toml):
    subsets: list[DatasetSubset]


class DatasetConfig(_Toml):
    """The file passed as `dataset_config`."""

    general: DatasetGeneral
    datasets: list[DatasetEntry]


class TrainingArguments(_Toml):
    """The file passed as `--config_file`: field names are sd-scripts' argparse dests.

    Checked against train_network.py, sdxl_/flux_/sd3_train_network.py and library/*_util.py
    at SD_SCRIPTS_COMMIT (tests/test_sd_scripts_families.py parses it with their parsers).
    sd-scripts does not type-check values read from this file, so the types here are the ones
    its code expects. None is left out of the file (the script's default).
    """

    pretrained_model_name_or_path: str
    # The family's files beside the checkpoint (Flux.1: all three; SD 3.5: those it lacks).
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    tokenizer_cache_dir: str
    dataset_config: str
    output_dir: str
    output_name: str
    save_model_as: Literal["safetensors"] = "safetensors"
    save_every_n_epochs: int = 1
    save_precision: Literal["float", "fp16", "bf16"]
    max_train_epochs: int | None = None
    max_train_steps: int | None = None
    network_module: str = "networks.lora"
    network_dim: int
    network_alpha: float
    network_train_unet_only: bool = False
    learning_rate: float
    unet_lr: float
    text_encoder_lr: float | None = None
    optimizer_type: str
    lr_scheduler: str
    lr_warmup_steps: int
    seed: int
    mixed_precision: Literal["no", "fp16", "bf16"]
    no_half_vae: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool | None = None
    cache_text_encoder_outputs: bool | None = None
    cache_text_encoder_outputs_to_disk: bool | None = None
    gradient_checkpointing: bool = True
    sdpa: bool = True
    fp8_base: bool | None = None
    blocks_to_swap: int | None = None
    # Flux.1 (library/flux_train_utils.py add_flux_train_arguments)
    timestep_sampling: str | None = None
    discrete_flow_shift: float | None = None
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] | None = None
    guidance_scale: float | None = None
    # SD 3.5 (library/train_util.py add_dit_training_arguments)
    weighting_scheme: str | None = None
    max_data_loader_n_workers: int = 2
    persistent_data_loader_workers: bool = True
    # With a logging dir sd-scripts tracks to TensorBoard, and only then calls the
    # step_logging/epoch_logging hooks that the launcher reports through.
    logging_dir: str
    # "width,height". Training reads the dataset config's; the LoRA's modelspec.resolution reads
    # only this one (without it: 512x512, or 1024x1024 for SDXL, whatever the run trained at).
    resolution: str
    # Every epoch's accelerate state (<output_name>-<epoch>-state/), when epochs are uploaded.
    save_state: bool | None = None
    # Samples with each saved epoch (library/train_util.py sample_images; prompt file lines).
    sample_prompts: str | None = None
    sample_every_n_epochs: int | None = None
    sample_sampler: str | None = None


class AccelerateConfig(_Toml):
    """The file passed to `accelerate launch --config_file`: one process on this machine.

    Keys are accelerate's ClusterConfig fields (checked in accelerate 1.6.0, which sd-scripts pins,
    and 1.16.0); accelerate refuses a file with unknown keys.
    """

    compute_environment: Literal["LOCAL_MACHINE"] = "LOCAL_MACHINE"
    distributed_type: Literal["NO"] = "NO"
    num_processes: Literal[1] = 1
    num_machines: Literal[1] = 1
    use_cpu: bool
    mixed_precision: MixedPrecision
    debug: bool = False


def accelerate_config(
    device: str | None, mixed_precision: MixedPrecision | None
) -> AccelerateConfig:
    """accelerate's settings for a run on `device` ("cuda", or anything else for the CPU)."""
    return AccelerateConfig(use_cpu=device != "cuda", mixed_precision=mixed_precision or "no")


def dumps_toml(document: dict[str, Any]) -> str:
    """TOML for sd-scripts' config files: scalars, lists of scalars, tables, arrays of tables."""
    lines: list[str] = []
    _write_table(lines, "", document)
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], name: str, table: dict[str, Any]) -> None:
    nested: list[tuple[str, Any]] = []
    for key, value in table.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"TOML key {key!r} is not a bare key")
        if value is None:
            continue
        if isinstance(value, dict) or _is_table_array(value):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in nested:
        child = f"{name}.{key}" if name else key
        for item in [value] if isinstance(value, dict) else value:
            lines.extend(["", f"[{child}]" if isinstance(value, dict) else f"[[{child}]]"])
            _write_table(lines, child, item)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string: same quotes and escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def script_for(family: str) -> str:
    """The sd-scripts script that trains a LoRA for this base model family."""
    script = SCRIPTS.get(family)
    if script is None:
        raise TrainerError(
            "unsupported_model",
            f"sd-scripts trains no LoRA for base model family {family!r}: use an SD 1.x, SD 2.x, "
            "SDXL, Flux.1 or SD 3.5 model.",
            stage="files",
        )
    return script


def write_captions(
    folders: list[tuple[Path, int]], trigger_word: str | None, class_word: str | None
) -> None:
    """Make the trigger word the first token of every image's caption, and give an image
    without a caption "<trigger_word>, <class_word>" (either alone when the other is unset).

    sd-scripts uses class_tokens only for images without a caption file, and its caption_prefix
    would double the word on those; so the captions themselves are rewritten (keep_tokens keeps
    the first token in place for CLIP families; T5 families read it as the caption's start).
    """
    missing = ", ".join(word for word in (trigger_word, class_word) if word)
    for folder, _ in folders:
        for image in sorted(folder.iterdir()):
            if not image.is_file() or image.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_file = image.with_suffix(".txt")
            caption = (
                caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else ""
            )
            if not caption:
                caption = missing
            elif trigger_word and caption.split(",", 1)[0].strip() != trigger_word:
                caption = f"{trigger_word}, {caption}"
            caption_file.write_text(caption, encoding="utf-8")


def image_dirs(dataset_dir: Path) -> list[tuple[Path, int]]:
    """Every folder under dataset_dir that holds images, with its image count (sd-scripts reads
    one folder per subset, not recursively)."""
    found: list[tuple[Path, int]] = []
    for folder in sorted([dataset_dir, *(p for p in dataset_dir.rglob("*") if p.is_dir())]):
        relative = folder.relative_to(dataset_dir).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in relative):
            continue
        count = sum(
            1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if count:
            found.append((folder, count))
    return found


def dataset_config(inputs: TrainingInputs, folders: list[tuple[Path, int]]) -> DatasetConfig:
    config = inputs.config
    resolution = _required(config.resolution, "resolution")
    return DatasetConfig(
        general=DatasetGeneral(
            resolution=resolution,
            batch_size=_required(config.batch_size, "batch_size"),
            min_bucket_reso=min(256, resolution),
            max_bucket_reso=max(1024, resolution),
        ),
        datasets=[
            DatasetEntry(
                subsets=[
                    DatasetSubset(
                        image_dir=str(folder),
                        num_repeats=config.repeats,
                        class_tokens=config.trigger_word,
                        # keep_tokens guards the trigger word from shuffle_caption, which
                        # T5 families never get (their text encoder outputs are cached).
                        keep_tokens=0 if inputs.family in T5_FAMILIES else config.keep_tokens,
                    )
                    for folder, _ in folders
                ]
            )
        ],
    )


def training_arguments(
    inputs: TrainingInputs, settings: RunnerSettings, dataset_toml: Path, logging_dir: Path
) -> TrainingArguments:
    """Map a TrainingConfig (already filled with the family's defaults) to sd-scripts' args."""
    config = inputs.config
    family = inputs.family
    unet_lr = _required(config.unet_lr, "unet_lr")
    text_encoder_lr = _required(config.text_encoder_lr, "text_encoder_lr")
    mixed_precision = training_precision(inputs)
    unet_only = text_encoder_lr == 0
    sdxl = family == "sdxl"
    flux = family == "flux"
    t5 = family in T5_FAMILIES
    resolution = _required(config.resolution, "resolution")
    plan = memory_plan(inputs)
    components = component_paths(inputs)
    return TrainingArguments(
        pretrained_model_name_or_path=str(inputs.model_path),
        clip_l=components.get("clip_l"),
        clip_g=components.get("clip_g"),
        t5xxl=components.get("t5xxl"),
        ae=components.get("ae"),
        v2=family == "sd2",
        # The checkpoint says whether it predicts v (SD 2.x 768-v), not the training resolution.
        v_parameterization=family == "sd2" and inputs.v_parameterization,
        tokenizer_cache_dir=str(settings.runner_tokenizer_cache_dir),
        dataset_config=str(dataset_toml),
        output_dir=str(inputs.output_dir),
        output_name=config.output_name,
        save_precision="float" if mixed_precision == "no" else "fp16",
        # sd-scripts lets max_train_epochs override max_train_steps, so pass exactly one.
        max_train_epochs=None if config.max_train_steps else config.epochs,
        max_train_steps=config.max_train_steps,
        network_module=NETWORK_MODULES[family],
        network_dim=_required(config.network_dim, "network_dim"),
        network_alpha=float(_required(config.network_alpha, "network_alpha")),
        network_train_unet_only=unet_only,
        learning_rate=unet_lr,
        unet_lr=unet_lr,
        text_encoder_lr=None if unet_only else text_encoder_lr,
        optimizer_type=config.optimizer,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        seed=config.seed,
        mixed_precision=mixed_precision,
        # SDXL's VAE overflows in fp16.
        no_half_vae=sdxl and mixed_precision == "fp16",
        # SDXL: allowed only without text encoder training. Flux.1 and SD 3.5 cache what the
        # trained encoders do not need (T5-XXL alone is ~10 GB): sd-scripts' is_partial caching.
        # (train_network.py, for SD 1.x/2.x, has no such option.)
        cache_text_encoder_outputs=True if t5 or (sdxl and unet_only) else None,
        cache_text_encoder_outputs_to_disk=True if t5 else None,
        cache_latents_to_disk=True if t5 else None,
        gradient_checkpointing=config.gradient_checkpointing is not False,
        fp8_base=True if plan.fp8_base else None,
        blocks_to_swap=plan.blocks_to_swap or None,
        timestep_sampling=config.timestep_sampling if flux else None,
        discrete_flow_shift=config.discrete_flow_shift if flux else None,
        # docs/flux_train_network.md: "raw" is the recommended one (sd-scripts' default is not).
        model_prediction_type="raw" if flux else None,
        guidance_scale=config.guidance_scale if flux else None,
        weighting_scheme=config.weighting_scheme if family == "sd3" else None,
        logging_dir=str(logging_dir),
        resolution=f"{resolution},{resolution}",
        save_state=True if inputs.on_epoch is not None else None,
    )


# The guidance a sample is rendered with when the request leaves it out, by family (Flux.1's is
# its distilled guidance, --g; the others' classifier-free guidance, --l).
SAMPLE_GUIDANCE: dict[BaseModelFamily, float] = {"flux": 3.5, "sd3": 5.0}
DEFAULT_SAMPLE_GUIDANCE = 7.0


def sample_prompt_lines(inputs: TrainingInputs, captions: list[str]) -> list[str]:
    """sd-scripts' prompt file: one line per sample, its options after ` --`."""
    settings = inputs.samples
    size = _required(inputs.config.resolution, "resolution")
    guidance = settings.guidance
    if guidance is None:
        guidance = SAMPLE_GUIDANCE.get(inputs.family, DEFAULT_SAMPLE_GUIDANCE)
    lines = []
    for index, prompt in enumerate(sample_prompts(settings, captions)):
        options = [
            f"--w {settings.width or size}",
            f"--h {settings.height or size}",
            f"--d {settings.seed + index}",
            f"--s {settings.steps}",
            f"--g {guidance}" if inputs.family == "flux" else f"--l {guidance}",
        ]
        if settings.negative_prompt:
            options.append(f"--n {settings.negative_prompt}")
        # A line break or " --" inside the prompt would start another line or option.
        text = " ".join(prompt.split()).replace(" --", " -")
        lines.append(f"{text} {' '.join(options)}")
    return lines


def dataset_captions(folders: list[tuple[Path, int]]) -> list[str]:
    """Each image's caption (first line of its .txt), in the dataset's order."""
    captions = []
    for folder, _ in folders:
        for image in sorted(folder.iterdir()):
            caption = image.with_suffix(".txt")
            if image.suffix.lower() in IMAGE_EXTENSIONS and caption.is_file():
                lines = caption.read_text(encoding="utf-8").strip().splitlines()
                if lines:
                    captions.append(lines[0].strip())
    return captions


def component_paths(inputs: TrainingInputs) -> dict[str, str]:
    """The files flags for the family's components: Flux.1 needs all three (its transformer
    file never holds them); SD 3.5 takes those given, the rest come from its checkpoint."""
    needed = FAMILY_COMPONENTS.get(inputs.family, ())
    missing = [role for role in needed if role not in inputs.components]
    if inputs.family == "flux" and missing:
        raise TrainerError(
            "model_components_missing",
            f"Flux.1 training needs {', '.join(needed)} beside the transformer; the job names "
            f"no {', '.join(missing)} file (model.components)",
            stage="files",
        )
    return {role: str(inputs.components[role]) for role in needed if role in inputs.components}


def training_precision(inputs: TrainingInputs) -> MixedPrecision:
    """The requested mixed precision on a GPU; "no" (fp32) without one, because fp16/bf16 on
    the CPU fails in sd-scripts ("expected m1 and m2 to have the same dtype")."""
    if not inputs.cuda:
        return "no"
    return _required(inputs.config.mixed_precision, "mixed_precision")


# --------------------------------------------------------------------------------------------
# GPU memory and disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """fp8 base weights and transformer blocks swapped to the CPU, and the least VRAM (GB, as
    the GPU offer search counts it: 1 GB = 1000 MB) a run with them needs at batch size 1."""

    fp8_base: bool
    blocks_to_swap: int
    vram_gb: int
    eight_bit_optimizer: bool = False  # the figure assumes AdamW8bit (or a leaner optimizer)


# Most memory first; a GPU takes the first plan that fits it. Sources:
# - Flux.1 (12B transformer, 23.8 GB in bf16): docs/flux_train_network.md 6.1, a table whose
#   rows all have --fp8_base: "24GB: basic settings", "16GB: batch size 1 and --blocks_to_swap"
#   (no count given: 8 is ours), "12GB: --blocks_to_swap 16 and 8bit AdamW"; its 10 and 8 GB
#   rows need an fp8 T5-XXL file, which the job does not choose, so they are not used. Without
#   fp8: 40 GB is our figure (the bf16 weights alone fill a 24 GB card).
# - SD 3.5: the docs give no figures (their example swaps 32 blocks); ours scale Flux.1's by
#   the weights (large 8.1B / 38 blocks, medium 2.5B / 24 blocks). An unknown variant counts
#   as large.
# - SD 1.x / 2.x / SDXL: no fp8 or block swap unless asked; the figures are the ones the GPU
#   search used before (SDXL trains its text encoders in 16 GB).
_FLUX_PLANS = (
    MemoryPlan(fp8_base=False, blocks_to_swap=0, vram_gb=40),
    MemoryPlan(fp8_base=True, blocks_to_swap=0, vram_gb=24),
    MemoryPlan(fp8_base=True, blocks_to_swap=8, vram_gb=16),
    MemoryPlan(fp8_base=True, blocks_to_swap=16, vram_gb=12, eight_bit_optimizer=True),
)
_SD3_PLANS: dict[str, tuple[MemoryPlan, ...]] = {
    "large": (
        MemoryPlan(fp8_base=False, blocks_to_swap=0, vram_gb=32),
        MemoryPlan(fp8_base=True, blocks_to_swap=0, vram_gb=24),
        MemoryPlan(fp8_base=True, blocks_to_swap=16, vram_gb=16),
        MemoryPlan(fp8_base=True, blocks_to_swap=32, vram_gb=12, eight_bit_optimizer=True),
    ),
    "medium": (
        MemoryPlan(fp8_base=False, blocks_to_swap=0, vram_gb=16),
        MemoryPlan(fp8_base=True, blocks_to_swap=0, vram_gb=12),
        MemoryPlan(fp8_base=True, blocks_to_swap=16, vram_gb=10, eight_bit_optimizer=True),
    ),
}
_UNET_VRAM_GB = {"sd15": 8, "sd2": 10, "sdxl": 12}
_TEXT_ENCODER_VRAM_GB = {"sdxl": 4, "sd3": 2}  # more when the text encoders train too
# The most blocks each model can swap (flux_models.py / sd3_models.py enable_block_swap).
MAX_BLOCKS_TO_SWAP = {"flux": 35, "large": 36, "medium": 22}
_EIGHT_BIT_OPTIMIZERS = frozenset({"AdamW8bit", "Lion8bit", "Adafactor"})


def _plans(
    family: BaseModelFamily, variant: str | None, config: TrainingConfig
) -> list[MemoryPlan]:
    """The family's plans that these settings allow (fp8 and block swap as set, or any)."""
    if family == "flux":
        plans: tuple[MemoryPlan, ...] = _FLUX_PLANS
    elif family == "sd3":
        plans = _SD3_PLANS.get((variant or "").lower(), _SD3_PLANS["large"])
    else:
        fp8 = bool(config.fp8_base)
        plans = (MemoryPlan(fp8_base=fp8, blocks_to_swap=0, vram_gb=_UNET_VRAM_GB.get(family, 8)),)
    allowed = [
        plan
        for plan in plans
        if (config.fp8_base is None or plan.fp8_base == config.fp8_base)
        and (config.blocks_to_swap is None or plan.blocks_to_swap <= config.blocks_to_swap)
        and (not plan.eight_bit_optimizer or config.optimizer in _EIGHT_BIT_OPTIMIZERS)
    ]
    if not allowed:  # e.g. fp8 forced on for a family whose table has no fp8 row: the first
        allowed = [replace(plans[0], fp8_base=bool(config.fp8_base))]
    extra = _TEXT_ENCODER_VRAM_GB.get(family, 0) if (config.text_encoder_lr or 0) > 0 else 0
    return [replace(plan, vram_gb=plan.vram_gb + extra) for plan in allowed]


def vram_needed_gb(family: BaseModelFamily, variant: str | None, config: TrainingConfig) -> int:
    """The least GPU memory (GB of 1000 MB, as Vast counts) that trains this family with these
    settings, fp8 and block swap allowed where the config leaves them to the GPU. Pure."""
    return min(plan.vram_gb for plan in _plans(family, variant, config))


def memory_plan(inputs: TrainingInputs) -> MemoryPlan:
    """fp8 and block swap for this GPU: the config's where set, else the plan with the fewest
    savings that fits the GPU's memory (the leanest one when none fits). Without a GPU: none
    (fp8 needs mixed precision, which the CPU does not get)."""
    config = inputs.config
    plans = _plans(inputs.family, inputs.variant, config)
    if not inputs.cuda:
        return MemoryPlan(fp8_base=False, blocks_to_swap=0, vram_gb=0)
    if inputs.vram_mb is None:
        chosen = plans[-1]
    else:
        fitting = [plan for plan in plans if plan.vram_gb * 1000 <= inputs.vram_mb]
        chosen = fitting[0] if fitting else plans[-1]
    fp8 = chosen.fp8_base if config.fp8_base is None else config.fp8_base
    swap = chosen.blocks_to_swap if config.blocks_to_swap is None else config.blocks_to_swap
    if inputs.family in ("flux", "sd3"):
        if problem := blocks_to_swap_problem(inputs.family, inputs.variant, swap):
            raise TrainerError("invalid_config", problem, stage="files")
    else:
        swap = 0
    return MemoryPlan(fp8_base=fp8, blocks_to_swap=swap, vram_gb=chosen.vram_gb)


def blocks_to_swap_problem(
    family: BaseModelFamily, variant: str | None, blocks_to_swap: int | None
) -> str | None:
    """Why a block swap count does not fit the model (None when it does); the run's intake
    asks too, so a count the model cannot take is refused before any GPU is rented."""
    if blocks_to_swap is None or family not in ("flux", "sd3"):
        return None
    # An SD 3 file of unknown depth is planned as large (_plans): its bound is large's.
    model = "flux" if family == "flux" else (variant or "large").lower()
    most = MAX_BLOCKS_TO_SWAP.get(model, MAX_BLOCKS_TO_SWAP["medium"])
    if blocks_to_swap <= most:
        return None
    return (
        f"training.blocks_to_swap is {blocks_to_swap}, but this model has blocks for at most {most}"
    )


# Published file sizes (GB) of the components a family loads beside its checkpoint, from the
# files people use (comfyanonymous/flux_text_encoders, stabilityai/stable-diffusion-3.5-large
# text_encoders/, black-forest-labs ae): t5xxl_fp16 9.79, clip_l 0.25, clip_g 1.39, ae 0.34.
_COMPONENT_GB = {"clip_l": 0.25, "clip_g": 1.39, "t5xxl": 9.79, "ae": 0.34}
# Cached latents and text encoder outputs, on disk for Flux.1 and SD 3.5: at most 1,000 images
# (the dataset limit) x T5-XXL's 512 x 4096 bf16 outputs (4.2 MB) + a 1024 px latent.
_CACHE_GB = {"flux": 5.0, "sd3": 5.0}
# One saved LoRA per epoch: MB per rank (fp16), from LoRAs of each family.
_LORA_MB_PER_RANK = {"sd15": 1.2, "sd2": 1.3, "sdxl": 7.0, "flux": 10.0, "sd3": 8.0}
_WORKING_DISK_GB = 10.0  # logs, TensorBoard, the images and their unzipped copy's slack


def disk_needed_gb(family: BaseModelFamily, config: TrainingConfig, model_bytes: int) -> int:
    """Disk (GB) a run needs: the checkpoint, the family's component files (all of them: a
    checkpoint that holds some only saves their download), caches, every epoch's LoRA. Pure."""
    components = sum(_COMPONENT_GB[role] for role in FAMILY_COMPONENTS.get(family, ()))
    epochs = config.epochs if config.max_train_steps is None else max(config.epochs, 1)
    rank = config.network_dim or 32
    loras = epochs * rank * _LORA_MB_PER_RANK.get(family, 8.0) / 1000
    needed = model_bytes / 1e9 + components + _CACHE_GB.get(family, 0.0) + loras
    return math.ceil(needed + _WORKING_DISK_GB)


def planned_total_steps(inputs: TrainingInputs, image_count: int) -> int:
    """Optimizer steps sd-scripts will run: images x repeats / batch size per epoch, x epochs.

    With buckets of different aspect ratios sd-scripts can need a few more batches per epoch.
    """
    config = inputs.config
    if config.max_train_steps:
        return config.max_train_steps
    per_epoch = math.ceil(image_count * config.repeats / _required(config.batch_size, "batch_size"))
    return per_epoch * config.epochs


def checkpoint_name(output_name: str, epoch: int, last_epoch: int) -> str:
    """sd-scripts' file for an epoch with save_every_n_epochs=1: the last has no epoch number."""
    if epoch == last_epoch:
        return f"{output_name}.safetensors"
    return f"{output_name}-{epoch:06d}.safetensors"


def _required(value: _T | None, name: str) -> _T:
    if value is None:
        raise TrainerError(
            "invalid_config", f"training.{name} is not set (fill the config with for_family)"
        )
    return value


# --------------------------------------------------------------------------------------------
# Output parsing
# --------------------------------------------------------------------------------------------

# tqdm's bar as sd-scripts draws it: desc "steps", 3 significant digits for avr_loss, e.g.
# `steps:  25%|██▌       | 3/12 [00:04<00:14,  1.60s/it, avr_loss=1.21]`. The validation bars
# ("validation steps", "epoch validation steps") are not training progress.
_BAR = re.compile(
    r"(?<!validation )steps:\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[^<\]]*)<(?P<remaining>[^,\]]*),\s*(?P<rate>[^,\]]*)(?P<postfix>[^\]]*)\]"
)
_RATE = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>it/s|s/it)")
_INTERVAL = re.compile(r"(?:(?P<d>\d+)d,\s*)?(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+)")
_AVR_LOSS = re.compile(r"avr_loss=(?P<loss>[^,\]\s]+)")
# train_network.py: accelerator.print(f"\nepoch {epoch+1}/{num_train_epochs}\n")
_EPOCH = re.compile(r"^epoch (?P<epoch>\d+)/(?P<total>\d+)\s*$")
_NO_DATA = "No data found"
_EXCEPTION = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")
# The launchers' own errors after the trainer died (accelerate's simple_launcher, torchrun's
# elastic agent): they say only that the child failed, never why.
_LAUNCHER_ERROR = re.compile(r"^\s*(?:subprocess\.CalledProcessError|[\w.]*ChildFailedError)\b")
# Every line the trainer prints also goes to the runner's log (and the log uploaded with the run).
_trainer_log = logging.getLogger("gpu_runner.trainer")


@dataclass(frozen=True)
class BarState:
    step: int
    total: int
    it_per_s: float | None
    eta_s: float | None
    avr_loss: float | None


def parse_bar(text: str) -> BarState | None:
    """The last training progress bar drawn in `text`, or None."""
    matches = list(_BAR.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    rate = _RATE.search(m["rate"])
    it_per_s: float | None = None
    if rate:
        value = float(rate["value"])
        it_per_s = value if rate["unit"] == "it/s" else (1.0 / value if value else None)
    loss = _AVR_LOSS.search(m["postfix"])
    return BarState(
        step=int(m["n"]),
        total=int(m["total"]),
        it_per_s=it_per_s,
        eta_s=parse_interval(m["remaining"]),
        avr_loss=_float(loss["loss"]) if loss else None,
    )


def parse_interval(text: str) -> float | None:
    """tqdm's [D d, ][H:]MM:SS, or None for '?'."""
    m = _INTERVAL.fullmatch(text.strip())
    if not m:
        return None
    days, hours = int(m["d"] or 0), int(m["h"] or 0)
    return float(((days * 24 + hours) * 60 + int(m["m"])) * 60 + int(m["s"]))


def parse_epoch(text: str) -> tuple[int, int] | None:
    m = _EPOCH.match(text.strip())
    return (int(m["epoch"]), int(m["total"])) if m else None


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class OutputTracker:
    """Follows sd-scripts' merged stdout/stderr: progress, epoch losses, failures, a log tail.

    Epoch losses: the launcher's `loss/epoch_average` (sd-scripts' own number, full precision)
    when it reports; otherwise the bar's last `avr_loss` of each epoch. sd-scripts' LossRecorder
    keeps one value per batch index of the epoch and overwrites them in the next epoch, so the
    bar's `avr_loss` is a moving average over the last epoch's worth of batches, and at the end
    of an epoch it equals that epoch's average exactly (to the bar's 3 significant digits).
    """

    def __init__(self, secrets: list[str] | None = None, tail_lines: int = LOG_TAIL_LINES) -> None:
        self._secrets = [s for s in (secrets or []) if s]
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._pending = ""
        self._line_shown = ""  # what a terminal would show of the current line
        self.epoch: int | None = None
        self.total_epochs: int | None = None
        self.bar: BarState | None = None
        self.no_data = False
        self.diverged: str | None = None
        self.launcher_epoch_losses: dict[int, float] = {}
        self.bar_epoch_losses: dict[int, float] = {}
        self.step_losses: list[float] = []  # from the launcher: sd-scripts' loss/current
        self.last_error: str | None = None  # the trainer's last exception line: the cause
        self._last_reported: tuple[int, float | None] | None = None

    def feed(self, text: str) -> list[TrainingProgressData]:
        """Take more output; return the progress updates it holds (one per changed bar)."""
        updates: list[TrainingProgressData] = []
        self._pending += text
        while True:
            cut = min(
                (i for i in (self._pending.find("\r"), self._pending.find("\n")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                break
            segment, separator = self._pending[:cut], self._pending[cut]
            self._pending = self._pending[cut + 1 :]
            self._segment(segment, updates)
            if separator == "\n":
                self._end_line()
        return updates

    def close(self) -> list[TrainingProgressData]:
        """The output ended: take what is left of the last line."""
        updates: list[TrainingProgressData] = []
        if self._pending:
            self._segment(self._pending, updates)
            self._pending = ""
        self._end_line()
        return updates

    def log_tail(self) -> list[str]:
        return list(self._tail)

    def epoch_losses(self) -> dict[int, float]:
        """Average loss per epoch (1-based), from the best source that reported."""
        return dict(self.launcher_epoch_losses or self.bar_epoch_losses)

    def _segment(self, segment: str, updates: list[TrainingProgressData]) -> None:
        if not segment:
            return
        marker = segment.find(EVENT_PREFIX)
        if marker >= 0:
            self._launcher_event(segment[marker + len(EVENT_PREFIX) :])
            segment = segment[:marker]  # a bar drawn without a newline may precede it
            if not segment.strip():
                return
        self._line_shown = segment
        if _NO_DATA in segment:
            self.no_data = True
        epoch = parse_epoch(segment)
        if epoch:
            self.epoch, self.total_epochs = epoch
            return
        bar = parse_bar(segment)
        if bar:
            self._bar(bar, updates)

    def _bar(self, bar: BarState, updates: list[TrainingProgressData]) -> None:
        self.bar = bar
        if bar.avr_loss is not None:
            if not math.isfinite(bar.avr_loss) and not self.diverged:
                self.diverged = f"the average loss became {bar.avr_loss} at step {bar.step}"
            if self.epoch is not None and bar.step > 0:
                self.bar_epoch_losses[self.epoch] = bar.avr_loss
        key = (bar.step, bar.avr_loss)
        if key == self._last_reported:
            return
        self._last_reported = key
        loss = bar.avr_loss if bar.avr_loss is not None and math.isfinite(bar.avr_loss) else None
        updates.append(
            TrainingProgressData(
                step=bar.step,
                total=bar.total,
                epoch=self.epoch,
                total_epochs=self.total_epochs,
                loss=loss,
                it_per_s=bar.it_per_s,
                eta_s=bar.eta_s,
            )
        )

    def _launcher_event(self, payload: str) -> None:
        try:
            event = json.loads(payload)
            kind, epoch, loss = event["event"], int(event["epoch"]), float(event["loss"])
        except (ValueError, KeyError, TypeError):
            return
        if not math.isfinite(loss) and not self.diverged:
            where = f"step {event.get('step')}" if kind == "step" else f"epoch {epoch}"
            self.diverged = f"the loss became {loss} at {where}"
        if kind == "step":
            self.step_losses.append(loss)
        elif kind == "epoch":
            self.launcher_epoch_losses[epoch] = loss

    def _end_line(self) -> None:
        line = self._line_shown.rstrip()
        self._line_shown = ""
        if line.strip():
            line = redact(line, self._secrets)
            self._tail.append(line)
            _trainer_log.info("%s", line)
            if _EXCEPTION.match(line) and not _LAUNCHER_ERROR.match(line):
                self.last_error = line.strip()


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class SdScriptsTrainer:
    """The Trainer that runs kohya-ss sd-scripts (see the module docstring)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._group_lock = asyncio.Lock()

    def prepare(self, inputs: TrainingInputs) -> PreparedTraining:
        """Write the dataset and training TOML files; raise TrainerError for unsupported input."""
        script = script_for(inputs.family)
        folders = image_dirs(inputs.dataset_dir)
        if not folders:
            raise TrainerError(
                "no_training_data",
                f"no images in the dataset ({', '.join(sorted(IMAGE_EXTENSIONS))} expected)",
                stage="files",
            )
        config = inputs.config
        if config.trigger_word or config.class_word:
            write_captions(folders, config.trigger_word, config.class_word)
        device = "cuda" if inputs.cuda else "cpu"
        config_dir = inputs.run_dir / "sd-scripts"
        config_dir.mkdir(parents=True, exist_ok=True)
        inputs.output_dir.mkdir(parents=True, exist_ok=True)
        dataset_toml = config_dir / "dataset.toml"
        training_toml = config_dir / "training.toml"
        accelerate_json = config_dir / "accelerate.json"
        logging_dir = config_dir / "logs"
        dataset_toml.write_text(
            dumps_toml(dataset_config(inputs, folders).model_dump(exclude_none=True)),
            encoding="utf-8",
        )
        arguments = training_arguments(inputs, self.settings, dataset_toml, logging_dir)
        prompts = sample_prompt_lines(inputs, dataset_captions(folders))
        if inputs.samples.enabled and prompts:
            prompts_file = config_dir / "sample_prompts.txt"
            prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            arguments = arguments.model_copy(
                update={
                    "sample_prompts": str(prompts_file),
                    "sample_every_n_epochs": inputs.samples.every_n_epochs,
                    "sample_sampler": inputs.samples.sampler,
                }
            )
        if inputs.family in T5_FAMILIES or arguments.fp8_base:
            _trainer_log.info(
                "GPU memory %s MB: fp8_base %s, blocks_to_swap %s",
                inputs.vram_mb,
                bool(arguments.fp8_base),
                arguments.blocks_to_swap or 0,
            )
        if arguments.mixed_precision != inputs.config.mixed_precision:
            _trainer_log.info(
                "no GPU on this machine: sd-scripts trains in fp32 (mixed_precision %s needs one)",
                inputs.config.mixed_precision,
            )
        training_toml.write_text(
            dumps_toml(arguments.model_dump(exclude_none=True)), encoding="utf-8"
        )
        accelerate_json.write_text(
            accelerate_config(device, arguments.mixed_precision).model_dump_json(indent=2) + "\n",
            encoding="utf-8",
        )
        return PreparedTraining(
            inputs=inputs,
            total_steps=planned_total_steps(inputs, sum(count for _, count in folders)),
            paths={
                "script": script,
                "dataset_config": str(dataset_toml),
                "training_config": str(training_toml),
                "accelerate_config": str(accelerate_json),
                "output_dir": str(inputs.output_dir),
            },
            device=device,
            mixed_precision=arguments.mixed_precision,
            tensorboard_dir=logging_dir,
        )

    def command(self, prepared: PreparedTraining) -> list[str]:
        """`accelerate launch` of our launcher, which runs the sd-scripts script.

        Every machine-specific choice is a flag, from what the runner found on this machine.
        """
        script = self.settings.runner_sd_scripts_dir / prepared.paths["script"]
        machine = accelerate_config(prepared.device, prepared.mixed_precision)
        return [
            *self.settings.runner_accelerate_command,
            "launch",
            # This run's file replaces the machine's default one ($HF_HOME/accelerate/
            # default_config.yaml), whose use_cpu would win: --cpu can turn the CPU on, not off.
            "--config_file",
            prepared.paths["accelerate_config"],
            *(["--cpu"] if machine.use_cpu else []),
            "--num_processes",
            str(machine.num_processes),
            "--num_machines",
            str(machine.num_machines),
            "--mixed_precision",
            machine.mixed_precision,
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            "1",
            str(LAUNCHER_PATH),
            "--sd-scripts-commit",
            SD_SCRIPTS_COMMIT,
            str(script),
            "--config_file",
            prepared.paths["training_config"],
            # An earlier host's last complete epoch: sd-scripts loads it and, from its
            # train_state.json, starts at the next epoch.
            *(["--resume", str(resume.state_dir)] if (resume := prepared.inputs.resume) else []),
        ]

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        """Run sd-scripts to the end and return the best epoch's checkpoint."""
        inputs = prepared.inputs
        tracker = OutputTracker(inputs.secrets)
        # The child needs none of the runner's own settings (the job URL among them), nor
        # accelerate's from the machine's environment: the command line holds those.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_", "ACCELERATE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if self._stopping:
            raise TrainerError("trainer_stopped", "training was stopped before it started")
        command = self.command(prepared)
        _trainer_log.info("running %s", redact(shlex.join(command), inputs.secrets))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.settings.runner_sd_scripts_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches every child
            )
        except OSError as e:
            raise TrainerError("trainer_crashed", f"could not start sd-scripts: {e}") from e
        epochs = _EpochReporter(inputs)
        try:
            await self._follow(self._process, tracker, on_progress, epochs)
            returncode = await self._process.wait()
        finally:
            await self._terminate_group()
        result = self._result(prepared, tracker, returncode)
        epochs.report_up_to(len(result.epoch_losses), tracker, final=True)
        return result

    async def stop(self) -> None:
        """Stop training now: SIGTERM to the whole process group, SIGKILL after a grace period."""
        self._stopping = True
        await self._terminate_group()

    async def _follow(
        self,
        process: asyncio.subprocess.Process,
        tracker: OutputTracker,
        on_progress: ProgressCallback,
        epochs: _EpochReporter,
    ) -> None:
        assert process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = await process.stdout.read(64 * 1024)
            text = decoder.decode(chunk, final=not chunk)
            updates = tracker.feed(text) if chunk else [*tracker.feed(text), *tracker.close()]
            for update in updates:
                result = on_progress(update)
                if inspect.isawaitable(result):
                    await result
            if tracker.epoch is not None:
                # sd-scripts saved (and sampled) an epoch before it starts the next one.
                epochs.report_up_to(tracker.epoch - 1, tracker)
            if tracker.diverged:
                await self._terminate_group()
                raise TrainerError(
                    "loss_diverged",
                    f"training stopped: {tracker.diverged}. Try a lower learning rate, "
                    "another optimizer, or mixed_precision bf16.",
                    log_tail=tracker.log_tail(),
                )
            if not chunk:
                return

    def _result(
        self, prepared: PreparedTraining, tracker: OutputTracker, returncode: int
    ) -> TrainingResult:
        inputs = prepared.inputs
        tail = tracker.log_tail()
        if self._stopping:
            raise TrainerError(
                "trainer_stopped", "training was stopped before it finished", log_tail=tail
            )
        if returncode != 0:
            last_error = tracker.last_error
            detail = f": {last_error}" if last_error else " (see the log tail)"
            raise TrainerError(
                "trainer_crashed",
                f"sd-scripts exited with code {returncode}{detail}",
                log_tail=tail,
            )
        name = inputs.config.output_name
        checkpoints = sorted(inputs.output_dir.glob(f"{name}*.safetensors"))
        if tracker.no_data or not checkpoints:
            raise TrainerError(
                "no_training_data",
                "sd-scripts found no training data and trained nothing"
                + (" ('No data found')" if tracker.no_data else " (it wrote no checkpoint)")
                + ": check that the images zip holds .png/.jpg/.webp images",
                log_tail=tail,
            )
        resumed = inputs.resume
        earlier = dict(enumerate(resumed.epoch_losses, start=1)) if resumed else {}
        losses = {**earlier, **tracker.epoch_losses()}
        last_epoch = tracker.total_epochs or max(losses, default=0)
        if not losses or sorted(losses) != list(range(1, last_epoch + 1)):
            raise TrainerError(
                "trainer_output_unrecognised",
                f"could not read the loss of every epoch from sd-scripts' output (read epochs "
                f"{sorted(losses)} of {last_epoch}); is sd-scripts at commit {SD_SCRIPTS_COMMIT}?",
                log_tail=tail,
            )
        epoch_losses = [losses[e] for e in range(1, last_epoch + 1)]
        best = kept_epoch(epoch_losses, inputs.keep)
        checkpoint = inputs.output_dir / checkpoint_name(name, best, last_epoch)
        if not checkpoint.is_file() and resumed is not None and best in resumed.loras:
            checkpoint = resumed.loras[best]  # trained by an earlier host
        if not checkpoint.is_file():
            raise TrainerError(
                "checkpoint_missing",
                f"epoch {best} had the lowest loss but its checkpoint {checkpoint.name} is missing "
                f"(found: {', '.join(p.name for p in checkpoints)})",
                log_tail=tail,
            )
        return TrainingResult(
            epoch_losses=epoch_losses, best_epoch=best, checkpoint=checkpoint, loss=losses[best]
        )

    async def _terminate_group(self) -> None:
        """SIGTERM the process group, wait for it to go, then SIGKILL whatever is left."""
        process = self._process
        if process is None:
            return
        async with self._group_lock:
            group = process.pid  # start_new_session: the child leads its own group
            if not group_alive(group):
                return
            signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + self.settings.runner_trainer_stop_grace_s
            # Polling: an emptying process group sends no event to wait for.
            while group_alive(group) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if group_alive(group):
                signal_group(group, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while group_alive(group) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=5)


class _EpochReporter:
    """Tells the runner of each epoch sd-scripts has finished writing: its LoRA, its state
    folder (save_state) and its samples, all complete once the next epoch starts (or training
    ended)."""

    def __init__(self, inputs: TrainingInputs) -> None:
        self._inputs = inputs
        self._reported = inputs.resume.epoch if inputs.resume else 0

    def report_up_to(self, epoch: int, tracker: OutputTracker, *, final: bool = False) -> None:
        on_epoch = self._inputs.on_epoch
        if on_epoch is None:
            return
        total = tracker.total_epochs or epoch
        losses = tracker.epoch_losses()
        output, name = self._inputs.output_dir, self._inputs.config.output_name
        while self._reported < epoch:
            number = self._reported + 1
            lora = output / checkpoint_name(name, number, total)
            if number not in losses or not lora.is_file():
                if not final:
                    return  # its loss or file is not there yet: at the next look
                self._reported = number
                continue
            state = output / f"{name}-{number:06d}-state"
            on_epoch(
                SavedEpoch(
                    epoch=number,
                    total_epochs=total,
                    step=_state_step(state) or (tracker.bar.step if tracker.bar else 0),
                    loss=losses[number],
                    lora=lora,
                    state_dir=state if state.is_dir() and number < total else None,
                    samples=sorted((output / "sample").glob(f"{name}_e{number:06d}_*.png")),
                )
            )
            self._reported = number


def _state_step(state: Path) -> int | None:
    """The step an epoch's state was saved at (sd-scripts' train_state.json current_step)."""
    try:
        return int(json.loads((state / "train_state.json").read_text())["current_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def group_alive(group: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not sys.platform.startswith("linux") or not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == group and fields[0] not in ("Z", "X"):
            return True
    return False
