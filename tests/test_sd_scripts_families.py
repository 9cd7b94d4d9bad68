"""Every family's command line, read by the real sd-scripts parser of its script.

SdScriptsTrainer.prepare + command build what the runner runs; the vendored sd-scripts
(`../shared/vendor/sd-scripts`) parses it in its own environment (tests/sd_scripts_env.py) as
the script's __main__ does: argparse, then `--config_file` through read_config_from_file, and
the dataset TOML through config_util's schema. sd-scripts accepts unknown keys in the config
file silently, so every key written must be one of the parser's dests.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.protocol import (
    BaseModelFamily,
    ComponentRole,
    ModelComponent,
    SampleSettings,
    TrainingConfig,
)
from gpu_runner.runner import Runner
from gpu_runner.settings import RunnerSettings
from gpu_runner.trainers import sd_scripts
from gpu_runner.trainers.base import (
    PreparedTraining,
    ResumePoint,
    TrainerError,
    TrainingInputs,
)
from gpu_runner.trainers.sd_scripts import SdScriptsTrainer, disk_needed_gb, vram_needed_gb
from tests.http_support import serve_asgi
from tests.runner.fake_trainer import FakeTrainer
from tests.runner.relay_recorder import RecordingRelay
from tests.runner.support import MASTER_SECRET, FileServer, Job, make_job, pseudo_random
from tests.sd_scripts_env import SD_SCRIPTS_DIR, parse_sd_scripts_args, sd_scripts_python

__all__ = ["sd_scripts_python"]  # the session fixture, used by name

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@dataclass(frozen=True)
class Case:
    """One run: a family, its model's facts, the GPU, and the user's settings."""

    name: str
    family: BaseModelFamily
    variant: str | None = None
    vram_gb: int | None = 80
    components: tuple[ComponentRole, ...] = ()
    v_parameterization: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    # Expected: (fp8_base, blocks_to_swap) and whether text encoders train.
    fp8: bool = False
    swap: int = 0
    # Every epoch saved with samples, resumed from an earlier host's state.
    epochs: bool = False


FLUX_FILES: tuple[ComponentRole, ...] = ("clip_l", "t5xxl", "ae")
CASES = [
    Case("sd15", "sd15"),
    Case("sd15-rank64-fp8", "sd15", config={"network_dim": 64, "fp8_base": True}, fp8=True),
    Case("sd15-unet-only", "sd15", config={"text_encoder_lr": 0.0}),
    Case("sd2-768-v", "sd2", v_parameterization=True),
    Case("sd2-512", "sd2", config={"resolution": 512}),
    Case("sdxl", "sdxl"),
    Case("sdxl-text-encoders", "sdxl", config={"text_encoder_lr": 5e-5}),
    Case("sdxl-fp8", "sdxl", vram_gb=12, config={"fp8_base": True}, fp8=True),
    Case("flux-dev-80gb", "flux", "dev", 80, FLUX_FILES),
    Case("flux-dev-24gb", "flux", "dev", 24, FLUX_FILES, fp8=True),
    Case("flux-dev-16gb", "flux", "dev", 16, FLUX_FILES, fp8=True, swap=8),
    Case("flux-dev-12gb", "flux", "dev", 12, FLUX_FILES, fp8=True, swap=16),
    Case(
        "flux-schnell-rank32-clip-l",
        "flux",
        "schnell",
        48,
        FLUX_FILES,
        config={"network_dim": 32, "network_alpha": 1, "text_encoder_lr": 5e-5},
    ),
    Case(
        "flux-dev-bf16-swap",
        "flux",
        "dev",
        24,
        FLUX_FILES,
        config={"fp8_base": False, "blocks_to_swap": 20, "timestep_sampling": "flux_shift"},
        swap=20,
    ),
    Case("sd35-large-files", "sd3", "large", 80, ("clip_l", "clip_g", "t5xxl")),
    Case("sd35-large-16gb", "sd3", "large", 16, ("clip_l", "clip_g", "t5xxl"), fp8=True, swap=16),
    Case("sd35-medium-single-file", "sd3", "medium", 24),
    Case("sd15-epochs-resumed", "sd15", epochs=True),
    Case("sdxl-epochs-resumed", "sdxl", epochs=True),
    Case("flux-dev-epochs-resumed", "flux", "dev", 80, FLUX_FILES, epochs=True),
    Case(
        "sd35-large-epochs-resumed", "sd3", "large", 80, ("clip_l", "clip_g", "t5xxl"), epochs=True
    ),
    Case(
        "sd35-medium-text-encoders",
        "sd3",
        "medium",
        12,
        ("t5xxl",),
        config={"text_encoder_lr": 1e-5, "weighting_scheme": "logit_normal"},
        fp8=True,
        swap=16,
    ),
]

SCRIPTS = {
    "sd15": "train_network",
    "sd2": "train_network",
    "sdxl": "sdxl_train_network",
    "flux": "flux_train_network",
    "sd3": "sd3_train_network",
}
MODULES = {
    "sd15": "networks.lora",
    "sd2": "networks.lora",
    "sdxl": "networks.lora",
    "flux": "networks.lora_flux",
    "sd3": "networks.lora_sd3",
}


def settings_for(tmp_path: Path) -> RunnerSettings:
    return RunnerSettings(
        runner_workdir=tmp_path,
        runner_accelerate_command=["accelerate"],
        runner_sd_scripts_dir=SD_SCRIPTS_DIR,
        runner_tokenizer_cache_dir=tmp_path / "tokenizers",
    )


def inputs_for(case: Case, tmp_path: Path) -> TrainingInputs:
    root = tmp_path / case.name
    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "captioned.png").write_bytes(PNG)
    (dataset / "captioned.txt").write_text("a photo of a red chair in a garden\n")
    (dataset / "uncaptioned.png").write_bytes(PNG)
    files = root / "model"
    files.mkdir()
    model = files / "model.safetensors"
    model.write_bytes(b"not read by the parser")
    components = {role: files / f"{role}.safetensors" for role in case.components}
    config = TrainingConfig(
        epochs=2, repeats=1, trigger_word="ohwx chair", **case.config
    ).for_family(case.family)
    epochs: dict[str, Any] = {}
    if case.epochs:
        state = root / "resume" / "state"
        state.mkdir(parents=True)
        epochs = {
            "on_epoch": lambda saved: None,
            "samples": SampleSettings(seed=5, steps=12, negative_prompt="blurry"),
            "resume": ResumePoint(epoch=1, step=2, state_dir=state, epoch_losses=[0.1]),
        }
    return TrainingInputs(
        run_dir=root / "run",
        dataset_dir=dataset,
        model_path=model,
        family=case.family,
        config=config,
        output_dir=root / "run" / "output",
        components=components,
        variant=case.variant,
        v_parameterization=case.v_parameterization,
        vram_mb=None if case.vram_gb is None else case.vram_gb * 1024,
        **epochs,
    )


def script_argv(command: list[str], script: str) -> list[str]:
    """What the launcher hands the script: everything after the script's path."""
    paths = [i for i, part in enumerate(command) if Path(part).name == f"{script}.py"]
    assert len(paths) == 1, command
    assert Path(command[paths[0]]).parent == SD_SCRIPTS_DIR
    return command[paths[0] + 1 :]


@pytest.fixture(scope="module")
def parsed(
    sd_scripts_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[TrainingInputs, dict[str, Any], dict[str, Any]]]:
    """Per case: the inputs, the training TOML as written, and what sd-scripts read."""
    tmp_path = tmp_path_factory.mktemp("families")
    trainer = SdScriptsTrainer(settings_for(tmp_path))
    prepared = {case.name: trainer.prepare(inputs_for(case, tmp_path)) for case in CASES}
    cases = [
        (
            SCRIPTS[case.family],
            script_argv(trainer.command(prepared[case.name]), SCRIPTS[case.family]),
        )
        for case in CASES
    ]
    results = parse_sd_scripts_args(sd_scripts_python, cases)
    return {
        case.name: (
            prepared[case.name].inputs,
            tomllib.loads(Path(prepared[case.name].paths["training_config"]).read_text()),
            result,
        )
        for case, result in zip(CASES, results, strict=True)
    }


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_real_script_reads_every_setting(
    case: Case, parsed: dict[str, tuple[TrainingInputs, dict[str, Any], dict[str, Any]]]
) -> None:
    inputs, written, result = parsed[case.name]
    args, dests = result["args"], set(result["dests"])
    config = inputs.config
    assert set(written) <= dests, f"unknown to {SCRIPTS[case.family]}: {set(written) - dests}"
    assert args["network_module"] == MODULES[case.family]
    assert args["network_dim"] == config.network_dim
    assert args["network_alpha"] == config.network_alpha
    assert args["mixed_precision"] == config.mixed_precision
    assert args["pretrained_model_name_or_path"] == str(inputs.model_path)
    assert args["dataset_config"] == str(inputs.run_dir / "sd-scripts" / "dataset.toml")
    assert args["config_file"] == str(inputs.run_dir / "sd-scripts" / "training")
    assert bool(args["fp8_base"]) is case.fp8
    assert (args.get("blocks_to_swap") or 0) == case.swap
    assert args["gradient_checkpointing"] is True
    assert args["sdpa"] is True
    assert args["cache_latents"] is True
    trains_text_encoders = (config.text_encoder_lr or 0) > 0
    assert args["network_train_unet_only"] is not trains_text_encoders
    for role in ("clip_l", "clip_g", "t5xxl", "ae"):
        expected = str(inputs.components[role]) if role in inputs.components else None
        assert args.get(role) == expected, role
    assert args["v2"] is (case.family == "sd2")
    assert args["v_parameterization"] is case.v_parameterization
    if case.family in ("flux", "sd3"):
        assert args["cache_text_encoder_outputs"] is True
        assert args["cache_text_encoder_outputs_to_disk"] is True
        assert args["cache_latents_to_disk"] is True
    else:
        cached = case.family == "sdxl" and not trains_text_encoders
        assert bool(args.get("cache_text_encoder_outputs")) is cached
    if case.family == "flux":
        assert args["timestep_sampling"] == config.timestep_sampling
        assert args["discrete_flow_shift"] == 3.1582
        assert args["model_prediction_type"] == "raw"
        assert args["guidance_scale"] == 1.0
    if case.family == "sd3":
        assert args["weighting_scheme"] == config.weighting_scheme


@pytest.mark.parametrize("case", [c for c in CASES if c.epochs], ids=lambda case: case.name)
def test_epochs_are_saved_with_samples_and_resumed_as_the_script_reads_it(
    case: Case, parsed: dict[str, tuple[TrainingInputs, dict[str, Any], dict[str, Any]]]
) -> None:
    inputs, _, result = parsed[case.name]
    args = result["args"]
    assert inputs.resume is not None
    assert args["resume"] == str(inputs.resume.state_dir)
    assert args["save_state"] is True and args["save_every_n_epochs"] == 1
    assert args["sample_every_n_epochs"] == 1 and args["sample_sampler"] == "euler_a"
    # Two samples from the dataset's captions (trigger word first), as sample_images reads them.
    size = inputs.config.resolution
    guidance = {"flux": ("guidance_scale", 3.5), "sd3": ("scale", 5.0)}
    key, value = guidance.get(case.family, ("scale", 7.0))
    assert [p["prompt"] for p in result["prompts"]] == [
        "ohwx chair, a photo of a red chair in a garden",
        "ohwx chair",
    ]
    for index, prompt in enumerate(result["prompts"]):
        assert (prompt["width"], prompt["height"]) == (size, size)
        assert (prompt["seed"], prompt["sample_steps"]) == (5 + index, 12)
        assert prompt[key] == value
        assert prompt["negative_prompt"] == "blurry"


def test_without_epoch_uploads_no_state_or_sample_is_asked_for(
    parsed: dict[str, tuple[TrainingInputs, dict[str, Any], dict[str, Any]]],
) -> None:
    _, written, result = parsed["sd15"]
    assert not {"save_state", "resume", "sample_prompts"} & set(written)
    assert result["args"]["resume"] is None and result["prompts"] is None


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_dataset_is_valid_for_the_script(
    case: Case, parsed: dict[str, tuple[TrainingInputs, dict[str, Any], dict[str, Any]]]
) -> None:
    inputs, _, result = parsed[case.name]
    [dataset] = result["dataset"]
    assert dataset["params"]["resolution"] == [inputs.config.resolution] * 2
    [subset] = dataset["subsets"]
    assert subset["image_dir"] == str(inputs.dataset_dir)
    assert subset["caption_extension"] == ".txt"
    # Cached text encoder outputs: sd-scripts refuses shuffled or dropped-out captions
    # (DatasetGroup.is_text_encoder_output_cacheable).
    assert subset["shuffle_caption"] is False
    assert subset["caption_dropout_rate"] == 0
    assert subset["caption_tag_dropout_rate"] == 0
    assert subset["token_warmup_step"] == 0
    assert subset["keep_tokens"] == (0 if case.family in ("flux", "sd3") else 1)
    captions = {
        image.name: image.with_suffix(".txt").read_text()
        for image in inputs.dataset_dir.glob("*.png")
    }
    assert captions == {
        "captioned.png": "ohwx chair, a photo of a red chair in a garden",
        "uncaptioned.png": "ohwx chair",
    }


# ---- the memory plan and the GPU search's minimums (no sd-scripts needed) ------------------


def test_flux_needs_12_gb_with_fp8_and_block_swap_and_more_without() -> None:
    config = TrainingConfig().for_family("flux")
    assert vram_needed_gb("flux", "dev", config) == 12
    assert vram_needed_gb("flux", "dev", config.model_copy(update={"optimizer": "AdamW"})) == 16
    assert vram_needed_gb("flux", "dev", config.model_copy(update={"blocks_to_swap": 0})) == 24
    assert vram_needed_gb("flux", "dev", config.model_copy(update={"fp8_base": False})) == 40


def test_sd3_needs_depend_on_the_variant_and_an_unknown_one_counts_as_large() -> None:
    config = TrainingConfig().for_family("sd3")
    assert vram_needed_gb("sd3", "medium", config) == 10
    assert vram_needed_gb("sd3", "large", config) == 12
    assert vram_needed_gb("sd3", None, config) == 12
    with_encoders = config.model_copy(update={"text_encoder_lr": 1e-5})
    assert vram_needed_gb("sd3", "large", with_encoders) == 14


def test_clip_families_keep_their_minimums() -> None:
    assert vram_needed_gb("sd15", None, TrainingConfig().for_family("sd15")) == 8
    assert vram_needed_gb("sd2", None, TrainingConfig().for_family("sd2")) == 10
    assert vram_needed_gb("sdxl", None, TrainingConfig().for_family("sdxl")) == 12
    sdxl_te = TrainingConfig(text_encoder_lr=5e-5).for_family("sdxl")
    assert vram_needed_gb("sdxl", None, sdxl_te) == 16


@pytest.mark.parametrize(
    ("family", "variant"), [("flux", "dev"), ("sd3", "large"), ("sd3", "medium"), ("sdxl", None)]
)
def test_every_gpu_the_search_accepts_gets_a_plan_that_fits_it(
    family: BaseModelFamily, variant: str | None, tmp_path: Path
) -> None:
    config = TrainingConfig().for_family(family)
    needed = vram_needed_gb(family, variant, config)
    inputs = inputs_for(Case("plan", family, variant), tmp_path)
    for vram_gb in range(needed, 100):
        plan = sd_scripts.memory_plan(replace(inputs, vram_mb=vram_gb * 1000))
        assert plan.vram_gb <= vram_gb
    # More memory never means more savings.
    plans = [
        sd_scripts.memory_plan(replace(inputs, vram_mb=gb * 1000)) for gb in range(needed, 100)
    ]
    swaps = [plan.blocks_to_swap for plan in plans]
    assert swaps == sorted(swaps, reverse=True)


def test_without_a_gpu_nothing_runs_in_fp8(tmp_path: Path) -> None:
    inputs = replace(
        inputs_for(Case("cpu", "flux", "dev", components=FLUX_FILES), tmp_path), cuda=False
    )
    plan = sd_scripts.memory_plan(inputs)
    assert (plan.fp8_base, plan.blocks_to_swap) == (False, 0)


def test_too_many_blocks_to_swap_is_refused(tmp_path: Path) -> None:
    inputs = inputs_for(Case("swap", "sd3", "medium", config={"blocks_to_swap": 30}), tmp_path)
    with pytest.raises(TrainerError) as raised:
        SdScriptsTrainer(settings_for(tmp_path)).prepare(inputs)
    assert raised.value.code == "invalid_config"
    assert "at most 22" in raised.value.message


def test_flux_without_its_files_is_refused(tmp_path: Path) -> None:
    inputs = inputs_for(Case("nofiles", "flux", "dev", components=("clip_l",)), tmp_path)
    with pytest.raises(TrainerError) as raised:
        SdScriptsTrainer(settings_for(tmp_path)).prepare(inputs)
    assert raised.value.code == "model_components_missing"
    assert "t5xxl, ae" in raised.value.message


def test_family_options_are_refused_for_other_families() -> None:
    assert TrainingConfig(guidance_scale=2.0).family_problems("sdxl") == [
        "guidance_scale applies to flux models only, not sdxl"
    ]
    assert TrainingConfig(blocks_to_swap=4).family_problems("sd15") == [
        "blocks_to_swap applies to flux and sd3 models only, not sd15"
    ]
    assert TrainingConfig(blocks_to_swap=4, weighting_scheme="mode").family_problems("sd3") == []


def test_disk_counts_the_checkpoint_components_caches_and_every_epochs_lora() -> None:
    flux = TrainingConfig().for_family("flux")
    # 23.8 GB transformer + 10.38 GB of files + 5 GB caches + 10 epochs x rank 16 x 10 MB + 10
    assert disk_needed_gb("flux", flux, 23_800_000_000) == 51
    sd15 = TrainingConfig().for_family("sd15")
    # 2.1 GB + 10 epochs x rank 32 x 1.2 MB + 10
    assert disk_needed_gb("sd15", sd15, 2_100_000_000) == 13


# ---- the runner downloads the family's files and hands them to the trainer -----------------

HF_TOKEN = "hf_token_0123456789abcdef"


class RecordingTrainer(FakeTrainer):
    seen: list[TrainingInputs] = []

    def prepare(self, inputs: TrainingInputs) -> PreparedTraining:
        RecordingTrainer.seen.append(inputs)
        return super().prepare(inputs)


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, str]]:
    recorder = RecordingRelay(MASTER_SECRET)
    with serve_asgi(recorder.app) as base:
        yield recorder, base


async def run_flux_job(
    s3: Any, bucket: str, relay: tuple[RecordingRelay, str], tmp_path: Path, hf_token: str
) -> tuple[int, Job, FileServer, dict[str, bytes]]:
    recorder, relay_base = relay
    contents = {role: pseudo_random(role, 70_000 + i) for i, role in enumerate(FLUX_FILES)}
    files = FileServer()
    for role, content in contents.items():
        # The gated repository (FLUX.1-dev) holds the AE; the text encoders are public.
        files.add(f"{role}.safetensors", content, bearer=HF_TOKEN if role == "ae" else None)
    with serve_asgi(files) as files_base:
        job = make_job(s3, bucket, lambda run_id: recorder.events_url(relay_base, run_id))
        model = job.spec.model.model_copy(
            update={
                "family": "flux",
                "base_model": "Flux.1 D",
                "variant": "dev",
                "components": [
                    ModelComponent(
                        role=role,
                        url=f"{files_base}/files/{role}.safetensors",
                        # Same file name for all: each role gets its own folder.
                        filename="model.safetensors",
                        sha256=hashlib.sha256(content).hexdigest(),
                        bytes=len(content),
                        needs_hf_token=role == "ae",
                    )
                    for role, content in contents.items()
                ],
            }
        )
        spec = job.spec.model_copy(update={"model": model, "hf_token": hf_token})
        settings = RunnerSettings(
            runner_workdir=tmp_path / "work", runner_require_gpu=False, runner_disk_margin_bytes=0
        )
        RecordingTrainer.seen = []
        code = await Runner(spec, settings, trainer=RecordingTrainer(settings)).run()
    return code, job, files, contents


async def test_the_runner_downloads_the_familys_files_with_the_hf_token_where_needed(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    code, _, files, contents = await run_flux_job(s3, settings.bucket, relay, tmp_path, HF_TOKEN)

    assert code == 0
    [inputs] = RecordingTrainer.seen
    assert inputs.family == "flux"
    assert inputs.variant == "dev"
    assert inputs.config.timestep_sampling == "shift"  # filled with Flux.1's defaults
    assert {role: path.read_bytes() for role, path in inputs.components.items()} == contents
    assert files.seen("ae.safetensors")[0].headers["authorization"] == f"Bearer {HF_TOKEN}"
    assert "authorization" not in files.seen("t5xxl.safetensors")[0].headers
    recorder, _ = relay
    assert recorder.types().index("model.ready") > recorder.types().index("images.ready")


async def test_a_refused_hf_token_fails_the_run_saying_what_to_do(
    s3: Any, settings: Any, relay: tuple[RecordingRelay, str], tmp_path: Path
) -> None:
    code, _, _, _ = await run_flux_job(s3, settings.bucket, relay, tmp_path, "hf_wrong_token")

    assert code != 0
    recorder, _ = relay
    [failed] = [e.data for e in recorder.of_type("run.failed")]
    assert (failed["stage"], failed["code"]) == ("model", "hf_forbidden")
    assert "accepted the repository's license" in failed["message"]
    assert RecordingTrainer.seen == []
