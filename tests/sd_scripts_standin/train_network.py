"""Stand-in for kohya-ss sd-scripts' train_network.py, for tests (standard library only).

It reads the same --config_file and dataset TOML as sd-scripts, reads the images and captions,
and prints what sd-scripts prints, in its formats: `epoch N/M` on stdout, the tqdm bar with
`avr_loss` on stderr, and checkpoints named as sd-scripts names them (save_every_n_epochs: the
last epoch is only `<output_name>.safetensors`), with sd-scripts' metadata (ss_* and modelspec.*
keys, computed as sd-scripts computes them). Like sd-scripts, it calls the trainer's
step_logging/epoch_logging hooks only when tracking (a logging_dir is set), and those write
TensorBoard event files where accelerate's tracker writes them:
<logging_dir>/<YYYYmmddHHMMSS>/network_train/events.out.tfevents.<time>.<host>.<pid>.0.

Behaviour, from the environment:
  STANDIN_MODE     ok (default) | nodata | nan | crash | slow
  STANDIN_LOSSES   comma-separated average loss per epoch (default: a slowly falling curve)
  STANDIN_STEP_S   seconds per step (default 0; 0.2 in nan and slow mode)
  STANDIN_PIDS_FILE  when set: start a grandchild that sleeps, write "<trainer pid> <grandchild pid>" here
  STANDIN_IGNORE_SIGTERM  1: the grandchild ignores SIGTERM (only SIGKILL ends it)
  STANDIN_PLAIN    1: no trainer hooks, as an sd-scripts without them (the launcher falls back)
  STANDIN_CRASH    in crash mode, the exception to raise as "<module>.<Name>: <message>"
                   (default: a RuntimeError for CUDA out of memory)
  STANDIN_LAUNCH_ENV_FILE  when set: write there, as JSON, the environment that accelerate
                   launch gives a training script (ACCELERATE_*, WORLD_SIZE, MASTER_*)

Like sd-scripts: --save_state writes <output_name>-<epoch>-state/ (train_state.json and the
accelerate files) beside each epoch's LoRA but the last; --resume <state dir> reads its
train_state.json and starts at the epoch after it; --sample_prompts writes one PNG per prompt
line every --sample_every_n_epochs to <output_dir>/sample/<output_name>_e<epoch>_<nn>_<time>.png.
"""

# ruff: noqa: E501, RUF001  (sd-scripts' messages, verbatim)

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from library import train_util
from library.train_util import logger


class Accelerator:
    """accelerate's Accelerator with a TensorBoard tracker, as sd-scripts sets it up."""

    is_main_process = True

    def __init__(self, logging_dir: str | None) -> None:
        # library/train_util.py prepare_accelerator: <logging_dir>/<log_prefix><timestamp>
        self.project_dir = (
            None if logging_dir is None else f"{logging_dir}/{time.strftime('%Y%m%d%H%M%S')}"
        )
        self._events: EventFile | None = None

    def init_trackers(self, project_name: str) -> None:
        if self.project_dir is not None:
            self._events = EventFile(Path(self.project_dir) / project_name)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self._events is not None:
            for tag, value in values.items():
                self._events.scalar(tag, float(value), step)


class EventFile:
    """What torch's SummaryWriter writes: TFRecords of Event protobufs, one per scalar, flushed
    as they come (so a crash keeps what was logged)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = folder / name
        self._write(_event(0, file_version="brain.Event:2"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary_value = _field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value)
        self._write(_event(step, summary=_field(1, summary_value)))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        with self.path.open("ab") as f:
            f.write(length + struct.pack("<I", _masked_crc32c(length)))
            f.write(record + struct.pack("<I", _masked_crc32c(record)))


def _event(step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    """An Event: wall_time (1, double), step (2, varint), file_version (3), summary (5)."""
    event = bytes([1 << 3 | 1]) + struct.pack("<d", time.time()) + bytes([2 << 3]) + _varint(step)
    if file_version is not None:
        event += _field(3, file_version.encode())
    if summary is not None:
        event += _field(5, summary)
    return event


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class NetworkTrainer:
    def __init__(self) -> None:
        self.is_sdxl = False

    def step_logging(
        self, accelerator: Any, logs: dict[str, Any], global_step: int, epoch: int
    ) -> None:
        accelerator.log(logs, step=global_step)

    def epoch_logging(
        self, accelerator: Any, logs: dict[str, Any], global_step: int, epoch: int
    ) -> None:
        accelerator.log(logs, step=epoch)

    def assert_extra_args(self, args: argparse.Namespace) -> None:
        pass

    def train(self, args: argparse.Namespace) -> None:
        if os.environ.get("STANDIN_LAUNCH_ENV_FILE"):
            _write_launch_env(os.environ["STANDIN_LAUNCH_ENV_FILE"])
        mode = os.environ.get("STANDIN_MODE", "ok")
        step_s = float(os.environ.get("STANDIN_STEP_S", "0.2" if mode in ("nan", "slow") else "0"))
        train_util.prepare_dataset_args(args, True)
        logger.info(f"Loading dataset config from {args.dataset_config}")
        subsets = _subsets(train_util.load_dataset_config(args.dataset_config))
        num_train_images = 0
        for subset in subsets:
            images = _images(subset["image_dir"])
            captions = _captions(images, subset.get("caption_extension", ".caption"))
            logger.info(f"found directory {subset['image_dir']} contains {len(images)} image files")
            if len(captions) < len(images):
                logger.warning(f"No caption file found for {len(images) - len(captions)} images.")
            num_train_images += len(images) * subset.get("num_repeats", 1)
        if mode == "nodata" or num_train_images == 0:
            logger.error(
                "No data found. Please verify arguments (train_data_dir must be the parent of folders with images) / 画像がありません。引数指定を確認してください（train_data_dirには画像があるフォルダではなく、画像があるフォルダの親フォルダを指定する必要があります）"
            )
            return
        self.assert_extra_args(args)
        batch_size = subsets[0].get("batch_size", 1)
        batches = math.ceil(num_train_images / batch_size)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * batches
            print(
                f"override steps. steps for {args.max_train_epochs} epochs is / 指定エポックまでのステップ数: {args.max_train_steps}"
            )
        num_train_epochs = math.ceil(args.max_train_steps / batches)
        print("running training / 学習開始")
        print(f"  num train images * repeats / 学習画像の数×繰り返し回数: {num_train_images}")
        print(f"  num batches per epoch / 1epochのバッチ数: {batches}")
        print(f"  num epochs / epoch数: {num_train_epochs}")
        print(f"  total optimization steps / 学習ステップ数: {args.max_train_steps}")
        if os.environ.get("STANDIN_PIDS_FILE"):
            _spawn_grandchild()

        metadata = {
            "ss_training_started_at": time.time(),
            "ss_output_name": args.output_name,
            "ss_learning_rate": args.learning_rate,
            "ss_unet_lr": args.unet_lr,
            "ss_num_train_images": num_train_images,
            "ss_num_batches_per_epoch": batches,
            "ss_num_epochs": num_train_epochs,
            "ss_max_train_steps": args.max_train_steps,
            "ss_network_module": args.network_module,
            "ss_network_dim": args.network_dim,
            "ss_network_alpha": args.network_alpha,
            "ss_mixed_precision": args.mixed_precision,
            "ss_v2": bool(args.v2),
            "ss_seed": args.seed,
            "ss_sd_scripts_commit_hash": train_util.get_git_revision_hash(),
        }
        metadata = {k: str(v) for k, v in metadata.items()}  # as sd-scripts does

        epoch_losses = _epoch_losses(num_train_epochs)
        tracking = args.logging_dir is not None and hasattr(self, "step_logging")
        accelerator = Accelerator(args.logging_dir)
        if tracking:
            accelerator.init_trackers("network_train")
        recorder = train_util.LossRecorder()
        progress_bar = train_util.ProgressBar(args.max_train_steps)
        global_step = 0
        epoch_to_start = 0
        if args.resume:
            # train_network.py: steps_from_state // batches per epoch, then "do not skip".
            logger.info(f"resume training from local state: {args.resume}")
            with open(os.path.join(args.resume, "train_state.json"), encoding="utf-8") as f:
                steps_from_state = json.load(f)["current_step"]
            logger.info(f"load train state from {args.resume}: current_step {steps_from_state}")
            epoch_to_start = steps_from_state // batches
        for epoch in range(epoch_to_start, num_train_epochs):
            print(f"\nepoch {epoch + 1}/{num_train_epochs}\n")
            for step in range(batches):
                time.sleep(step_s)
                if mode == "crash" and epoch == 1:
                    raise _crash()
                # Per-batch losses spread around the epoch's average, which they keep exactly.
                loss = epoch_losses[epoch] + 0.001 * (2 * step - (batches - 1))
                if mode == "nan" and (epoch, step) >= (0, 2):
                    loss = math.nan
                progress_bar.update(1)
                global_step += 1
                recorder.add(epoch=epoch, step=step, loss=loss)
                progress_bar.set_postfix(avr_loss=recorder.moving_average)
                if tracking:
                    logs = {
                        "loss/current": loss,
                        "loss/average": recorder.moving_average,
                        "lr/unet": args.unet_lr,
                    }
                    self.step_logging(accelerator, logs, global_step, epoch + 1)
                if global_step >= args.max_train_steps:
                    break
            if tracking:
                self.epoch_logging(
                    accelerator,
                    {"loss/epoch_average": recorder.moving_average},
                    global_step,
                    epoch + 1,
                )
            if (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs:
                name = f"{args.output_name}-{epoch + 1:06d}.safetensors"
                self._save(args, name, metadata, global_step, epoch + 1)
                if args.save_state:
                    _save_state(args, epoch + 1, (epoch + 1) * batches)
            _sample_images(args, epoch + 1)
        self._save(args, f"{args.output_name}.safetensors", metadata, global_step, num_train_epochs)
        logger.info("model saved.")

    def _save(
        self,
        args: argparse.Namespace,
        name: str,
        metadata: dict[str, str],
        steps: int,
        epoch: int,
    ) -> None:
        """A valid .safetensors file without tensors, with sd-scripts' metadata for the epoch."""
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, name)
        print(f"\nsaving checkpoint: {path}")
        metadata["ss_training_finished_at"] = str(time.time())
        metadata["ss_steps"] = str(steps)
        metadata["ss_epoch"] = str(epoch)
        metadata.update(train_util.get_sai_model_spec(None, args, self.is_sdxl, True, False))
        header = json.dumps({"__metadata__": metadata}).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)


def _save_state(args: argparse.Namespace, epoch: int, step: int) -> None:
    """train_util.save_and_remove_state_on_epoch_end: accelerate's files and train_state.json."""
    state = Path(args.output_dir) / f"{args.output_name}-{epoch:06d}-state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "optimizer.bin").write_bytes(f"optimizer state of epoch {epoch}".encode())
    (state / "random_states_0.pkl").write_bytes(b"rng")
    train_state = {"current_epoch": epoch, "current_step": step}
    (state / "train_state.json").write_text(json.dumps(train_state), encoding="utf-8")


# The smallest valid PNG: one white pixel.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154789c63f8"
    "ffff3f0005fe02fe0def46b80000000049454e44ae426082"
)


def _sample_images(args: argparse.Namespace, epoch: int) -> None:
    """train_network.py sample_images at an epoch's end: one image per prompt file line."""
    if not args.sample_prompts or epoch % (args.sample_every_n_epochs or 1) != 0:
        return
    lines = Path(args.sample_prompts).read_text(encoding="utf-8").splitlines()
    folder = Path(args.output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    for i, line in enumerate(line for line in lines if line.strip()):
        logger.info(f"prompt: {line}")
        (folder / f"{args.output_name}_e{epoch:06d}_{i:02d}_{stamp}.png").write_bytes(_PNG)


def _subsets(config: dict[str, Any]) -> list[dict[str, Any]]:
    general = config.get("general", {})
    return [
        {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
        for dataset in config.get("datasets", [])
        for subset in dataset.get("subsets", [])
    ]


def _images(image_dir: str) -> list[Path]:
    folder = Path(image_dir)
    if not folder.is_dir():
        logger.warning(f"not directory: {image_dir}")
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in train_util.IMAGE_EXTENSIONS)


def _captions(images: list[Path], extension: str) -> dict[Path, str]:
    return {
        image: image.with_suffix(extension).read_text(encoding="utf-8").splitlines()[0].strip()
        for image in images
        if image.with_suffix(extension).is_file()
    }


def _epoch_losses(epochs: int) -> list[float]:
    given = [float(x) for x in os.environ.get("STANDIN_LOSSES", "").split(",") if x.strip()]
    default = [0.2 - 0.01 * e for e in range(epochs)]
    return [given[e] if e < len(given) else default[e] for e in range(epochs)]


def _crash() -> Exception:
    """The exception STANDIN_CRASH names; its traceback prints "<module>.<Name>: <message>"."""
    spec = os.environ.get("STANDIN_CRASH")
    if not spec:
        return RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (stand-in)")
    name, _, message = spec.partition(": ")
    module, _, qualname = name.rpartition(".")
    error: type[Exception] = type(qualname, (Exception,), {"__module__": module or "builtins"})
    return error(message)


def _write_launch_env(path: str) -> None:
    """What sd-scripts' Accelerator() would read: accelerate's settings and the process group's."""
    launch = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("ACCELERATE_") or key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    Path(path).write_text(json.dumps(launch, sort_keys=True))


def _spawn_grandchild() -> None:
    """A process that outlives its parent unless the whole process group is signalled."""
    code = "import signal, time\n"
    if os.environ.get("STANDIN_IGNORE_SIGTERM") == "1":
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(600)\n"
    child = subprocess.Popen([sys.executable, "-c", code])
    pids_file = os.environ.get("STANDIN_PIDS_FILE")
    if pids_file:
        Path(pids_file).write_text(f"{os.getpid()} {child.pid}\n")


def setup_parser() -> argparse.ArgumentParser:
    """The options loratrain passes, named as in sd-scripts' argparse (train_util, train_network)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file", type=str, default=None)
    for flag in (
        "v2",
        "v_parameterization",
        "network_train_unet_only",
        "no_half_vae",
        "cache_latents",
        "cache_text_encoder_outputs",
        "gradient_checkpointing",
        "sdpa",
        "xformers",
        "persistent_data_loader_workers",
        "save_state",
    ):
        parser.add_argument(f"--{flag}", action="store_true")
    for name in (
        "pretrained_model_name_or_path",
        "tokenizer_cache_dir",
        "dataset_config",
        "output_dir",
        "output_name",
        "save_precision",
        "network_module",
        "optimizer_type",
        "lr_scheduler",
        "mixed_precision",
        "logging_dir",
        "resolution",
        "resume",
        "sample_prompts",
        "sample_sampler",
    ):
        parser.add_argument(f"--{name}", type=str, default=None)
    parser.add_argument(
        "--save_model_as",
        type=str,
        default="safetensors",
        choices=[None, "ckpt", "pt", "safetensors"],
    )
    for name, default in (
        ("save_every_n_epochs", None),
        ("max_train_epochs", None),
        ("max_train_steps", 1600),
        ("network_dim", None),
        ("lr_warmup_steps", 0),
        ("seed", None),
        ("max_data_loader_n_workers", 8),
        ("sample_every_n_epochs", None),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, rate in (("network_alpha", 1.0), ("learning_rate", 2.0e-6), ("unet_lr", None)):
        parser.add_argument(f"--{name}", type=float, default=rate)
    parser.add_argument("--text_encoder_lr", type=float, default=None, nargs="*")
    return parser


if os.environ.get("STANDIN_PLAIN") == "1":
    del NetworkTrainer.step_logging, NetworkTrainer.epoch_logging


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = NetworkTrainer()
    trainer.train(args)
