"""Stand-in for sd-scripts' library/train_util.py: config loading, the loss recorder, tqdm's bar.

Key names and messages are sd-scripts' own (checked at commit 48d368fa). Stricter than
sd-scripts in one way: unknown keys in the --config_file TOML are errors here (sd-scripts ignores
them silently), so a misspelt argument fails the tests instead of being dropped.
"""

# ruff: noqa: E501, RUF001  (sd-scripts' messages, verbatim)

from __future__ import annotations

import argparse
import logging
import sys
import time
import tomllib
from typing import Any

logger = logging.getLogger("sd-scripts-standin")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

IMAGE_EXTENSIONS = [
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".PNG",
    ".JPG",
    ".JPEG",
    ".WEBP",
    ".BMP",
]

# library/config_util.py ConfigSanitizer schemas (DreamBooth style, dropout supported).
SUBSET_ASCENDABLE = {
    "color_aug",
    "face_crop_aug_range",
    "flip_aug",
    "num_repeats",
    "random_crop",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "caption_separator",
    "enable_wildcard",
    "token_warmup_min",
    "token_warmup_step",
    "caption_prefix",
    "caption_suffix",
    "custom_attributes",
    "resize_interpolation",
}
DROPOUT_ASCENDABLE = {
    "caption_dropout_every_n_epochs",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
}
DREAMBOOTH_ASCENDABLE = {"caption_extension", "class_tokens", "cache_info"}
DREAMBOOTH_DISTINCT = {"image_dir", "is_reg", "alpha_mask"}
DATASET_ASCENDABLE = {
    "batch_size",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "enable_bucket",
    "max_bucket_reso",
    "min_bucket_reso",
    "validation_seed",
    "validation_split",
    "resolution",
    "network_multiplier",
    "resize_interpolation",
}
GENERAL_KEYS = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DREAMBOOTH_ASCENDABLE | DROPOUT_ASCENDABLE
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = SUBSET_ASCENDABLE | DREAMBOOTH_DISTINCT | DREAMBOOTH_ASCENDABLE | DROPOUT_ASCENDABLE


def get_git_revision_hash() -> str:
    """sd-scripts asks `git rev-parse HEAD` in its library folder and answers "(unknown)" when
    that fails, as it does on the GPU image, which deletes sd-scripts' .git. The stand-in sits
    in this project's own git checkout, so it answers as the image does without asking git."""
    return "(unknown)"


def get_sai_model_spec(
    state_dict: dict[str, Any] | None,
    args: argparse.Namespace,
    sdxl: bool,
    lora: bool,
    textual_inversion: bool,
) -> dict[str, str]:
    """sd-scripts' call: the resolution is --resolution (None when only the dataset config has
    one), and the title the output name."""
    # Imported here, not at the top as sd-scripts does: the tests read this file's schemas alone.
    from library import sai_model_spec

    return sai_model_spec.build_metadata(
        args.v2, args.v_parameterization, sdxl, time.time(), args.output_name, args.resolution
    )


def prepare_dataset_args(args: argparse.Namespace, support_metadata: bool) -> None:
    """sd-scripts turns --resolution ('size' or 'width,height') into a (width, height) tuple."""
    if args.resolution is not None:
        args.resolution = tuple([int(r) for r in args.resolution.split(",")])
        if len(args.resolution) == 1:
            args.resolution = (args.resolution[0], args.resolution[0])
        assert len(args.resolution) == 2, (
            f"resolution must be 'size' or 'width,height' / resolution（解像度）は'サイズ'または'幅','高さ'で指定してください: {args.resolution}"
        )


def verify_command_line_training_args(args: argparse.Namespace) -> None:
    """sd-scripts warns about secrets on the command line here; nothing to do in the stand-in."""


def read_config_from_file(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> argparse.Namespace:
    if not args.config_file:
        return args
    logger.info(f"Loading settings from {args.config_file}...")
    with open(args.config_file, "rb") as f:
        config = tomllib.load(f)
    flat: dict[str, Any] = {}
    for key, value in config.items():  # sections are flattened, as sd-scripts does
        flat.update(value if isinstance(value, dict) else {key: value})
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"unknown training arguments in {args.config_file}: {', '.join(unknown)}")
    return parser.parse_args(namespace=argparse.Namespace(**flat))


def load_dataset_config(path: str) -> dict[str, Any]:
    """The dataset TOML, rejecting unknown keys as sd-scripts' voluptuous schema does."""
    with open(path, "rb") as f:
        config = tomllib.load(f)
    _check(config, {"general", "datasets"}, "data")
    _check(config.get("general", {}), GENERAL_KEYS, "data['general']")
    for i, dataset in enumerate(config.get("datasets", [])):
        _check(dataset, DATASET_KEYS, f"data['datasets'][{i}]")
        for j, subset in enumerate(dataset.get("subsets", [])):
            _check(subset, SUBSET_KEYS, f"data['datasets'][{i}]['subsets'][{j}]")
            if "image_dir" not in subset:
                raise ValueError(
                    f"required key not provided @ data['datasets'][{i}]['subsets'][{j}]['image_dir']"
                )
    return config


def _check(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            logger.error("Invalid user config / ユーザ設定の形式が正しくないようです")
            raise ValueError(f"extra keys not allowed @ {where}['{key}']")


class LossRecorder:
    """sd-scripts' LossRecorder: one slot per batch index, overwritten epoch after epoch."""

    def __init__(self) -> None:
        self.loss_list: list[float] = []
        self.loss_total = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list) if self.loss_list else 0


class ProgressBar:
    """tqdm's bar as sd-scripts draws it on stderr (not a terminal: 10-character bar, `\\r`)."""

    def __init__(self, total: int, desc: str = "steps") -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.postfix = ""
        self.start = time.monotonic()
        self.last_len = 0
        self.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(
            f"{k}={format_num(v) if isinstance(v, (int, float)) else v}" for k, v in values.items()
        )
        self.refresh()

    def refresh(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if self.n and elapsed > 0 else None
        if rate is None:
            rate_fmt, remaining = "?it/s", "?"
        else:
            rate_fmt = f"{1 / rate:5.2f}s/it" if 1 / rate > 1 else f"{rate:5.2f}it/s"
            remaining = format_interval((self.total - self.n) / rate)
        postfix = f", {self.postfix}" if self.postfix else ""
        line = (
            f"{self.desc}: {self.n / self.total * 100:3.0f}%|{self._bar()}| "
            f"{self.n}/{self.total} [{format_interval(elapsed)}<{remaining}, {rate_fmt}{postfix}]"
        )
        sys.stderr.write("\r" + line + " " * max(self.last_len - len(line), 0))
        sys.stderr.flush()
        self.last_len = len(line)

    def _bar(self, width: int = 10) -> str:
        filled = self.n / self.total * width
        full = int(filled)
        partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < width else ""
        return ("█" * full + partial).ljust(width)


def format_num(n: float) -> str:
    """tqdm.format_num: 3 significant digits unless str() is shorter."""
    f = f"{n:.3g}".replace("+0", "+").replace("-0", "-")
    s = str(n)
    return f if len(f) < len(s) else s


def format_interval(t: float) -> str:
    mins, s = divmod(int(t), 60)
    h, m = divmod(mins, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
