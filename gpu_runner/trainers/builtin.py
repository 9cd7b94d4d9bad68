"""Train a LoRA in this process with torch, diffusers and peft (`trainer: builtin`).

For SD 1.x-architecture models, on CUDA when there is one, else on the CPU in fp32. It keeps the
sd-scripts trainer's contract: the same progress, a checkpoint per epoch named as sd-scripts
names them, the lowest epoch-average loss wins, a loss that is not finite stops training, and
failures carry the same codes. The files are kohya LoRA files (`lora_unet_*` / `lora_te_*`
modules with `lora_down`, `lora_up` and `alpha`, `ss_*` metadata), so they load wherever
sd-scripts' output does (ComfyUI, A1111, diffusers' load_lora_weights).

The LoRA covers the modules sd-scripts' networks.lora covers: every Linear and 1x1 Conv2d inside
the UNet's Transformer2DModel blocks and inside the text encoder's CLIPAttention and CLIPMLP
(the text encoder only when text_encoder_lr > 0). peft adds and trains the adapters; their
weights are renamed to kohya's names when saved (peft's lora_A/lora_B are lora_down/lora_up,
and both scale by alpha / rank).

Models it loads: a diffusers folder, or one .safetensors file in this project's single-file
layout (save_single_file: the diffusers state dicts under `unet.`, `vae.`, `text_encoder.`, the
configs and the tokenizer in the metadata), which is what gpu_runner.demo_assets writes. The
original SD checkpoint layout that Civitai serves is the sd-scripts trainer's job for now.

torch, diffusers, transformers and peft (the `train` extra) are imported when training starts,
never when this module is imported, so the runner loads without them.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_runner.protocol import BaseModelFamily, MixedPrecision, Sampler, TrainingProgressData
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import (
    PreparedTraining,
    ProgressCallback,
    ResumePoint,
    SavedEpoch,
    TrainerError,
    TrainingInputs,
    TrainingResult,
    kept_epoch,
    sample_prompts,
)
from gpu_runner.trainers.sd_scripts import (
    IMAGE_EXTENSIONS,
    LOG_TAIL_LINES,
    checkpoint_name,
    image_dirs,
    planned_total_steps,
    write_captions,
)

# The same logger the sd-scripts trainer writes its output to (it goes into the run's log).
log = logging.getLogger("gpu_runner.trainer")

SINGLE_FILE_FORMAT = "loratrain.diffusers/1"
"""The `format` metadata value of a single-file model in save_single_file's layout."""

_COMPONENT_PREFIXES = ("unet", "vae", "text_encoder")
_FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_TOKENIZER_FILE = "tokenizer/"  # metadata key prefix: one entry per file of the tokenizer
_UNET_TARGET_BLOCKS = frozenset({"Transformer2DModel"})
_TEXT_ENCODER_TARGET_BLOCKS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
_SUPPORTED_FAMILIES = {"sd15": "sd_v1", "sd2": "sd_v2"}
_OPTIMIZERS = ("AdamW", "AdamW8bit", "SGDNesterov", "Adafactor")
MAX_GRAD_NORM = 1.0  # sd-scripts' default max_grad_norm
# One epoch's training state (adapters, optimizer, LR scheduler, loss scaler, RNG, position), in
# a folder named as sd-scripts names its own (<output_name>-<epoch>-state).
STATE_FILE = "builtin_state.pt"
STATE_FORMAT = "loratrain.builtin-state/1"
# diffusers' scheduler for each sampler name (sd-scripts' names); the others render with euler_a.
_SAMPLER_SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


# --------------------------------------------------------------------------------------------
# Models: load and save
# --------------------------------------------------------------------------------------------


@dataclass
class SdComponents:
    """An SD 1.x/2.x pipeline's parts (diffusers / transformers objects)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


def save_single_file(components: SdComponents, path: Path) -> None:
    """Write the components as one .safetensors file that load_components reads back."""
    import tempfile

    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for prefix in _COMPONENT_PREFIXES:
        module = getattr(components, prefix)
        for key, tensor in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = tensor.detach().contiguous()
    metadata = {
        "format": SINGLE_FILE_FORMAT,
        "unet_config": json.dumps(dict(components.unet.config)),
        "vae_config": json.dumps(dict(components.vae.config)),
        "text_encoder_config": components.text_encoder.config.to_json_string(),
        "scheduler_config": json.dumps(dict(components.scheduler.config)),
    }
    with tempfile.TemporaryDirectory() as scratch:
        components.tokenizer.save_pretrained(scratch)
        for file in sorted(Path(scratch).iterdir()):
            metadata[_TOKENIZER_FILE + file.name] = file.read_text(encoding="utf-8")
    save_file(tensors, str(path), metadata)


def check_model(model_path: Path) -> dict[str, str] | None:
    """Raise TrainerError unless load_components can load this model; reads only the header.

    Returns the single file's metadata, or None for a diffusers folder.
    """
    if model_path.is_dir():
        missing = [part for part in _FOLDER_PARTS if not (model_path / part).is_dir()]
        if missing:
            raise TrainerError(
                "invalid_model",
                f"{model_path.name} is not a diffusers Stable Diffusion folder: it has no "
                f"{', '.join(missing)}",
                stage="files",
            )
        return None
    if model_path.suffix.lower() != ".safetensors":
        raise TrainerError(
            "unsupported_model",
            f"{model_path.name}: the builtin trainer loads .safetensors files and diffusers "
            "folders; use the sd-scripts trainer for other checkpoint formats",
            stage="files",
        )
    from safetensors import safe_open

    try:
        with safe_open(str(model_path), framework="pt") as f:
            metadata: dict[str, str] = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise TrainerError(
            "invalid_model",
            f"{model_path.name} is not a readable .safetensors file: {e}",
            stage="files",
        ) from None
    if metadata.get("format") != SINGLE_FILE_FORMAT:
        raise TrainerError(
            "unsupported_model",
            f"{model_path.name} is a single-file checkpoint in the original Stable Diffusion "
            "layout, which the builtin trainer cannot load yet: start the run with trainer "
            "'sd-scripts', or give a diffusers folder",
            stage="files",
        )
    return metadata


def load_components(model_path: Path) -> SdComponents:
    """Load a diffusers folder or a single file in save_single_file's layout, on the CPU."""
    metadata = check_model(model_path)
    if metadata is None:
        return _load_diffusers_folder(model_path)
    return _load_single_file(model_path, metadata)


def _load_diffusers_folder(folder: Path) -> SdComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return SdComponents(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
    )


def _load_single_file(path: Path, metadata: dict[str, str]) -> SdComponents:
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tensors = load_file(str(path))
    unet = UNet2DConditionModel.from_config(json.loads(metadata["unet_config"]))
    vae = AutoencoderKL.from_config(json.loads(metadata["vae_config"]))
    text_config = CLIPTextConfig.from_dict(json.loads(metadata["text_encoder_config"]))
    text_encoder = CLIPTextModel(text_config)
    for prefix, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        start = prefix + "."
        state = {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
        module.load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as scratch:
        for key, text in metadata.items():
            if key.startswith(_TOKENIZER_FILE):
                name = Path(key[len(_TOKENIZER_FILE) :]).name  # never a path outside scratch
                Path(scratch, name).write_text(text, encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(scratch, local_files_only=True)
    scheduler = DDPMScheduler.from_config(json.loads(metadata["scheduler_config"]))
    return SdComponents(unet, vae, text_encoder, tokenizer, scheduler)


# --------------------------------------------------------------------------------------------
# kohya LoRA format
# --------------------------------------------------------------------------------------------


def lora_target_modules(root: Any, blocks: frozenset[str]) -> list[str]:
    """Names (within `root`) of the Linear and 1x1 Conv2d modules inside blocks of the given
    classes: the modules sd-scripts' networks.lora puts a LoRA on."""
    import torch

    targets: list[str] = []
    for name, module in root.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child_name, child in module.named_modules():
            pointwise = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if child_name and (isinstance(child, torch.nn.Linear) or pointwise):
                full = f"{name}.{child_name}" if name else child_name
                if full not in targets:
                    targets.append(full)
    return targets


def kohya_module_name(prefix: str, module_path: str) -> str:
    """sd-scripts' name for a LoRA module: prefix + the module path with dots as underscores."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def kohya_state_dict(
    model: Any, prefix: str, alpha: float, path_prefix: str = ""
) -> dict[str, Any]:
    """A peft-adapted model's LoRA weights under kohya's names, with one alpha per module.

    `path_prefix` goes before every module path (see text_encoder_path_prefix).
    """
    import torch
    from peft import get_peft_model_state_dict

    state: dict[str, Any] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module_path, _, kind = key.rpartition(".lora_")
        name = kohya_module_name(prefix, path_prefix + module_path)
        if kind == "A.weight":
            state[f"{name}.lora_down.weight"] = tensor.detach()
        elif kind == "B.weight":
            state[f"{name}.lora_up.weight"] = tensor.detach()
        else:
            raise ValueError(f"unexpected LoRA weight {key}")
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def text_encoder_path_prefix(text_encoder: Any) -> str:
    """What makes the text encoder's module paths read as in transformers 4, whose
    CLIPTextModel wraps everything in `text_model`: sd-scripts' names (lora_te_text_model_...)
    come from there, and transformers 5 dropped that level."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def additional_networks_hashes(tensors: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash, which sd-scripts precomputes for A1111's
    additional-networks: sha256 of the tensor bytes of the file as saved with only its ss_*
    metadata, and the first 8 hex digits of sha256 of 64 KiB at offset 1 MiB of that file."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


# --------------------------------------------------------------------------------------------
# The plan: what prepare decides, what train runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    images: list[Path]
    folders: list[tuple[Path, int]]
    steps_per_epoch: int
    epochs: int
    total_steps: int
    device: str  # "cuda" or "cpu"
    mixed_precision: MixedPrecision  # what training runs in ("no" on the CPU)
    train_text_encoder: bool


def family_refusal(family: BaseModelFamily) -> str | None:
    """Why this trainer cannot train `family` (None when it can); the run's intake asks too,
    so the refusal comes before any GPU is rented."""
    if family in _SUPPORTED_FAMILIES:
        return None
    return (
        f"the builtin trainer trains SD 1.x and SD 2.x models, not {family}: start the run "
        "with `--trainer sd-scripts` (trainer 'sd-scripts' in the request), which trains "
        "SDXL, Flux.1 and SD 3.5 too"
    )


def plan_training(inputs: TrainingInputs, cuda: bool) -> TrainingPlan:
    """Check the request against what this trainer can do, and lay out the run."""
    config = inputs.config
    if problem := family_refusal(inputs.family):
        raise TrainerError("unsupported_model", problem, stage="files")
    if config.optimizer not in _OPTIMIZERS:
        raise TrainerError(
            "invalid_config",
            f"the builtin trainer has no {config.optimizer} optimizer (it has "
            f"{', '.join(_OPTIMIZERS)}); choose one of those or use trainer 'sd-scripts'",
            stage="files",
        )
    folders = image_dirs(inputs.dataset_dir)
    if not folders:
        raise TrainerError(
            "no_training_data",
            f"no images in the dataset ({', '.join(sorted(IMAGE_EXTENSIONS))} expected)",
            stage="files",
        )
    images = [
        image
        for folder, _ in folders
        for image in sorted(folder.iterdir())
        if image.is_file() and image.suffix.lower() in IMAGE_EXTENSIONS
    ]
    batch_size = _required(config.batch_size, "batch_size")
    steps_per_epoch = math.ceil(len(images) * config.repeats / batch_size)
    total_steps = planned_total_steps(inputs, len(images))
    epochs = math.ceil(total_steps / steps_per_epoch)
    precision = _required(config.mixed_precision, "mixed_precision")
    return TrainingPlan(
        images=images,
        folders=folders,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total_steps,
        device="cuda" if cuda else "cpu",
        mixed_precision=precision if cuda else "no",
        train_text_encoder=bool(config.text_encoder_lr),
    )


def _required(value: Any, name: str) -> Any:
    if value is None:
        raise TrainerError(
            "invalid_config", f"training.{name} is not set (fill the config with for_family)"
        )
    return value


class _Stopped(Exception):
    """stop() was called; the training thread leaves at the next step."""


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class BuiltinTrainer:
    """The Trainer that trains in this process (see the module docstring)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._task: asyncio.Future[TrainingResult] | None = None
        self._log: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._plan: TrainingPlan | None = None

    def prepare(self, inputs: TrainingInputs) -> PreparedTraining:
        """Check the request, put the trigger word first in every caption, plan the steps."""
        try:
            import torch
        except ImportError as e:
            raise TrainerError(
                "trainer_unavailable",
                f"the builtin trainer needs torch, diffusers and peft (pip install "
                f"'loratrain[train]'): {e}",
                stage="files",
            ) from None
        plan = plan_training(inputs, cuda=torch.cuda.is_available())
        check_model(inputs.model_path)
        config = inputs.config
        if config.trigger_word or config.class_word:
            write_captions(plan.folders, config.trigger_word, config.class_word)
        inputs.output_dir.mkdir(parents=True, exist_ok=True)
        if plan.device == "cpu" and inputs.config.mixed_precision != "no":
            self._note(
                f"no CUDA on this machine: training on the CPU in fp32 "
                f"(mixed_precision {inputs.config.mixed_precision} needs a GPU)"
            )
        self._plan = plan
        return PreparedTraining(
            inputs=inputs,
            total_steps=plan.total_steps,
            paths={"model": str(inputs.model_path), "output_dir": str(inputs.output_dir)},
            device=plan.device,
            mixed_precision=plan.mixed_precision,
        )

    async def train(
        self, prepared: PreparedTraining, on_progress: ProgressCallback
    ) -> TrainingResult:
        """Train in a worker thread; report its progress from this event loop."""
        if self._stop.is_set():
            raise TrainerError("trainer_stopped", "training was stopped before it started")
        plan = self._plan or plan_training(prepared.inputs, cuda=prepared.device == "cuda")
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[TrainingProgressData | None] = asyncio.Queue()

        def report(progress: TrainingProgressData) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, progress)

        task = asyncio.ensure_future(asyncio.to_thread(self._run, prepared.inputs, plan, report))
        self._task = task
        # Runs after every update the thread queued, so the queue ends with this None.
        task.add_done_callback(lambda _: updates.put_nowait(None))
        try:
            while (progress := await updates.get()) is not None:
                result = on_progress(progress)
                if inspect.isawaitable(result):
                    await result
            return await task
        finally:
            self._stop.set()  # a cancelled caller must not leave the thread training

    async def stop(self) -> None:
        """Stop training at the next step and wait for the training thread to end."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait([self._task])

    # ---- the training thread ---------------------------------------------------------------

    def _note(self, line: str) -> None:
        log.info("%s", line)
        self._log.append(line)

    def _run(
        self,
        inputs: TrainingInputs,
        plan: TrainingPlan,
        report: Callable[[TrainingProgressData], None],
    ) -> TrainingResult:
        try:
            return _Training(inputs, plan, self._stop, self._note, report).run()
        except TrainerError as e:
            e.log_tail = e.log_tail or list(self._log)
            raise
        except _Stopped:
            raise TrainerError(
                "trainer_stopped",
                "training was stopped before it finished",
                log_tail=list(self._log),
            ) from None
        except Exception as e:
            for line in traceback.format_exc().splitlines()[-20:]:
                self._log.append(line)
            out_of_memory = "out of memory" in str(e).lower()
            hint = ": use a smaller batch_size or resolution" if out_of_memory else ""
            message = f"the builtin trainer failed: {type(e).__name__}: {e}{hint}"
            raise TrainerError(
                "trainer_crashed",
                _redact(message, inputs.secrets),
                log_tail=[_redact(line, inputs.secrets) for line in self._log],
            ) from None


def _redact(line: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line


class _Training:
    """One training run on one device (runs in a worker thread)."""

    def __init__(
        self,
        inputs: TrainingInputs,
        plan: TrainingPlan,
        stop: threading.Event,
        note: Callable[[str], None],
        report: Callable[[TrainingProgressData], None],
    ) -> None:
        self.inputs = inputs
        self.config = inputs.config
        self.plan = plan
        self.stop = stop
        self.note = note
        self.report = report

    def run(self) -> TrainingResult:
        import torch

        config, plan = self.config, self.plan
        torch.manual_seed(config.seed)
        device = torch.device(plan.device)
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            plan.mixed_precision
        ]
        where = plan.device
        if plan.device == "cpu":
            torch.set_num_threads(cpu_threads())
            where = f"cpu, {torch.get_num_threads()} threads"
        self.note(
            f"builtin trainer: {len(plan.images)} images x {config.repeats} repeats, "
            f"{plan.epochs} epochs of {plan.steps_per_epoch} steps on {where} "
            f"({'fp32' if plan.mixed_precision == 'no' else plan.mixed_precision})"
        )
        started_at = time.time()
        model = load_components(self.inputs.model_path)
        self._check_architecture(model)
        self.check_stop()
        latents = self._encode_images(model, device)
        captions = [self._caption(image) for image in plan.images]
        token_ids = model.tokenizer(
            captions,
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.check_stop()
        unet_params, text_params = self._add_adapters(model, device, weight_dtype)
        cached_text: Any = None
        if not plan.train_text_encoder:
            with torch.no_grad():
                cached_text = model.text_encoder(token_ids.to(device))[0].to(weight_dtype)
        optimizer, optimizer_name = self._optimizer(unet_params, text_params)
        lr_scheduler = self._lr_scheduler(optimizer)
        noise_scheduler = _training_scheduler(model.scheduler)
        metadata = self._metadata(model, optimizer_name, captions, started_at)
        # fp16 gradients underflow without loss scaling (accelerate does the same for sd-scripts).
        scaler = torch.amp.GradScaler(plan.device, enabled=weight_dtype == torch.float16)

        step = 0
        epoch_losses: list[float] = []
        step_times: deque[float] = deque(maxlen=20)
        first_epoch = 1
        if self.inputs.resume is not None:
            step, epoch_losses = self._resume(
                self.inputs.resume, model, optimizer, lr_scheduler, scaler
            )
            first_epoch = self.inputs.resume.epoch + 1
            self.note(
                f"resumed from epoch {self.inputs.resume.epoch} (step {step}): training epochs "
                f"{first_epoch}-{plan.epochs}"
            )
        saver = _Trained(optimizer, lr_scheduler, scaler, captions, device, weight_dtype)
        if self.inputs.resume is None:
            self.note(f"training epochs 1-{plan.epochs}")
        for epoch in range(first_epoch, plan.epochs + 1):
            order = [i for i in range(len(plan.images)) for _ in range(config.repeats)]
            random.Random(config.seed + epoch).shuffle(order)
            losses: list[float] = []
            batch_size = _required(config.batch_size, "batch_size")
            for start in range(0, len(order), batch_size):
                if step >= plan.total_steps:
                    break
                self.check_stop()
                began = time.monotonic()
                batch = torch.tensor(order[start : start + batch_size])
                if cached_text is not None:
                    hidden = cached_text[batch]
                else:
                    with _autocast(device, weight_dtype):  # fp32 adapters on half weights
                        hidden = model.text_encoder(token_ids[batch].to(device))[0]
                loss_tensor = self._step(
                    model, noise_scheduler, latents[batch], hidden, weight_dtype, device
                )
                loss = float(loss_tensor.detach())
                if not math.isfinite(loss):
                    raise TrainerError(
                        "loss_diverged",
                        f"training stopped: the loss became {loss} at step {step + 1}. Try a "
                        "lower learning rate, another optimizer, or mixed_precision bf16.",
                    )
                scaler.scale(loss_tensor).backward()
                scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_([*unet_params, *text_params], MAX_GRAD_NORM)
                scaler.step(optimizer)
                scaler.update()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss)
                step_times.append(time.monotonic() - began)
                self._report(step, epoch, losses, step_times)
            epoch_losses.append(sum(losses) / len(losses))
            self.note(f"epoch {epoch}/{plan.epochs}: average loss {epoch_losses[-1]:.6f}")
            lora = self._save(model, metadata, epoch, step)
            self._finish_epoch(model, saver, epoch, step, epoch_losses, lora)
        if not epoch_losses:
            raise TrainerError("no_epochs", "training ended without a single epoch")
        best = kept_epoch(epoch_losses, self.inputs.keep)
        checkpoint = self.inputs.output_dir / checkpoint_name(
            config.output_name, best, len(epoch_losses)
        )
        resumed = self.inputs.resume
        if best < first_epoch and resumed is not None and best in resumed.loras:
            checkpoint = resumed.loras[best]  # trained by an earlier host
        return TrainingResult(
            epoch_losses=epoch_losses,
            best_epoch=best,
            checkpoint=checkpoint,
            loss=epoch_losses[best - 1],
        )

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    # ---- every epoch: state and samples, then the runner uploads them --------------------

    def _finish_epoch(
        self,
        model: SdComponents,
        saver: _Trained,
        epoch: int,
        step: int,
        epoch_losses: list[float],
        lora: Path,
    ) -> None:
        """The epoch's state (to resume from) and samples, then tell the runner: it uploads
        them in the background while the next epoch trains."""
        last = epoch == self.plan.epochs
        on_epoch = self.inputs.on_epoch
        state_dir = None
        if on_epoch is not None and not last:
            state_dir = self._save_state(model, saver, epoch, step, epoch_losses)
        samples: list[Path] = []
        if self.inputs.samples.due(epoch, self.plan.epochs):
            samples = self._render_samples(model, saver, epoch)
        if on_epoch is not None:
            on_epoch(
                SavedEpoch(
                    epoch=epoch,
                    total_epochs=self.plan.epochs,
                    step=step,
                    loss=epoch_losses[-1],
                    lora=lora,
                    state_dir=state_dir,
                    samples=samples,
                )
            )

    def _adapter_params(self, model: SdComponents) -> dict[str, Any]:
        """The trained parameters by name: the adapters, nothing of the frozen model."""
        return {
            f"{prefix}.{name}": param
            for prefix, module in (("unet", model.unet), ("text_encoder", model.text_encoder))
            for name, param in module.named_parameters()
            if param.requires_grad
        }

    def _save_state(
        self,
        model: SdComponents,
        saver: _Trained,
        epoch: int,
        step: int,
        epoch_losses: list[float],
    ) -> Path:
        """Everything the next epoch depends on, so a resumed run continues exactly as this
        one would have (bit for bit on the same device)."""
        import torch

        cuda = saver.device.type == "cuda"
        state = {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "step": step,
            "epoch_losses": list(epoch_losses),
            "adapters": {
                name: param.detach().to("cpu").clone()
                for name, param in self._adapter_params(model).items()
            },
            "optimizer": saver.optimizer.state_dict(),
            "lr_scheduler": saver.lr_scheduler.state_dict(),
            "scaler": saver.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if cuda else [],
        }
        name = self.config.output_name
        folder = self.inputs.output_dir / f"{name}-{epoch:06d}-state"
        partial = folder.with_name(folder.name + ".part")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save(state, partial / STATE_FILE)
        train_state = {"current_epoch": epoch, "current_step": step, "format": STATE_FORMAT}
        (partial / "train_state.json").write_text(json.dumps(train_state), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        return folder

    def _resume(
        self,
        resume: ResumePoint,
        model: SdComponents,
        optimizer: Any,
        lr_scheduler: Any,
        scaler: Any,
    ) -> tuple[int, list[float]]:
        """Load an earlier attempt's state: the adapters, optimizer, scheduler, scaler and RNG
        as they were at the end of `resume.epoch`. Returns (step, epoch losses so far)."""
        import torch

        path = resume.state_dir / STATE_FILE
        if not path.is_file():
            raise TrainerError(
                "resume_state_invalid",
                f"the state of epoch {resume.epoch} has no {STATE_FILE}: it was not saved by "
                "the builtin trainer",
                stage="files",
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = self._adapter_params(model)
        saved = state.get("adapters", {})
        fits = set(saved) == set(params) and all(
            saved[name].shape == param.shape for name, param in params.items()
        )
        if state.get("format") != STATE_FORMAT or not fits:
            raise TrainerError(
                "resume_state_invalid",
                f"the state of epoch {resume.epoch} does not fit this run (another network "
                "rank, model, or text encoder setting)",
                stage="files",
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name].to(param.device, param.dtype))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        cuda_states = state["rng_cuda"]
        if cuda_states and torch.cuda.is_available():
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
            else:
                self.note("the saved CUDA RNG is of another number of GPUs: not restored")
        return int(state["step"]), [float(loss) for loss in state["epoch_losses"]]

    def _render_samples(self, model: SdComponents, saver: _Trained, epoch: int) -> list[Path]:
        """The epoch's sample images, rendered with its LoRA by the diffusers pipeline. The
        training RNG is left as it was, so samples never change what training does next."""
        import torch
        from diffusers import StableDiffusionPipeline

        settings = self.inputs.samples
        prompts = sample_prompts(settings, saver.captions)
        if not prompts:
            return []
        size = _required(self.config.resolution, "resolution")
        device = saver.device
        pipeline: Any = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=_sampler(settings.sampler, model.scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        folder = self.inputs.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        model.vae.to(device)
        model.unet.eval()
        model.text_encoder.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for index, prompt in enumerate(prompts):
                    self.check_stop()
                    generator = torch.Generator(device=device).manual_seed(settings.seed + index)
                    with _autocast(device, saver.weight_dtype):
                        image = pipeline(
                            prompt,
                            negative_prompt=settings.negative_prompt or None,
                            num_inference_steps=settings.steps,
                            guidance_scale=7.0 if settings.guidance is None else settings.guidance,
                            width=settings.width or size,
                            height=settings.height or size,
                            generator=generator,
                        ).images[0]
                    path = folder / f"{self.config.output_name}_e{epoch:06d}_{index:02d}.png"
                    image.save(path)
                    paths.append(path)
        finally:
            model.vae.to("cpu")
            model.unet.train()
            model.text_encoder.train(self.plan.train_text_encoder)
        self.note(f"epoch {epoch}: {len(paths)} samples in {folder.name}/")
        return paths

    def _check_architecture(self, model: SdComponents) -> None:
        cross = model.unet.config.cross_attention_dim
        hidden = model.text_encoder.config.hidden_size
        if cross != hidden:
            raise TrainerError(
                "unsupported_model",
                f"{self.inputs.model_path.name} is not an SD 1.x/2.x model: the UNet attends to "
                f"{cross}-wide text but the text encoder gives {hidden}",
                stage="files",
            )

    def _caption(self, image: Path) -> str:
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            lines = caption_file.read_text(encoding="utf-8").strip().splitlines()
            if lines:
                return lines[0].strip()
        return self.config.trigger_word or ""

    def _encode_images(self, model: SdComponents, device: Any) -> Any:
        """Each image resized and centre-cropped to the resolution, encoded once (the VAE stays
        out of the training steps, as sd-scripts' cache_latents does)."""
        import numpy as np
        import torch
        from PIL import Image

        size = _required(self.config.resolution, "resolution")
        vae = model.vae.to(device, dtype=torch.float32).eval()
        encoded = []
        with torch.no_grad():
            for path in self.plan.images:
                self.check_stop()
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
                scale = size / min(image.size)
                width, height = (max(size, round(d * scale)) for d in image.size)
                image = image.resize((width, height), Image.Resampling.BICUBIC)
                left, top = (width - size) // 2, (height - size) // 2
                image = image.crop((left, top, left + size, top + size))
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
                pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(device)
                latent = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                encoded.append(latent)
        model.vae.to("cpu")  # not needed again: free the device memory
        return torch.cat(encoded)

    def _add_adapters(
        self, model: SdComponents, device: Any, weight_dtype: Any
    ) -> tuple[list[Any], list[Any]]:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        dim = _required(self.config.network_dim, "network_dim")
        alpha = float(_required(self.config.network_alpha, "network_alpha"))
        parts = [(model.unet, _UNET_TARGET_BLOCKS)]
        if self.plan.train_text_encoder:
            parts.append((model.text_encoder, _TEXT_ENCODER_TARGET_BLOCKS))
        for module in (model.text_encoder, model.unet):
            module.requires_grad_(False).to(device)
            if weight_dtype != torch.float32:  # a no-op cast would only warn
                module.to(dtype=weight_dtype)
        trainable: list[list[Any]] = []
        for module, blocks in parts:
            targets = lora_target_modules(module, blocks)
            if not targets:
                raise TrainerError(
                    "unsupported_model",
                    f"{self.inputs.model_path.name}: found no attention layers to train in "
                    f"its {type(module).__name__}",
                    stage="files",
                )
            # peft scales by lora_alpha / r as kohya does; fractional alphas work despite its hint.
            lora = LoraConfig(
                r=dim,
                lora_alpha=alpha,  # type: ignore[arg-type]
                target_modules=targets,
                lora_dropout=0.0,
            )
            inject_adapter_in_model(lora, module)
            params = [p for p in module.parameters() if p.requires_grad]
            for param in params:  # the adapters train in fp32 whatever the base weights are
                param.data = param.data.float()
            module.train()
            trainable.append(params)
        model.text_encoder.train(self.plan.train_text_encoder)
        return trainable[0], trainable[1] if len(trainable) > 1 else []

    def _optimizer(self, unet_params: list[Any], text_params: list[Any]) -> tuple[Any, str]:
        import torch

        config = self.config
        groups = [{"params": unet_params, "lr": config.unet_lr}]
        if text_params:
            groups.append({"params": text_params, "lr": config.text_encoder_lr})
        optimizer: Any
        if config.optimizer in ("AdamW", "AdamW8bit"):
            if config.optimizer == "AdamW8bit":
                self.note("AdamW8bit needs bitsandbytes: the builtin trainer uses AdamW")
            optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        elif config.optimizer == "SGDNesterov":
            optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
        else:
            from transformers.optimization import Adafactor

            optimizer = Adafactor(groups, scale_parameter=False, relative_step=False)
        kind = type(optimizer)
        return optimizer, f"{kind.__module__}.{kind.__name__}"

    def _lr_scheduler(self, optimizer: Any) -> Any:
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            self.config.lr_scheduler,
            optimizer,
            num_warmup_steps=self.config.lr_warmup_steps,
            num_training_steps=self.plan.total_steps,
        )

    def _step(
        self,
        model: SdComponents,
        noise_scheduler: Any,
        latents: Any,
        hidden: Any,
        weight_dtype: Any,
        device: Any,
    ) -> Any:
        """One forward pass: the UNet learns to predict the added noise. Returns the loss."""
        import torch
        import torch.nn.functional as F

        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with _autocast(device, weight_dtype):
            prediction = model.unet(noisy.to(weight_dtype), timesteps, hidden).sample
        return F.mse_loss(prediction.float(), target.float())

    def _report(self, step: int, epoch: int, losses: list[float], step_times: deque[float]) -> None:
        per_step = sum(step_times) / len(step_times)
        self.report(
            TrainingProgressData(
                step=step,
                total=self.plan.total_steps,
                epoch=epoch,
                total_epochs=self.plan.epochs,
                loss=sum(losses) / len(losses),  # the epoch's average so far, as sd-scripts shows
                it_per_s=1.0 / per_step if per_step > 0 else None,
                eta_s=round(per_step * (self.plan.total_steps - step), 1),
            )
        )

    def _metadata(
        self, model: SdComponents, optimizer_name: str, captions: list[str], started_at: float
    ) -> dict[str, str]:
        """sd-scripts' training metadata (train_network.py's ss_* keys) for these settings."""
        config, plan = self.config, self.plan
        resolution = _required(config.resolution, "resolution")
        v_prediction = model.scheduler.config.get("prediction_type") == "v_prediction"
        v2 = self.inputs.family == "sd2"
        tag_frequency: dict[str, dict[str, int]] = {}
        dataset_dirs: dict[str, dict[str, int]] = {}
        for folder, count in plan.folders:
            name = folder.name
            dataset_dirs[name] = {"n_repeats": config.repeats, "img_count": count}
            tags: dict[str, int] = {}
            for image, caption in zip(plan.images, captions, strict=True):
                if image.parent == folder:
                    for tag in (t.strip() for t in caption.split(",")):
                        if tag:
                            tags[tag] = tags.get(tag, 0) + 1
            tag_frequency[name] = tags
        base_version = "sd_v2" if v2 else "sd_v1"
        if v_prediction:
            base_version += "_v"
        architecture = (
            ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512")
            if v2
            else "stable-diffusion-v1"
        )
        values: dict[str, Any] = {
            "ss_session_id": random.Random(config.seed).randint(0, 2**32),
            "ss_training_started_at": started_at,
            "ss_output_name": config.output_name,
            "ss_learning_rate": config.unet_lr,
            "ss_text_encoder_lr": config.text_encoder_lr if plan.train_text_encoder else None,
            "ss_unet_lr": config.unet_lr,
            "ss_num_train_images": len(plan.images) * config.repeats,
            "ss_num_reg_images": 0,
            "ss_num_batches_per_epoch": plan.steps_per_epoch,
            "ss_num_epochs": plan.epochs,
            "ss_gradient_checkpointing": False,
            "ss_gradient_accumulation_steps": 1,
            "ss_max_train_steps": plan.total_steps,
            "ss_lr_warmup_steps": config.lr_warmup_steps,
            "ss_lr_scheduler": config.lr_scheduler,
            "ss_network_module": "networks.lora",
            "ss_network_dim": config.network_dim,
            "ss_network_alpha": config.network_alpha,
            "ss_network_dropout": None,
            "ss_network_train_unet_only": not plan.train_text_encoder,
            "ss_mixed_precision": plan.mixed_precision,
            "ss_full_fp16": False,
            "ss_v2": v2,
            "ss_base_model_version": base_version,
            "ss_clip_skip": None,
            "ss_max_token_length": None,
            "ss_cache_latents": True,
            "ss_seed": config.seed,
            "ss_noise_offset": None,
            "ss_optimizer": optimizer_name,
            "ss_max_grad_norm": MAX_GRAD_NORM,
            "ss_min_snr_gamma": None,
            "ss_datasets": json.dumps(
                [
                    {
                        "is_dreambooth": True,
                        "batch_size_per_device": config.batch_size,
                        "num_train_images": len(plan.images) * config.repeats,
                        "num_reg_images": 0,
                        "resolution": [resolution, resolution],
                        "enable_bucket": False,
                        "tag_frequency": tag_frequency,
                        "subsets": [
                            {
                                "img_count": count,
                                "num_repeats": config.repeats,
                                "keep_tokens": config.keep_tokens,
                                "image_dir": folder.name,
                                "class_tokens": config.trigger_word,
                                "is_reg": False,
                            }
                            for folder, count in plan.folders
                        ],
                    }
                ]
            ),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "ss_sd_model_name": self.inputs.model_path.name,
            "ss_new_sd_model_hash": _file_sha256(self.inputs.model_path),
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": config.output_name,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        }
        return {k: str(v) for k, v in values.items()}

    def _save(self, model: SdComponents, metadata: dict[str, str], epoch: int, step: int) -> Path:
        """Write this epoch's checkpoint (fp16 when training in mixed precision, as sd-scripts'
        save_precision does here; fp32 otherwise)."""
        import torch
        from safetensors.torch import save_file

        config = self.config
        alpha = float(_required(config.network_alpha, "network_alpha"))
        tensors = kohya_state_dict(model.unet, "lora_unet", alpha)
        if self.plan.train_text_encoder:
            path_prefix = text_encoder_path_prefix(model.text_encoder)
            tensors.update(kohya_state_dict(model.text_encoder, "lora_te", alpha, path_prefix))
        dtype = torch.float32 if self.plan.mixed_precision == "no" else torch.float16
        tensors = {k: v.to("cpu", dtype=dtype).contiguous() for k, v in tensors.items()}
        saved = {
            **metadata,
            "ss_training_finished_at": str(time.time()),
            "ss_steps": str(step),
            "ss_epoch": str(epoch),
        }
        saved.update(additional_networks_hashes(tensors, saved))
        path = self.inputs.output_dir / checkpoint_name(config.output_name, epoch, self.plan.epochs)
        partial = path.with_name(path.name + ".part")
        save_file(tensors, str(partial), saved)
        partial.replace(path)
        self.note(f"saved epoch {epoch}: {path.name}")
        return path


@dataclass(frozen=True)
class _Trained:
    """What saving an epoch's state and rendering its samples need of the training loop."""

    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    captions: list[str]
    device: Any
    weight_dtype: Any


def _sampler(name: Sampler, scheduler: Any) -> Any:
    """The diffusers scheduler for a sampler name, with the model's noise schedule."""
    import diffusers

    kind = getattr(diffusers, _SAMPLER_SCHEDULERS.get(name, "EulerAncestralDiscreteScheduler"))
    options = {"algorithm_type": "dpmsolver"} if name == "dpmsolver" else {}
    return kind.from_config(scheduler.config, **options)


def _autocast(device: Any, weight_dtype: Any) -> Any:
    """Mixed precision for a forward pass: the adapters are fp32, the base weights may not be."""
    import torch

    return torch.autocast(
        device_type=device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32
    )


def cpu_threads() -> int:
    """Threads for training on the CPU: all cores but one, which the runner (and, on a dev
    machine, the rest of the stack) needs. On 2 busy cores one thread trains ~2.5x faster than
    two, which spend their time waiting for each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def _training_scheduler(scheduler: Any) -> Any:
    """DDPM with the model's noise schedule, as sd-scripts trains with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def _file_sha256(path: Path) -> str:
    if path.is_dir():
        return ""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()
