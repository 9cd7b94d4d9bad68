"""What a run would cost before it starts: the GPUs that qualify, the offers ranked by expected
cost, and the expected time and dollars, with every assumption named.

    steps          = max_train_steps, or ceil(images x repeats / batch_size) x epochs
    s/step         = SECONDS_PER_STEP[family] x GPU class factor x (resolution / family's)^2
                     x batch_size          (batching gains ignored: an upper estimate)
    upload         = epochs x LoRA + (epochs - 1) x training state + samples + the kept LoRA
                     (`upload_bytes`: each saved epoch goes up as it ends, see gpu_runner/epochs)
    cost           = run_cost(GPU image, boot, model + its components + images,
                              work = model load + caching latents + steps x s/step, upload)
    hours          = (image pull + boot + download + work) / 3600     (wall time)

`run_cost` (activities/providers/vast_cost.py) is the formula the Vast provider ranks offers by:
the image pull and container boot bill only the disk, the GPU's $/h counts from `running`, and
bandwidth is billed both ways at the offer's $/GiB.

Offers come from the configured provider, through the same code that rents: Vast's offer search
(`VastProvider.ranked_offers`, filters and re-checks included); the local provider's only offer
is this machine at $0. Nothing is uploaded and nothing is rented.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from gpu_runner.protocol import BaseModelFamily, ComponentRole, SampleSettings, TrainingConfig
from workflows.models import GpuRequirements

from .gpu_requirements import effective_requirements, family_minimums, filled_config
from .providers.vast_cost import OfferPrices, run_cost, transfer_s

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from common.settings import Settings

# Seconds per optimizer step at batch size 1 and the family's default resolution, on the
# reference class (RTX 3090 / A6000, GA102), sd-scripts with cached latents and bf16/fp16.
SECONDS_PER_STEP: dict[str, float] = {
    # SD 1.5 at 512 px: estimate. The diffusers LoRA example (no latent caching) runs 15k steps
    # in ~5 h on a 2080 Ti (1.2 s/step; huggingface.co/docs/diffusers/training/lora); a 3090 is
    # about twice a 2080 Ti, and sd-scripts caches latents.
    "sd15": 0.4,
    # SD 2.x at 768 px: estimate, SD 1.5's figure x (768/512)^2 (same-size UNet).
    "sd2": 0.9,
    # SDXL at 1024 px, UNet only: 1.12-1.23 s/it on an RTX 3090 (Ti), batch 1
    # (kohya-ss/sd-scripts#827, bmaltais/kohya_ss#1288).
    "sdxl": 1.2,
    # Flux.1 at 1024 px: 7.8-8.25 s/it on an A6000, rank 128, bf16 or fp8 base
    # (bmaltais/kohya_ss#2701).
    "flux": 8.0,
    # SD 3.5 medium (2.5B): estimate, about SDXL's (2.6B UNet); SimpleTuner's maintainer expects
    # 3-5 s per step at batch 10 for a 2B LoRA on an A6000 (bghira/SimpleTuner#613).
    "sd3": 1.5,
}
# SD 3.5 large (8B): estimate, Flux's figure x 8/12 (parameters).
SD3_LARGE_SECONDS_PER_STEP = 5.5
DEFAULT_RESOLUTION: dict[str, int] = {"sd15": 512, "sd2": 768}
_OTHER_RESOLUTION = 1024

# Time per step relative to the reference class, matched on the GPU's name (first match wins).
# RTX 3060: 2.4 s/it against the 3090 (Ti)'s 1.23 s/it for SDXL (bmaltais/kohya_ss#1288). The
# others are estimates from dense bf16 tensor throughput relative to the RTX 3090.
GPU_CLASSES: list[tuple[str, str, float]] = [
    (r"H100|H200|GH200", "Hopper", 0.35),
    (r"B200|B100", "Blackwell DC", 0.25),
    (r"5090", "RTX 5090", 0.45),
    (r"A100", "A100", 0.55),
    (r"4090|L40|6000 ?Ada|5080", "Ada 24-48 GB", 0.6),
    (r"4080|4070 Ti|5070", "Ada 16 GB", 0.8),
    (r"3090|A6000|A40|A5000|3080", "Ampere GA102 (reference)", 1.0),
    (r"4070|4060|A4500|A4000|L4\b|5060", "mid-range", 1.5),
    (r"3060|3070|2080|T4|V100|A10\b", "entry", 2.0),
]
UNKNOWN_CLASS = ("unknown (taken as the reference)", 1.0)

# Bytes of a saved LoRA (kohya format, fp16/bf16 weights) per unit of network_dim, for the
# modules each family trains by default (SDXL, Flux and SD 3: UNet / transformer only).
# Estimates from the sizes of common files: SD 1.5 about 144 MB at rank 128, SDXL about 190 MB
# at rank 32, Flux.1 about 160 MB at rank 16; SD 3 is taken as 3.5 large (2/3 of Flux.1's
# parameters; medium is about a third of that).
LORA_BYTES_PER_RANK: dict[str, float] = {
    "sd15": 1.15e6,
    "sd2": 1.3e6,
    "sdxl": 6.0e6,
    "flux": 10.0e6,
    "sd3": 6.7e6,
}
# A training state (sd-scripts' save_state) holds the network in fp32 (twice the LoRA file) and
# Adam's two moments: one byte each for an 8-bit optimizer, four for the others (an upper
# estimate for those that keep one or a factored moment: Lion, Adafactor, SGD).
STATE_LORAS_8BIT = 3.0
STATE_LORAS = 6.0
SAMPLE_BYTES_PER_PIXEL = 1.5  # estimate: a PNG of a generated image, about half its raw RGB

# Container start once the image is there (Vast); the local runner starts in seconds.
MODEL_LOAD_S = 60.0  # estimate: load the checkpoint and its components, build the network
CACHE_S_PER_IMAGE = 0.5  # estimate: VAE-encode one image (and its captions) once


class DatasetSummary(BaseModel):
    where: str
    images: int
    captions: int
    bytes: int


class ModelSummary(BaseModel):
    reference: str
    filename: str
    base_model: str
    family: BaseModelFamily
    variant: str | None = None
    bytes: int | None = Field(default=None, description="None: the source does not say.")
    component_bytes: int = 0


class OfferEstimate(BaseModel):
    offer: str  # the provider's offer id, or "local"
    gpu_name: str
    vram_gb: float | None
    dollars_per_hour: float
    download_mbps: float | None
    reliability: float | None
    country: str | None = None
    gpu_class: str
    seconds_per_step: float
    download_s: float  # GPU image + the run's inputs
    overhead_s: float  # boot + model load + caching
    training_s: float
    hours: float  # wall time from create to the last step
    billed_hours: float  # GPU time billed: from `running`, so without the image pull and boot
    upload_bytes: int
    bandwidth_usd: float
    cost_usd: float
    note: str | None = None


class Estimate(BaseModel):
    provider: Literal["local", "vast"]
    dataset: DatasetSummary
    model: ModelSummary
    trainer: str
    training: TrainingConfig  # filled with the family's defaults
    steps: int
    steps_formula: str
    family_vram_gb: int
    requirements: GpuRequirements  # what the offer search uses
    offers: list[OfferEstimate]
    assumptions: list[str]

    @property
    def best(self) -> OfferEstimate | None:
        return self.offers[0] if self.offers else None


class NoQualifyingOffer(Exception):
    """The provider has no offer that meets the run's requirements right now."""


def planned_steps(config: TrainingConfig, images: int) -> tuple[int, str]:
    """Optimizer steps sd-scripts will run, and how that number was reached."""
    if config.max_train_steps:
        return config.max_train_steps, f"max_train_steps = {config.max_train_steps}"
    batch = config.batch_size or 1
    per_epoch = math.ceil(images * config.repeats / batch)
    return per_epoch * config.epochs, (
        f"ceil({images} images x {config.repeats} repeats / batch {batch}) x "
        f"{config.epochs} epochs = {per_epoch * config.epochs}"
    )


def upload_bytes(
    family: BaseModelFamily, config: TrainingConfig, samples: SampleSettings
) -> tuple[int, str]:
    """Bytes the run uploads (formula in the module doc), and how that number was reached."""
    lora = LORA_BYTES_PER_RANK.get(family, LORA_BYTES_PER_RANK["sdxl"]) * (config.network_dim or 32)
    per_state = STATE_LORAS_8BIT if "8bit" in config.optimizer.lower() else STATE_LORAS
    epochs = config.epochs
    reference = DEFAULT_RESOLUTION.get(family, _OTHER_RESOLUTION)
    pixels = (samples.width or config.resolution or reference) * (
        samples.height or config.resolution or reference
    )
    images = sum(samples.due(e, epochs) for e in range(1, epochs + 1)) * (
        len(samples.prompts) or samples.count
    )
    total = (
        (epochs + 1) * lora
        + (epochs - 1) * per_state * lora
        + images * pixels * SAMPLE_BYTES_PER_PIXEL
    )
    return round(total), (
        f"uploads: {epochs} epochs' LoRA ({lora / 1e6:.0f} MB each) and {epochs - 1} training "
        f"states ({per_state:g} LoRAs each), {images} sample images and the kept LoRA: "
        f"{total / 1e9:.2f} GB at the offer's upload price"
    )


def gpu_class(gpu_name: str) -> tuple[str, float]:
    """(class name, time per step relative to the RTX 3090 class) for a GPU's name."""
    for pattern, name, factor in GPU_CLASSES:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return name, factor
    return UNKNOWN_CLASS


def seconds_per_step(
    family: BaseModelFamily, variant: str | None, gpu_name: str, config: TrainingConfig
) -> tuple[float, str]:
    """Expected seconds per optimizer step, and the GPU class it assumed."""
    if family == "sd3" and (variant or "large").lower() != "medium":
        base = SD3_LARGE_SECONDS_PER_STEP
    else:
        base = SECONDS_PER_STEP.get(family, SECONDS_PER_STEP["sdxl"])
    name, factor = gpu_class(gpu_name)
    reference = DEFAULT_RESOLUTION.get(family, _OTHER_RESOLUTION)
    resolution = config.resolution or reference
    return base * factor * (resolution / reference) ** 2 * (config.batch_size or 1), name


def estimate_offer(
    *,
    offer: str,
    gpu_name: str,
    vram_gb: float | None,
    prices: OfferPrices,
    reliability: float | None,
    country: str | None,
    image_bytes: int,
    download_bytes: int,
    uploads: int,
    boot_s: float,
    images: int,
    steps: int,
    family: BaseModelFamily,
    variant: str | None,
    config: TrainingConfig,
    note: str | None = None,
) -> OfferEstimate:
    """Time and cost of the whole run on one offer (formula in the module doc)."""
    per_step, class_name = seconds_per_step(family, variant, gpu_name, config)
    training_s = steps * per_step
    load_s = MODEL_LOAD_S + CACHE_S_PER_IMAGE * images
    cost = run_cost(
        prices,
        image_bytes=image_bytes,
        boot_s=boot_s,
        download_bytes=download_bytes,
        work_s=load_s + training_s,
        upload_bytes=uploads,
    )
    return OfferEstimate(
        offer=offer,
        gpu_name=gpu_name,
        vram_gb=vram_gb,
        dollars_per_hour=prices.dollars_per_hour,
        download_mbps=prices.download_mbps or None,
        reliability=reliability,
        country=country,
        gpu_class=class_name,
        seconds_per_step=per_step,
        download_s=transfer_s(image_bytes, prices.download_mbps) + cost.download_s,
        overhead_s=boot_s + load_s,
        training_s=training_s,
        hours=cost.wall_s / 3600,
        billed_hours=cost.billed_s / 3600,
        upload_bytes=uploads,
        bandwidth_usd=cost.bandwidth_usd,
        cost_usd=cost.usd,
        note=note,
    )


def local_gpu() -> tuple[str, float | None]:
    """This machine's first CUDA GPU (name, VRAM GB) as nvidia-smi reports it, or a name that
    says there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            answer = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            answer = ""
        first = answer.strip().splitlines()[0] if answer.strip() else ""
        name, _, memory = first.partition(",")
        if name.strip():
            try:
                return name.strip(), float(memory) / 1024
            except ValueError:
                return name.strip(), None
    return "this machine", None


def estimate_run(
    settings: Settings,
    *,
    dataset: DatasetSummary,
    model: ModelSummary,
    trainer: str,
    training: TrainingConfig,
    request_gpu: GpuRequirements,
    samples: SampleSettings | None = None,
    top: int = 5,
) -> Estimate:
    """The estimate for one run: requirements, offers from the configured provider, time, cost.

    Raises NoQualifyingOffer when the provider has nothing that fits, ValueError when the
    provider is not configured, and the Vast provider's errors when Vast cannot be asked.
    `samples`: the request's (None: a request's default).
    """
    family, variant = model.family, model.variant
    config = filled_config(training, family)
    steps, formula = planned_steps(config, dataset.images)
    requirements = effective_requirements(request_gpu, family, variant, training, model.bytes)
    family_vram_gb, _ = family_minimums(family, variant, training, model.bytes)
    inputs = dataset.bytes + (model.bytes or 0) + model.component_bytes
    uploads, uploads_line = upload_bytes(family, config, samples or SampleSettings())
    local = settings.gpu_provider == "local"
    # The local runner needs no image and starts at once; a Vast host pulls the GPU image.
    image_bytes = 0 if local else settings.vast_image_bytes
    boot_s = 0.0 if local else settings.vast_boot_overhead_s
    on_offer = partial(
        estimate_offer,
        image_bytes=image_bytes,
        download_bytes=inputs,
        uploads=uploads,
        boot_s=boot_s,
        images=dataset.images,
        steps=steps,
        family=family,
        variant=variant,
        config=config,
    )
    offers = _local_offers(on_offer, requirements) if local else []
    if not local:
        from .providers.vast import VastProvider

        for ranked in VastProvider(settings).ranked_offers(requirements, download_bytes=inputs):
            o = ranked.offer
            offers.append(
                on_offer(
                    offer=str(o.id),
                    gpu_name=o.gpu_name,
                    vram_gb=o.gpu_ram / 1024,  # MiB, as Vast reports it
                    prices=o.prices,
                    reliability=o.reliability,
                    country=o.country,
                )
            )
        if not offers:
            raise NoQualifyingOffer(
                f"no Vast offer qualifies: {requirements.describe()}; raise "
                "gpu.max_dollars_per_hour, lower gpu.min_reliability or widen gpu.gpu_names"
            )
    reference = DEFAULT_RESOLUTION.get(family, _OTHER_RESOLUTION)
    model_size = f"{model.bytes / 1e9:.2f} GB" if model.bytes is not None else "unknown (0)"
    image = f" + GPU image {image_bytes / 1e9:.1f} GB" if image_bytes else ""
    assumptions = [
        f"steps: {formula}",
        f"s/step: {family} {seconds_per_step(family, variant, 'RTX 3090', _batch_one(config))[0]:g}"
        f" s at batch 1 and {config.resolution or reference} px on an RTX 3090-class GPU "
        "(published figures and estimates, see activities/estimate.py), scaled by GPU class "
        "and batch size",
        f"downloads: model {model_size} + components {model.component_bytes / 1e9:.2f} GB + "
        f"images {dataset.bytes / 1e6:.1f} MB{image} at the offer's download speed",
        f"overheads: boot {boot_s:.0f} s + model load {MODEL_LOAD_S:.0f} s + caching "
        f"{CACHE_S_PER_IMAGE:g} s per image",
        uploads_line,
        "billing: the GPU's $/h from the container running (not the image pull or boot, which "
        "bill only the disk), bandwidth both ways at the offer's $/GiB",
        f"GPU: at least {requirements.min_vram_gb} GB VRAM ({family} needs {family_vram_gb} GB "
        f"with these settings; the request asks {request_gpu.min_vram_gb} GB) and "
        f"{requirements.disk_gb} GB disk",
    ]
    return Estimate(
        provider=settings.gpu_provider,
        dataset=dataset,
        model=model,
        trainer=trainer,
        training=config,
        steps=steps,
        steps_formula=formula,
        family_vram_gb=family_vram_gb,
        requirements=requirements,
        offers=sorted(offers, key=lambda o: (o.cost_usd, o.offer))[:top],
        assumptions=assumptions,
    )


def _batch_one(config: TrainingConfig) -> TrainingConfig:
    return config.model_copy(update={"batch_size": 1})


def _local_offers(
    on_offer: Callable[..., OfferEstimate], requirements: GpuRequirements
) -> list[OfferEstimate]:
    """This machine as the only offer, at $0."""
    name, vram = local_gpu()
    note = None
    if vram is None:
        note = "no CUDA GPU found: its times assume an RTX 3090-class GPU"
    elif vram < requirements.min_vram_gb:
        note = f"{vram:.0f} GB VRAM, below the {requirements.min_vram_gb} GB this run needs"
    return [
        on_offer(
            offer="local",
            gpu_name=name,
            vram_gb=vram,
            prices=OfferPrices(dollars_per_hour=0.0),
            reliability=None,
            country=None,
            note=note,
        )
    ]


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def local_dataset(where: str, files: Sequence[Path]) -> DatasetSummary:
    """A local folder's images and captions, as `train` would upload them."""
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    captions = [f for f in files if f.suffix.lower() == ".txt"]
    return DatasetSummary(
        where=where,
        images=len(images),
        captions=len(captions),
        bytes=sum(f.stat().st_size for f in files),
    )


def s3_dataset(s3: S3Client, bucket: str, prefix: str) -> DatasetSummary:
    """The images and captions under s3://bucket/prefix/ as the worker reads them (a listing)."""
    folder = prefix.lstrip("/")
    if folder and not folder.endswith("/"):
        folder += "/"
    images = captions = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for item in page.get("Contents", []):
            suffix = PurePosixPath(item["Key"]).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images += 1
            elif suffix == ".txt":
                captions += 1
            else:
                continue
            size += item.get("Size", 0)
    return DatasetSummary(
        where=f"s3://{bucket}/{folder}", images=images, captions=captions, bytes=size
    )


async def resolve_model(
    settings: Settings,
    s3: S3Client,
    reference: str,
    model_files: dict[ComponentRole, str] | None = None,
) -> ModelSummary:
    """The model as the run's `resolve_model` activity resolves it (the same code, in-process:
    Civitai's API, an HTTP HEAD, an S3 HEAD or the local file). Raises its ApplicationError."""
    from .civitai import ModelActivities, ResolveModelInput

    resolved = await ModelActivities(s3, settings).resolve_model(
        ResolveModelInput(run_id="estimate", model=reference, model_files=model_files or {})
    )
    component_bytes = sum(c.bytes or 0 for c in resolved.components)
    return ModelSummary(
        reference=reference,
        filename=resolved.filename,
        base_model=resolved.base_model,
        family=resolved.family,
        variant=resolved.variant,
        bytes=resolved.bytes,
        component_bytes=component_bytes,
    )


def format_duration(seconds: float) -> str:
    """1h05m, 9m06s, 42s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
