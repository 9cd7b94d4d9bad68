"""The sd-scripts trainer: config files, output parsing, and runs of the stand-in as a real child.

The stand-in (tests/sd_scripts_standin) reads the same TOML files as sd-scripts and prints its
formats; see its train_network.py for the STANDIN_* switches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import runpy
import shlex
import struct
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import BaseModelFamily, TrainingConfig, TrainingProgressData
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers import launcher, sd_scripts
from gpu_runner.trainers.base import TrainerError, TrainingInputs, TrainingResult
from gpu_runner.trainers.sd_scripts import (
    AccelerateConfig,
    OutputTracker,
    SdScriptsTrainer,
    TrainingArguments,
    checkpoint_name,
    parse_bar,
    parse_epoch,
    parse_interval,
)
from tests.runner.support import safetensors_metadata, tensorboard_scalars

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "sd_scripts_standin"
# The stand-in's copy of sd-scripts' dataset schema (library/config_util.py ConfigSanitizer).
SCHEMA = runpy.run_path(str(STANDIN / "library" / "train_util.py"))
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def standin_settings(tmp_path: Path, grace_s: float = 5.0) -> RunnerSettings:
    """Settings that run the stand-in; the runner's end-to-end tests use the same two values."""
    return RunnerSettings(
        runner_workdir=tmp_path,
        runner_accelerate_command=[sys.executable, str(STANDIN / "accelerate")],
        runner_sd_scripts_dir=STANDIN,
        runner_tokenizer_cache_dir=tmp_path / "tokenizers",
        runner_trainer_stop_grace_s=grace_s,
    )


def make_inputs(
    tmp_path: Path,
    family: BaseModelFamily = "sd15",
    images: int = 2,
    secrets: list[str] | None = None,
    dataset_name: str = "dataset",
    **config: Any,
) -> TrainingInputs:
    dataset = tmp_path / dataset_name
    (dataset / "nested").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (dataset / f"img{i}.png").write_bytes(PNG)
        (dataset / f"img{i}.txt").write_text(f"a photo of thing {i}\n")
    (dataset / "nested" / "more.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read by the stand-in")
    defaults: dict[str, Any] = {"epochs": 3, "repeats": 1, "batch_size": 1, "optimizer": "AdamW"}
    return TrainingInputs(
        run_dir=tmp_path / "run",
        dataset_dir=dataset,
        model_path=model,
        family=family,
        config=TrainingConfig(**{**defaults, **config}).for_family(family),
        output_dir=tmp_path / "run" / "output",
        secrets=secrets or [],
    )


class Progress:
    def __init__(self) -> None:
        self.updates: list[TrainingProgressData] = []
        self.first = asyncio.Event()

    async def __call__(self, update: TrainingProgressData) -> None:
        self.updates.append(update)
        if update.step > 0:
            self.first.set()


def running(pid: int) -> bool:
    """Whether pid is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def checkpoint_epoch(path: Path) -> int:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return int(json.loads(data[8 : 8 + size])["__metadata__"]["ss_epoch"])


async def run_standin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs: TrainingInputs, **env: str
) -> tuple[TrainingResult, Progress]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = SdScriptsTrainer(standin_settings(tmp_path))
    progress = Progress()
    result = await trainer.train(trainer.prepare(inputs), progress)
    return result, progress


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def test_dataset_toml_uses_only_sd_scripts_keys_and_txt_captions(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, trigger_word="sks", resolution=512, repeats=7, keep_tokens=1)
    prepared = SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)

    dataset = tomllib.loads(Path(prepared.paths["dataset_config"]).read_text())
    assert set(dataset) == {"general", "datasets"}
    assert set(dataset["general"]) <= SCHEMA["GENERAL_KEYS"]
    assert dataset["general"]["resolution"] == 512
    assert dataset["general"]["batch_size"] == 1
    subsets = dataset["datasets"][0]["subsets"]
    assert set(dataset["datasets"][0]) <= SCHEMA["DATASET_KEYS"]
    # One subset per folder holding images: sd-scripts does not look into subfolders.
    assert [s["image_dir"] for s in subsets] == [
        str(inputs.dataset_dir),
        str(inputs.dataset_dir / "nested"),
    ]
    for subset in subsets:
        assert set(subset) <= SCHEMA["SUBSET_KEYS"]
        assert subset["caption_extension"] == ".txt"  # sd-scripts' default is .caption
        assert subset["num_repeats"] == 7
        assert subset["class_tokens"] == "sks"
        assert subset["keep_tokens"] == 1
    # 3 images x 7 repeats / batch 1, 3 epochs.
    assert prepared.total_steps == 63


def test_the_trigger_word_starts_every_caption(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, trigger_word="sks")
    (inputs.dataset_dir / "img1.txt").write_text("sks, already tagged\n")

    SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)

    captions = {
        p.relative_to(inputs.dataset_dir).as_posix(): p.read_text()
        for p in inputs.dataset_dir.rglob("*.txt")
    }
    assert captions == {
        "img0.txt": "sks, a photo of thing 0",
        "img1.txt": "sks, already tagged",
        "nested/more.txt": "sks",  # an image without a caption gets the trigger word alone
    }


@pytest.mark.parametrize(
    ("trigger_word", "class_word", "uncaptioned"),
    [("sks", "dog", "sks, dog"), (None, "dog", "dog"), ("sks", None, "sks")],
)
def test_an_image_without_a_caption_gets_the_trigger_and_class_words(
    tmp_path: Path, trigger_word: str | None, class_word: str | None, uncaptioned: str
) -> None:
    inputs = make_inputs(tmp_path, trigger_word=trigger_word, class_word=class_word)

    SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)

    assert (inputs.dataset_dir / "nested" / "more.txt").read_text() == uncaptioned
    captioned = (inputs.dataset_dir / "img0.txt").read_text()
    assert captioned == (f"{trigger_word}, " if trigger_word else "") + "a photo of thing 0"


def test_training_toml_is_the_typed_model_mapped_from_the_config(tmp_path: Path) -> None:
    settings = standin_settings(tmp_path)
    inputs = make_inputs(tmp_path, epochs=4, network_dim=8, network_alpha=4, seed=7)
    prepared = SdScriptsTrainer(settings).prepare(inputs)

    args = tomllib.loads(Path(prepared.paths["training_config"]).read_text())
    assert set(args) <= set(TrainingArguments.model_fields)
    assert TrainingArguments.model_validate(args)  # round-trips through the typed model
    assert prepared.paths["script"] == "train_network.py"
    assert args["pretrained_model_name_or_path"] == str(inputs.model_path)
    assert args["dataset_config"] == prepared.paths["dataset_config"]
    assert args["output_dir"] == str(inputs.output_dir)
    assert args["output_name"] == "lora"
    assert args["save_model_as"] == "safetensors"
    assert args["save_every_n_epochs"] == 1
    assert args["max_train_epochs"] == 4
    assert "max_train_steps" not in args  # sd-scripts lets epochs override steps anyway
    assert args["network_module"] == "networks.lora"
    assert (args["network_dim"], args["network_alpha"]) == (8, 4.0)
    assert (args["unet_lr"], args["text_encoder_lr"]) == (1e-4, 5e-5)
    assert args["network_train_unet_only"] is False
    assert args["optimizer_type"] == "AdamW"
    assert (args["lr_scheduler"], args["seed"]) == ("cosine", 7)
    assert (args["mixed_precision"], args["save_precision"]) == ("fp16", "fp16")
    assert args["tokenizer_cache_dir"] == str(settings.runner_tokenizer_cache_dir)
    assert args["logging_dir"]  # the launcher's hooks only run while sd-scripts tracks
    assert args["v2"] is False
    assert "cache_text_encoder_outputs" not in args  # train_network.py has no such option


def test_sdxl_trains_the_unet_only_and_caches_text_encoder_outputs(tmp_path: Path) -> None:
    prepared = SdScriptsTrainer(standin_settings(tmp_path)).prepare(make_inputs(tmp_path, "sdxl"))
    args = tomllib.loads(Path(prepared.paths["training_config"]).read_text())
    assert prepared.paths["script"] == "sdxl_train_network.py"
    assert args["network_train_unet_only"] is True
    assert args["cache_text_encoder_outputs"] is True
    assert "text_encoder_lr" not in args
    assert args["mixed_precision"] == "bf16"


@pytest.mark.parametrize("v_parameterization", [True, False])
def test_sd2_predicts_v_only_when_the_checkpoint_does(
    tmp_path: Path, v_parameterization: bool
) -> None:
    inputs = replace(make_inputs(tmp_path, "sd2"), v_parameterization=v_parameterization)
    prepared = SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)
    args = tomllib.loads(Path(prepared.paths["training_config"]).read_text())
    assert (args["v2"], args["v_parameterization"]) == (True, v_parameterization)


def test_max_train_steps_replaces_epochs(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, max_train_steps=5)
    prepared = SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)
    args = tomllib.loads(Path(prepared.paths["training_config"]).read_text())
    assert args["max_train_steps"] == 5
    assert "max_train_epochs" not in args
    assert prepared.total_steps == 5


def test_other_families_are_not_trained(tmp_path: Path) -> None:
    with pytest.raises(TrainerError) as raised:
        SdScriptsTrainer(standin_settings(tmp_path)).prepare(make_inputs(tmp_path, "other"))
    assert raised.value.code == "unsupported_model"


def test_a_dataset_without_images_is_refused_before_training(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, images=0)
    (inputs.dataset_dir / "nested" / "more.jpg").unlink()
    with pytest.raises(TrainerError) as raised:
        SdScriptsTrainer(standin_settings(tmp_path)).prepare(inputs)
    assert raised.value.code == "no_training_data"


def test_toml_strings_are_escaped(tmp_path: Path) -> None:
    text = sd_scripts.dumps_toml({"a": 'quote " and \\ and é', "t": {"x": 1e-05, "on": True}})
    assert tomllib.loads(text) == {"a": 'quote " and \\ and é', "t": {"x": 1e-05, "on": True}}


# --------------------------------------------------------------------------------------------
# Output parsing
# --------------------------------------------------------------------------------------------

BAR = "steps:  25%|██▌       | 3/12 [00:04<00:14,  1.60s/it, avr_loss=1.21]"


def test_bar_in_seconds_per_iteration() -> None:
    bar = parse_bar(BAR)
    assert bar is not None
    assert (bar.step, bar.total, bar.avr_loss, bar.eta_s) == (3, 12, 1.21, 14.0)
    assert bar.it_per_s == pytest.approx(1 / 1.6)


def test_bar_in_iterations_per_second_and_before_the_first_step() -> None:
    bar = parse_bar(
        "steps:  50%|█████     | 600/1200 [01:02:03<1:00:00,  2.51it/s, avr_loss=0.0938]"
    )
    assert bar is not None
    assert (bar.step, bar.it_per_s, bar.eta_s, bar.avr_loss) == (600, 2.51, 3600.0, 0.0938)
    start = parse_bar("steps:   0%|          | 0/12 [00:00<?, ?it/s]")
    assert start is not None
    assert (start.step, start.it_per_s, start.eta_s, start.avr_loss) == (0, None, None, None)


def test_validation_bars_are_not_training_progress() -> None:
    assert parse_bar("epoch validation steps:  50%|█| 2/4 [00:01<00:01, 1.9it/s]") is None
    assert parse_bar("validation steps:  50%|█| 2/4 [00:01<00:01, 1.9it/s]") is None


def test_intervals_and_epoch_lines() -> None:
    assert parse_interval("00:14") == 14
    assert parse_interval("1:02:03") == 3723
    assert parse_interval("2d, 01:00:00") == 2 * 86400 + 3600
    assert parse_interval("?") is None
    assert parse_epoch("epoch 2/10") == (2, 10)
    assert parse_epoch("epoch 2/10 steps") is None


def test_tracker_reads_carriage_returns_glued_lines_and_epoch_ends() -> None:
    tracker = OutputTracker(secrets=["hunter2"])
    stream = (
        "running training / 学習開始\n"
        "\nepoch 1/2\n\n"
        "\rsteps:   0%|          | 0/4 [00:00<?, ?it/s]"
        "\rsteps:  25%|██▌       | 1/4 [00:01<00:03,  1.00s/it, avr_loss=0.5]"
        "\rsteps:  50%|█████     | 2/4 [00:02<00:02,  1.00s/it, avr_loss=0.45]"
        # a log line glued to the bar, as when sd-scripts logs without a newline first
        "\rsteps:  50%|█████     | 2/4 [00:02<00:02,  1.00s/it, avr_loss=0.45]INFO saving hunter2\n"
        "\nepoch 2/2\n\n"
        "\rsteps:  75%|███████▌  | 3/4 [00:03<00:01,  1.00s/it, avr_loss=0.41]"
    )
    updates = []
    for i in range(0, len(stream), 7):  # in small chunks, as a pipe may deliver it
        updates += tracker.feed(stream[i : i + 7])
    updates += tracker.feed("\rsteps: 100%|██████████| 4/4 [00:04<00:00,  1.00s/it, avr_loss=0.3]")
    updates += tracker.close()

    assert [(u.step, u.epoch, u.loss) for u in updates] == [
        (0, 1, None),
        (1, 1, 0.5),
        (2, 1, 0.45),
        (3, 2, 0.41),
        (4, 2, 0.3),
    ]
    assert updates[-1].total == 4 and updates[-1].total_epochs == 2
    assert tracker.epoch_losses() == {1: 0.45, 2: 0.3}
    tail = tracker.log_tail()
    assert tail[-2] == "epoch 2/2"
    assert "INFO saving ***" in tail[-3]  # redacted, and only the last redraw of a line kept
    assert tail[-1].startswith("steps: 100%")
    assert "hunter2" not in "".join(tail)


def test_tracker_prefers_the_launchers_exact_losses() -> None:
    tracker = OutputTracker()
    tracker.feed("\nepoch 1/1\n\rsteps: 100%|█| 1/1 [00:01<00:00, 1.00it/s, avr_loss=0.123]")
    tracker.feed(
        launcher.EVENT_PREFIX + '{"event": "step", "epoch": 1, "step": 1, "loss": 0.1234567}\n'
    )
    tracker.feed(
        launcher.EVENT_PREFIX + '{"event": "epoch", "epoch": 1, "step": 1, "loss": 0.1234567}\n'
    )
    assert tracker.epoch_losses() == {1: 0.1234567}
    assert tracker.step_losses == [0.1234567]
    assert launcher.EVENT_PREFIX == sd_scripts.EVENT_PREFIX


@pytest.mark.parametrize(
    "line",
    [
        "\rsteps:  25%|██▌       | 3/12 [00:04<00:14,  1.60s/it, avr_loss=nan]",
        launcher.EVENT_PREFIX + '{"event": "step", "epoch": 1, "step": 3, "loss": "inf"}\n',
    ],
)
def test_tracker_notices_a_loss_that_is_not_finite(line: str) -> None:
    tracker = OutputTracker()
    tracker.feed(line + "\n")
    assert tracker.diverged and "step 3" in tracker.diverged


def test_checkpoint_names_follow_sd_scripts_last_epoch_rule() -> None:
    assert checkpoint_name("lora", 1, 3) == "lora-000001.safetensors"
    assert checkpoint_name("lora", 3, 3) == "lora.safetensors"


# --------------------------------------------------------------------------------------------
# Runs of the stand-in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "best", "file"),
    [
        ("0.51234,0.30987,0.4", 2, "lora-000002.safetensors"),
        ("0.5,0.4,0.30987", 3, "lora.safetensors"),
    ],
)
async def test_the_best_epochs_checkpoint_is_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, losses: str, best: int, file: str
) -> None:
    inputs = make_inputs(tmp_path, repeats=2)
    result, progress = await run_standin(tmp_path, monkeypatch, inputs, STANDIN_LOSSES=losses)

    assert result.best_epoch == best
    assert result.checkpoint == inputs.output_dir / file
    assert checkpoint_epoch(result.checkpoint) == best
    # The launcher's numbers: sd-scripts' loss/epoch_average at full precision (the bar has 3
    # significant digits: 0.512, 0.31).
    expected = [float(x) for x in losses.split(",")]
    assert result.epoch_losses == pytest.approx(expected, abs=1e-12)
    assert result.loss == pytest.approx(expected[best - 1], abs=1e-12)
    # 3 images x 2 repeats / batch 1 = 6 steps an epoch, 3 epochs.
    steps = [u.step for u in progress.updates]
    assert steps == sorted(steps) and steps[-1] == 18
    assert {u.total for u in progress.updates} == {18}
    assert progress.updates[-1].epoch == 3 and progress.updates[-1].total_epochs == 3


async def test_without_the_launcher_hooks_the_bar_gives_the_epoch_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = make_inputs(tmp_path, repeats=2)
    result, _ = await run_standin(
        tmp_path, monkeypatch, inputs, STANDIN_PLAIN="1", STANDIN_LOSSES="0.51234,0.30987,0.4"
    )
    # The bar shows 3 significant digits of the same averages.
    assert result.epoch_losses == [0.512, 0.31, 0.4]
    assert result.best_epoch == 2
    assert result.checkpoint.name == "lora-000002.safetensors"


async def test_sdxl_runs_its_own_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(tmp_path, "sdxl", epochs=2, resolution=64)
    result, _ = await run_standin(tmp_path, monkeypatch, inputs, STANDIN_LOSSES="0.2,0.3")
    assert (result.best_epoch, result.checkpoint.name) == (1, "lora-000001.safetensors")


async def test_no_data_found_with_exit_0_is_no_training_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TrainerError) as raised:
        await run_standin(tmp_path, monkeypatch, make_inputs(tmp_path), STANDIN_MODE="nodata")
    assert raised.value.code == "no_training_data"
    assert any("No data found" in line for line in raised.value.log_tail)


async def test_a_nan_loss_stops_the_whole_process_group_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = make_inputs(tmp_path, repeats=10, epochs=10)  # 300 steps of 0.2 s if not stopped
    pids_file = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(TrainerError) as raised:
        await run_standin(
            tmp_path, monkeypatch, inputs, STANDIN_MODE="nan", STANDIN_PIDS_FILE=str(pids_file)
        )
    assert raised.value.code == "loss_diverged"
    assert "nan" in raised.value.message
    assert time.monotonic() - started < 20
    assert not any(running(int(pid)) for pid in pids_file.read_text().split())
    assert not (inputs.output_dir / "lora.safetensors").exists()


async def test_a_crash_is_trainer_crashed_with_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = make_inputs(tmp_path, secrets=["s3cr3t-value"], dataset_name="data-s3cr3t-value")
    with pytest.raises(TrainerError) as raised:
        await run_standin(tmp_path, monkeypatch, inputs, STANDIN_MODE="crash")
    error = raised.value
    assert error.code == "trainer_crashed"
    assert "RuntimeError: CUDA out of memory" in error.message
    assert any(line.startswith("Traceback") for line in error.log_tail)
    assert any("RuntimeError: CUDA out of memory" in line for line in error.log_tail)
    assert len(error.log_tail) <= 50
    assert any("data-***" in line for line in error.log_tail)  # "found directory <path>"
    assert "s3cr3t-value" not in "\n".join(error.log_tail)


@pytest.mark.parametrize(
    "cause",
    [
        "PIL.UnidentifiedImageError: cannot identify image file '/data/img0.png'",
        "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge",
    ],
)
async def test_a_crash_names_the_trainers_cause_not_the_launchers_wrapper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """The stand-in accelerate, like the real one, ends a crash with its CalledProcessError."""
    inputs = make_inputs(tmp_path)
    with pytest.raises(TrainerError) as raised:
        await run_standin(tmp_path, monkeypatch, inputs, STANDIN_MODE="crash", STANDIN_CRASH=cause)
    error = raised.value
    assert error.message == f"sd-scripts exited with code 1: {cause}"
    assert "CalledProcessError" in error.log_tail[-1]  # the wrapper came last, as it does


@pytest.mark.parametrize("ignore_sigterm", [False, True])
async def test_stop_leaves_no_process_of_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignore_sigterm: bool
) -> None:
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("STANDIN_MODE", "slow")
    monkeypatch.setenv("STANDIN_PIDS_FILE", str(pids_file))
    monkeypatch.setenv("STANDIN_IGNORE_SIGTERM", "1" if ignore_sigterm else "0")
    trainer = SdScriptsTrainer(standin_settings(tmp_path, grace_s=1.0))
    prepared = trainer.prepare(make_inputs(tmp_path, repeats=10, epochs=10))
    progress = Progress()
    training = asyncio.create_task(trainer.train(prepared, progress))
    await asyncio.wait_for(progress.first.wait(), timeout=30)
    pids = [int(pid) for pid in pids_file.read_text().split()]
    assert all(running(pid) for pid in pids)

    await trainer.stop()

    assert not any(running(pid) for pid in pids)  # the trainer and its grandchild
    with pytest.raises(TrainerError) as raised:
        await training
    assert raised.value.code == "trainer_stopped"


# --------------------------------------------------------------------------------------------
# What a run leaves besides the losses: the LoRA's metadata, TensorBoard logs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "plain"), [("sd15", False), ("sdxl", False), ("sd15", True)])
async def test_every_checkpoint_names_the_pinned_commit_and_the_runs_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: BaseModelFamily, plain: bool
) -> None:
    """sd-scripts reads both where the image leaves nothing: its commit from git (the image
    deletes its .git: "(unknown)") and modelspec.resolution from --resolution (without it, the
    model type's default size, whatever the dataset config says). Also when the launcher runs
    the script as it is (plain: no trainer hooks)."""
    inputs = make_inputs(tmp_path, family, epochs=2, resolution=64)
    await run_standin(tmp_path, monkeypatch, inputs, STANDIN_PLAIN="1" if plain else "0")

    checkpoints = sorted(inputs.output_dir.glob("*.safetensors"))
    assert [p.name for p in checkpoints] == ["lora-000001.safetensors", "lora.safetensors"]
    for checkpoint in checkpoints:
        metadata = safetensors_metadata(checkpoint.read_bytes())
        assert metadata["ss_sd_scripts_commit_hash"] == sd_scripts.SD_SCRIPTS_COMMIT
        assert metadata["modelspec.implementation_version"] == (
            f"sd-scripts/{sd_scripts.SD_SCRIPTS_COMMIT}"
        )
        assert metadata["modelspec.resolution"] == "64x64"


def test_a_commit_git_can_tell_is_kept() -> None:
    """An sd-scripts that is a git checkout (dev) names its own commit, not the pinned one."""
    told = launcher.known_commit(lambda: "0123abc", "(unknown)", "pinned")
    untold = launcher.known_commit(lambda: "(unknown)", "(unknown)", "pinned")
    assert (told(), untold()) == ("0123abc", "pinned")


async def test_the_tensorboard_logs_are_where_the_prepared_training_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = make_inputs(tmp_path, epochs=2)
    trainer = SdScriptsTrainer(standin_settings(tmp_path))
    prepared = trainer.prepare(inputs)
    assert prepared.tensorboard_dir is not None

    result = await trainer.train(prepared, Progress())

    (events,) = prepared.tensorboard_dir.glob("*/network_train/events.out.tfevents.*")
    averages = [
        (step, value)
        for tag, step, value in tensorboard_scalars(events.read_bytes())
        if tag == "loss/epoch_average"
    ]
    assert [step for step, _ in averages] == [1, 2]
    assert [value for _, value in averages] == pytest.approx(result.epoch_losses, rel=1e-6)


def test_launcher_falls_back_to_the_script_without_trainer_hooks(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text("import sys\nprint('ran', sys.argv[1:])\n")
    completed = subprocess.run(
        [sys.executable, str(sd_scripts.LAUNCHER_PATH), str(script), "--config_file", "x.toml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ran ['--config_file', 'x.toml']" in completed.stdout
    assert "running plain.py as it is" in completed.stderr


# --------------------------------------------------------------------------------------------
# accelerate: every choice about the machine on the command line, made at run time
# --------------------------------------------------------------------------------------------

# A default accelerate config wrong in every way for a run on one GPU: what `accelerate config
# default` writes where it sees no GPU (an image build), with two processes besides.
MACHINE_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
mixed_precision: fp16
num_processes: 2
use_cpu: true
debug: false
"""
REAL_ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


@pytest.mark.parametrize(
    ("cuda", "requested", "expected"), [(True, "bf16", "bf16"), (False, "fp16", "no")]
)
def test_the_command_gives_accelerate_every_machine_choice(
    tmp_path: Path, cuda: bool, requested: str, expected: str
) -> None:
    trainer = SdScriptsTrainer(standin_settings(tmp_path))
    inputs = replace(make_inputs(tmp_path, mixed_precision=requested), cuda=cuda)
    prepared = trainer.prepare(inputs)

    command = trainer.command(prepared)

    launch = command[command.index("launch") + 1 : command.index(str(sd_scripts.LAUNCHER_PATH))]
    assert ("--cpu" in launch) == (not cuda)
    valued = [arg for arg in launch if arg != "--cpu"]
    assert dict(zip(valued[::2], valued[1::2], strict=True)) == {
        "--config_file": prepared.paths["accelerate_config"],
        "--num_processes": "1",
        "--num_machines": "1",
        "--mixed_precision": expected,
        "--dynamo_backend": "no",
        "--num_cpu_threads_per_process": "1",
    }
    # The run's own accelerate config, written now, says the same.
    written = json.loads(Path(prepared.paths["accelerate_config"]).read_text())
    assert AccelerateConfig.model_validate(written) == AccelerateConfig(
        use_cpu=not cuda, mixed_precision=expected
    )


@pytest.mark.parametrize(
    ("cuda", "requested", "use_cpu", "precision"),
    [(True, "bf16", "False", "bf16"), (False, "fp16", "True", "no")],
)
async def test_real_accelerate_launch_ignores_the_machines_accelerate_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cuda: bool,
    requested: str,
    use_cpu: str,
    precision: str,
) -> None:
    """The runner's command under the real `accelerate launch`, on a machine whose default
    accelerate config says CPU, fp16 and two processes: the training script gets what the runner
    decided (it only reads the environment accelerate set up; no CUDA needed)."""
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(MACHINE_ACCELERATE_CONFIG)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("ACCELERATE_DEBUG_MODE", "true")  # the machine's setting, not the runner's
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    launch_env = tmp_path / "launch_env.json"
    monkeypatch.setenv("STANDIN_LAUNCH_ENV_FILE", str(launch_env))
    settings = standin_settings(tmp_path).model_copy(
        update={"runner_accelerate_command": REAL_ACCELERATE}
    )
    trainer = SdScriptsTrainer(settings)
    inputs = replace(make_inputs(tmp_path, epochs=1, mixed_precision=requested), cuda=cuda)

    result = await trainer.train(trainer.prepare(inputs), Progress())

    assert result.best_epoch == 1
    seen = json.loads(launch_env.read_text())
    assert seen["ACCELERATE_USE_CPU"] == use_cpu
    assert seen["ACCELERATE_MIXED_PRECISION"] == precision
    assert seen["ACCELERATE_DYNAMO_BACKEND"] == "NO"
    # One process: accelerate's simple launcher sets MASTER_* only for more than one.
    assert seen.get("WORLD_SIZE", "1") == "1"
    assert "MASTER_PORT" not in seen
    assert "ACCELERATE_DEBUG_MODE" not in seen


async def test_the_log_shows_the_command_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = ["civitai-key-0123456789abcdef", "whsec_c2VjcmV0IG9mIHRoZSBydW4="]
    trainer = SdScriptsTrainer(standin_settings(tmp_path))
    inputs = make_inputs(tmp_path, epochs=1, secrets=secrets)
    prepared = trainer.prepare(replace(inputs, cuda=False))  # as the runner's CPU-only tests run
    caplog.set_level(logging.INFO, logger="gpu_runner.trainer")

    await trainer.train(prepared, Progress())

    logged = [r.getMessage() for r in caplog.records if r.name == "gpu_runner.trainer"]
    command = trainer.command(prepared)
    assert logged[0] == f"running {shlex.join(command)}"
    assert "--cpu" in command and "--mixed_precision" in command
    assert not [line for line in logged if any(secret in line for secret in secrets)]


# --------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------


def test_the_image_leaves_accelerate_unconfigured() -> None:
    """Nothing about the machine is decided at build time, where no GPU is visible: `accelerate
    config default` there writes use_cpu: true, and every run would train on the CPU."""
    dockerfile = (REPO / "gpu_runner" / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if re.search(r"accelerate\s+config", line)]
    assert not [line for line in instructions if "default_config" in line]


def test_dockerfile_pins_what_the_runner_expects() -> None:
    dockerfile = (REPO / "gpu_runner" / "Dockerfile").read_text()
    defaults = RunnerSettings.model_fields

    def arg(name: str) -> str:
        m = re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.MULTILINE)
        assert m, f"Dockerfile has no ARG {name}"
        return m.group(1)

    assert arg("SD_SCRIPTS_COMMIT") == sd_scripts.SD_SCRIPTS_COMMIT
    assert re.fullmatch(r"[0-9a-f]{40}", sd_scripts.SD_SCRIPTS_COMMIT)
    assert Path(arg("SD_SCRIPTS_DIR")) == defaults["runner_sd_scripts_dir"].default
    assert Path(arg("TOKENIZER_DIR")) == defaults["runner_tokenizer_cache_dir"].default
    for model_id in sd_scripts.TOKENIZER_IDS:
        assert model_id in dockerfile
    assert '"-m", "gpu_runner"]' in dockerfile
    assert math.isfinite(defaults["runner_trainer_stop_grace_s"].default)
