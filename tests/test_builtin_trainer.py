"""The builtin trainer (torch + diffusers + peft) on the tiny offline model and the demo images.

One short training run (module fixture) feeds most tests: its LoRA must load with diffusers'
load_lora_weights and change what the pipeline draws, be in sd-scripts' kohya format, and the
kept checkpoint must be the epoch with the lowest loss. The runner process test runs the same
trainer behind the real runner, relay recorder and local S3.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpu_runner.demo_assets import (
    DEMO_IMAGE_COUNT,
    DEMO_TRIGGER_WORD,
    TINY_MODEL_FILENAME,
    build_tiny_model,
    demo_training_config,
    write_demo_dataset,
)
from gpu_runner.protocol import BaseModelFamily, TrainingConfig, TrainingProgressData
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers.base import PreparedTraining, TrainerError, TrainingInputs, TrainingResult
from gpu_runner.trainers.builtin import BuiltinTrainer, SdComponents, _Training, load_components
from gpu_runner.trainers.sd_scripts import SdScriptsTrainer, checkpoint_name
from tests.http_support import serve_asgi
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, make_job, run_runner, runner_env

CUDA = torch.cuda.is_available()
RANK = 4
ALPHA = 2.0


def small_config(**changes: Any) -> TrainingConfig:
    """3 epochs of 6 steps (12 images x 2 repeats / batch 4): seconds on two CPU cores."""
    values: dict[str, Any] = {
        **demo_training_config().model_dump(),
        "epochs": 3,
        "repeats": 2,
        "network_dim": RANK,
        "network_alpha": ALPHA,
        "output_name": "shapes",
        **changes,
    }
    return TrainingConfig.model_validate(values)


def inputs_for(
    root: Path,
    model: Path,
    dataset: Path,
    config: TrainingConfig,
    family: BaseModelFamily = "sd15",
) -> TrainingInputs:
    return TrainingInputs(
        run_dir=root,
        dataset_dir=dataset,
        model_path=model,
        family=family,
        config=config.for_family(family),
        output_dir=root / "output",
        cuda=CUDA,
    )


async def train(
    trainer: BuiltinTrainer, inputs: TrainingInputs
) -> tuple[PreparedTraining, TrainingResult, list[TrainingProgressData]]:
    prepared = await asyncio.to_thread(trainer.prepare, inputs)
    progress: list[TrainingProgressData] = []
    result = await trainer.train(prepared, progress.append)
    return prepared, result, progress


@dataclass(frozen=True)
class Trained:
    prepared: PreparedTraining
    result: TrainingResult
    progress: list[TrainingProgressData]
    output_dir: Path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / TINY_MODEL_FILENAME)


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset") / "shapes"
    write_demo_dataset(folder)
    return folder.parent


@pytest.fixture(scope="module")
def trained(
    tiny_model: Path, demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    root = tmp_path_factory.mktemp("run")
    inputs = inputs_for(root, tiny_model, demo_dataset, small_config())
    prepared, result, progress = asyncio.run(train(BuiltinTrainer(RunnerSettings()), inputs))
    return Trained(prepared, result, progress, inputs.output_dir)


def pipeline(components: SdComponents) -> Any:
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def draw(pipe: Any) -> Any:
    return pipe(
        f"{DEMO_TRIGGER_WORD}, a red circle on a white background",
        num_inference_steps=5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def lora_modules(pipe_part: Any) -> list[str]:
    return [name for name, _ in pipe_part.named_modules() if name.endswith(".lora_A")]


# --------------------------------------------------------------------------------------------
# Demo assets
# --------------------------------------------------------------------------------------------


def test_demo_images_are_captioned_shapes_not_noise(demo_dataset: Path) -> None:
    images = sorted((demo_dataset / "shapes").glob("*.png"))
    assert len(images) == DEMO_IMAGE_COUNT
    for path in images:
        with Image.open(path) as image:
            assert image.size == (64, 64)
            colours = image.convert("RGB").getcolors(maxcolors=64)
        # A flat background and one flat shape (plus a few anti-aliased edge pixels at most).
        assert colours is not None and len(colours) <= 8
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        # (training puts the trigger word first, as sd-scripts' trainer does)
        shape = r"a \w+ (circle|square|triangle) on a (white|black) background"
        assert re.fullmatch(rf"({DEMO_TRIGGER_WORD}, )?{shape}", caption)


def test_the_tiny_model_is_built_once(tiny_model: Path) -> None:
    before = tiny_model.stat().st_mtime_ns
    assert build_tiny_model(tiny_model) == tiny_model
    assert tiny_model.stat().st_mtime_ns == before
    components = load_components(tiny_model)
    assert components.unet.config.cross_attention_dim == 32
    assert components.tokenizer.tokenize(f"{DEMO_TRIGGER_WORD}, a red circle")[0] == (
        f"{DEMO_TRIGGER_WORD}</w>"
    )


def test_importing_the_trainer_and_demo_assets_loads_no_torch() -> None:
    """The orchestrator and the runner import these; torch and friends load only to train."""
    code = (
        "import sys, gpu_runner.runner, gpu_runner.trainers.builtin, gpu_runner.demo_assets\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_demo_assets_command_writes_the_images(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpu_runner.demo_assets", "--images", str(tmp_path / "images")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == DEMO_IMAGE_COUNT
    assert len(list((tmp_path / "images").glob("*.txt"))) == DEMO_IMAGE_COUNT


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_progress_reaches_every_step_with_loss_rate_and_eta(trained: Trained) -> None:
    total = trained.prepared.total_steps
    assert total == 3 * 6
    assert [p.step for p in trained.progress] == list(range(1, total + 1))
    assert all(p.total == total and p.total_epochs == 3 for p in trained.progress)
    assert [p.epoch for p in trained.progress] == [1] * 6 + [2] * 6 + [3] * 6
    for p in trained.progress:
        assert p.loss is not None and math.isfinite(p.loss)
        assert p.it_per_s is not None and p.it_per_s > 0
        assert p.eta_s is not None and p.eta_s >= 0
    assert trained.progress[-1].eta_s == 0


def test_the_kept_checkpoint_is_the_epoch_with_the_lowest_loss(trained: Trained) -> None:
    result = trained.result
    # The epoch losses are what the progress events showed at each epoch's last step.
    last_of_epoch = {p.epoch: p.loss for p in trained.progress}
    assert result.epoch_losses == [last_of_epoch[e] for e in (1, 2, 3)]
    lowest = min(result.epoch_losses)
    assert result.best_epoch == result.epoch_losses.index(lowest) + 1
    assert result.loss == lowest
    assert result.checkpoint == trained.output_dir / checkpoint_name("shapes", result.best_epoch, 3)
    with safe_open(str(result.checkpoint), framework="pt") as f:
        assert f.metadata()["ss_epoch"] == str(result.best_epoch)
    # One checkpoint per epoch, named as sd-scripts names them.
    assert sorted(p.name for p in trained.output_dir.iterdir()) == [
        "shapes-000001.safetensors",
        "shapes-000002.safetensors",
        "shapes.safetensors",
    ]


def test_the_lora_loads_in_diffusers_and_changes_the_image(
    trained: Trained, tiny_model: Path
) -> None:
    pipe = pipeline(load_components(tiny_model))
    without = draw(pipe)
    pipe.load_lora_weights(str(trained.result.checkpoint))
    # diffusers read kohya's names for both parts: every trained module got its adapter.
    assert len(lora_modules(pipe.unet)) == 48
    assert len(lora_modules(pipe.text_encoder)) == 12
    with_lora = draw(pipe)
    assert abs(with_lora - without).mean() > 1e-3
    pipe.unload_lora_weights()
    assert abs(draw(pipe) - without).max() == 0


def test_keys_and_metadata_are_sd_scripts_kohya_format(trained: Trained) -> None:
    path = trained.result.checkpoint
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    modules = {key.split(".", 1)[0] for key in tensors}
    assert all(re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+", m) for m in modules)
    for module in modules:
        assert {k for k in tensors if k.split(".", 1)[0] == module} == {
            f"{module}.lora_down.weight",
            f"{module}.lora_up.weight",
            f"{module}.alpha",
        }
        assert tensors[f"{module}.alpha"].item() == ALPHA
        assert tensors[f"{module}.lora_down.weight"].shape[0] == RANK
        assert tensors[f"{module}.lora_up.weight"].shape[1] == RANK
    # Names as sd-scripts' networks.lora gives them for an SD 1.x UNet and CLIP text encoder.
    for known in (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert known in modules
    assert len(modules) == 48 + 12
    # A 1x1 conv keeps its kernel dims, as in sd-scripts' files.
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4
    assert all(t.dtype == torch.float32 for t in tensors.values())  # fp32 on the CPU

    # The metadata sd-scripts writes, as strings; what its minimal metadata and our stand-in
    # (tests/sd_scripts_standin) carry among it.
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == str(RANK)
    assert metadata["ss_network_alpha"] == str(ALPHA)
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_v2"] == "False"
    assert metadata["ss_output_name"] == "shapes"
    assert metadata["ss_epoch"] == str(trained.result.best_epoch)
    assert metadata["ss_steps"] == str(6 * trained.result.best_epoch)
    assert metadata["ss_num_epochs"] == "3"
    assert metadata["ss_num_train_images"] == str(DEMO_IMAGE_COUNT * 2)
    assert metadata["ss_mixed_precision"] == ("fp16" if CUDA else "no")
    assert metadata["ss_sd_model_name"] == TINY_MODEL_FILENAME
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "shapes": {"n_repeats": 2, "img_count": DEMO_IMAGE_COUNT}
    }
    tags = json.loads(metadata["ss_tag_frequency"])["shapes"]
    assert tags[DEMO_TRIGGER_WORD] == DEMO_IMAGE_COUNT  # the trigger word starts every caption
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["sshs_model_hash"])
    assert re.fullmatch(r"[0-9a-f]{8}", metadata["sshs_legacy_hash"])


def test_on_the_cpu_it_trains_in_fp32_and_says_so(
    tiny_model: Path, demo_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = inputs_for(tmp_path, tiny_model, demo_dataset, small_config(mixed_precision="bf16"))
    with caplog.at_level(logging.INFO, logger="gpu_runner.trainer"):
        prepared = BuiltinTrainer(RunnerSettings()).prepare(inputs)
    if CUDA:
        assert (prepared.device, prepared.mixed_precision) == ("cuda", "bf16")
    else:
        assert (prepared.device, prepared.mixed_precision) == ("cpu", "no")
        assert "training on the CPU in fp32 (mixed_precision bf16 needs a GPU)" in caplog.text


def test_sd_scripts_without_a_gpu_is_never_asked_for_fp16(
    demo_dataset: Path, tmp_path: Path
) -> None:
    """fp16 on the CPU fails inside sd-scripts ("expected m1 and m2 to have the same dtype")."""
    trainer = SdScriptsTrainer(RunnerSettings(runner_tokenizer_cache_dir=tmp_path / "tok"))
    model = tmp_path / "base.safetensors"
    for cuda, expected in ((False, ("no", "float", "cpu")), (True, ("fp16", "fp16", "cuda"))):
        inputs = inputs_for(tmp_path / str(cuda), model, demo_dataset, small_config())
        inputs = TrainingInputs(**{**inputs.__dict__, "cuda": cuda})
        assert inputs.config.mixed_precision == "fp16"  # what SD 1.5 asks for by default
        prepared = trainer.prepare(inputs)
        arguments = tomllib.loads(Path(prepared.paths["training_config"]).read_text())
        assert (
            arguments["mixed_precision"],
            arguments["save_precision"],
            prepared.device,
        ) == expected
        assert prepared.mixed_precision == expected[0]


def test_a_loss_that_is_not_finite_stops_training(
    tiny_model: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    tensors = load_file(str(tiny_model))
    with safe_open(str(tiny_model), framework="pt") as f:
        metadata = f.metadata()
    tensors["unet.conv_out.bias"] = torch.full_like(tensors["unet.conv_out.bias"], math.nan)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata)
    inputs = inputs_for(tmp_path, broken, demo_dataset, small_config())

    with pytest.raises(TrainerError) as failure:
        asyncio.run(train(BuiltinTrainer(RunnerSettings()), inputs))
    assert failure.value.code == "loss_diverged"
    assert "the loss became nan at step 1" in failure.value.message
    assert not list(inputs.output_dir.glob("*.safetensors"))


def test_stop_ends_training_at_the_next_step(
    tiny_model: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = inputs_for(tmp_path, tiny_model, demo_dataset, small_config(epochs=50))
    trainer = BuiltinTrainer(RunnerSettings())
    seen: list[int] = []
    report = _Training._report

    def report_then_hold(self: _Training, step: int, *args: Any) -> None:
        """The training thread waits after reporting step 2 until stop() is called, so the
        stop lands between steps 2 and 3 however slowly the event loop gets to it."""
        report(self, step, *args)
        if step == 2:
            assert self.stop.wait(timeout=60), "stop() was not called after step 2"

    monkeypatch.setattr(_Training, "_report", report_then_hold)

    async def scenario() -> None:
        prepared = await asyncio.to_thread(trainer.prepare, inputs)

        async def on_progress(progress: TrainingProgressData) -> None:
            seen.append(progress.step)
            if progress.step == 2:
                await trainer.stop()

        await trainer.train(prepared, on_progress)

    with pytest.raises(TrainerError) as failure:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert failure.value.code == "trainer_stopped"
    assert seen == [1, 2]  # not one step more of the 50 epochs planned


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("garbage", "invalid_model", "base.safetensors is not a readable .safetensors file"),
        ("original_layout", "unsupported_model", "in the original Stable Diffusion layout"),
        ("ckpt", "unsupported_model", "loads .safetensors files and diffusers folders"),
        ("folder", "invalid_model", "is not a diffusers Stable Diffusion folder"),
        ("sdxl", "unsupported_model", "trains SD 1.x and SD 2.x models, not sdxl"),
        ("flux", "unsupported_model", "not flux: start the run with `--trainer sd-scripts`"),
        ("sd3", "unsupported_model", "not sd3: start the run with `--trainer sd-scripts`"),
        ("other", "unsupported_model", "not other: start the run with `--trainer sd-scripts`"),
        ("prodigy", "invalid_config", "has no Prodigy optimizer"),
        ("no_images", "no_training_data", "no images in the dataset"),
    ],
)
def test_what_it_cannot_train_is_refused_before_training(
    tiny_model: Path,
    demo_dataset: Path,
    tmp_path: Path,
    case: str,
    code: str,
    message: str,
) -> None:
    model, dataset = tiny_model, demo_dataset
    config = small_config()
    family: BaseModelFamily = "sd15"
    if case == "garbage":
        model = tmp_path / "base.safetensors"
        model.write_bytes(b"\x00" * 1000)
    elif case == "original_layout":
        model = tmp_path / "base.safetensors"
        save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(model))
    elif case == "ckpt":
        model = tmp_path / "base.ckpt"
        model.write_bytes(b"pickle")
    elif case == "folder":
        model = tmp_path / "folder"
        (model / "unet").mkdir(parents=True)
    elif case in ("sdxl", "flux", "sd3", "other"):
        family = cast(BaseModelFamily, case)
    elif case == "prodigy":
        config = small_config(optimizer="Prodigy")
    elif case == "no_images":
        dataset = tmp_path / "empty"
        dataset.mkdir()
    inputs = inputs_for(tmp_path, model, dataset, config, family)

    with pytest.raises(TrainerError) as failure:
        BuiltinTrainer(RunnerSettings()).prepare(inputs)
    assert (failure.value.code, failure.value.stage) == (code, "files")
    assert message in failure.value.message


# --------------------------------------------------------------------------------------------
# Behind the real runner
# --------------------------------------------------------------------------------------------


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_the_runner_trains_with_it_and_uploads_the_best_epoch(
    tiny_model: Path,
    demo_dataset: Path,
    relay: tuple[RecordingRelay, str],
    s3: Any,
    settings: Any,
    tmp_path: Path,
) -> None:
    recorder, base = relay
    job = make_job(
        s3,
        settings.bucket,
        lambda run_id: recorder.events_url(base, run_id),
        images_zip=zipped(demo_dataset),
        model_content=tiny_model.read_bytes(),
        trainer="builtin",
        training=small_config(epochs=2),
    )
    env = runner_env(job.job_url, tmp_path / "work", trainer_factory="")

    done = run_runner(env, tmp_path / "runner.log", timeout_s=180)

    assert done.code == 0, done.log
    files_ready = recorder.of_type("files.ready")[0].data
    assert files_ready["total_steps"] == 12
    if not CUDA:
        assert (files_ready["device"], files_ready["mixed_precision"]) == ("cpu", "no")
    progress = recorder.of_type("training.progress")
    assert progress[-1].data["step"] == progress[-1].data["total"] == 12
    completed = recorder.of_type("training.completed")[0].data
    losses = completed["epoch_losses"]
    assert len(losses) == 2 and completed["best_epoch"] == losses.index(min(losses)) + 1
    uploaded = recorder.of_type("model.uploaded")[0].data
    assert uploaded["epoch"] == completed["best_epoch"]
    assert uploaded["loss"] == min(losses)
    stored = s3.get_object(Bucket=job.bucket, Key=job.upload_key)["Body"].read()
    header = json.loads(stored[8 : 8 + int.from_bytes(stored[:8], "little")])
    assert header["__metadata__"]["ss_epoch"] == str(completed["best_epoch"])
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in header
