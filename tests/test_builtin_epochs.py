"""The builtin trainer's epochs: each one's state and samples, and a resume from a saved state
that continues exactly where the interrupted run would have gone (bit for bit on one device)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from gpu_runner.demo_assets import TINY_MODEL_FILENAME, build_tiny_model, write_demo_dataset
from gpu_runner.protocol import SampleSettings
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import ResumePoint, SavedEpoch, TrainerError, TrainingInputs
from gpu_runner.trainers.builtin import BuiltinTrainer
from gpu_runner.trainers.sd_scripts import checkpoint_name

from .test_builtin_trainer import inputs_for, small_config, train

EPOCHS = 4
SAMPLES = SampleSettings(steps=2, count=2, every_n_epochs=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / TINY_MODEL_FILENAME)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset") / "shapes"
    write_demo_dataset(folder)
    return folder.parent


def epoch_inputs(root: Path, model: Path, dataset: Path, saved: list[SavedEpoch]) -> TrainingInputs:
    # Each run writes captions into its own copy (prepare puts the trigger word first).
    copy = root / "dataset"
    shutil.copytree(dataset, copy)
    inputs = inputs_for(root, model, copy, small_config(epochs=EPOCHS, seed=7))
    return dataclasses.replace(inputs, samples=SAMPLES, on_epoch=saved.append)


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingInputs, list[SavedEpoch], list[float]]:
    saved: list[SavedEpoch] = []
    inputs = epoch_inputs(tmp_path_factory.mktemp("whole"), tiny_model, dataset, saved)
    _, result, _ = asyncio.run(train(BuiltinTrainer(RunnerSettings()), inputs))
    return inputs, saved, result.epoch_losses


def test_every_epoch_is_reported_with_its_state_and_samples_when_due(
    uninterrupted: tuple[TrainingInputs, list[SavedEpoch], list[float]],
) -> None:
    _, saved, losses = uninterrupted
    assert [s.epoch for s in saved] == [1, 2, 3, 4]
    assert [s.loss for s in saved] == losses
    assert all(s.total_epochs == EPOCHS and s.lora.is_file() for s in saved)
    # Every epoch but the last keeps a state to resume from.
    assert [s.state_dir is not None and s.state_dir.is_dir() for s in saved] == [
        True,
        True,
        True,
        False,
    ]
    # Samples every 2nd epoch (and the last): two prompts from the captions.
    assert [len(s.samples) for s in saved] == [0, 2, 0, 2]
    for path in saved[1].samples:
        with Image.open(path) as image:
            assert image.size == (64, 64)


async def test_a_run_resumed_from_a_saved_epoch_ends_with_the_same_lora(
    uninterrupted: tuple[TrainingInputs, list[SavedEpoch], list[float]],
    tiny_model: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    whole_inputs, whole_saved, whole_losses = uninterrupted
    state = whole_saved[1].state_dir  # the end of epoch 2, as an earlier host saved it
    assert state is not None
    moved = tmp_path / "downloaded-state"
    shutil.copytree(state, moved)
    saved: list[SavedEpoch] = []
    inputs = epoch_inputs(tmp_path / "resumed", tiny_model, dataset, saved)
    inputs = dataclasses.replace(
        inputs,
        resume=ResumePoint(
            epoch=2, step=whole_saved[1].step, state_dir=moved, epoch_losses=whole_losses[:2]
        ),
    )
    _, result, progress = await train(BuiltinTrainer(RunnerSettings()), inputs)

    assert [s.epoch for s in saved] == [3, 4]
    assert progress[0].epoch == 3 and progress[0].step == whole_saved[1].step + 1
    assert result.epoch_losses == whole_losses
    name = whole_inputs.config.output_name
    last = checkpoint_name(name, EPOCHS, EPOCHS)
    whole = load_file(whole_inputs.output_dir / last)
    resumed = load_file(inputs.output_dir / last)
    assert whole.keys() == resumed.keys()
    # Bit for bit: the same adapters, optimizer moments, schedule, RNG and data order.
    assert all((whole[k] == resumed[k]).all() for k in whole)


async def test_a_state_of_another_network_is_refused(
    uninterrupted: tuple[TrainingInputs, list[SavedEpoch], list[float]],
    tiny_model: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    _, whole_saved, losses = uninterrupted
    state = whole_saved[0].state_dir
    assert state is not None
    saved: list[SavedEpoch] = []
    inputs = epoch_inputs(tmp_path, tiny_model, dataset, saved)
    inputs = dataclasses.replace(
        inputs,
        config=inputs.config.model_copy(update={"network_dim": 8, "network_alpha": 8}),
        resume=ResumePoint(
            epoch=1, step=whole_saved[0].step, state_dir=state, epoch_losses=losses[:1]
        ),
    )
    with pytest.raises(TrainerError) as refused:
        await train(BuiltinTrainer(RunnerSettings()), inputs)
    assert refused.value.code == "resume_state_invalid"
    assert "does not fit this run" in refused.value.message
