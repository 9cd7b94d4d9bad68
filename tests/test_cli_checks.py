"""`loratrain train` refuses here, before uploading or starting anything, what the worker would
refuse only later: settings the model family's defaults make invalid, a model that is not a
model, an s3:// dataset or model that is not there, and a trainer the GPU provider cannot run."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from common.converter import new_codec_key
from common.settings import DEV_ENV_NAME, Settings

from .conftest import free_port
from .fake_civitai import checkpoint_bytes
from .images import PNG
from .test_cli import cli_env, dev_address, image_folder, loratrain
from .test_cli_runs import errors, quiet_worker, started_request, workdir
from .workflow_support import RecordingProvider, local_model

__all__ = ["quiet_worker", "workdir"]  # fixtures, shared with test_cli_runs

STANDIN = Path(__file__).parent / "sd_scripts_standin"


def dead_temporal() -> dict[str, str]:
    """Nothing answers there: a run that got past the checks would say so in one line."""
    return {"LORA_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}", "LORA_CODEC_KEY": new_codec_key()}


def nothing_uploaded(workdir: Path, result: Any) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "cannot reach Temporal" not in result.stderr
    assert "uploading" not in result.stdout


def test_settings_that_the_family_defaults_make_invalid_are_refused_here(workdir: Path) -> None:
    """network_dim=4 alone passes the config's own checks; with SD 1.5's default network_alpha
    of 16 the worker's job would be invalid, so it is refused now, naming network_alpha."""
    images = image_folder(workdir / "images")
    model = local_model(workdir)

    result = loratrain(
        ["train", str(images), "--model", str(model), "--set", "network_dim=4"],
        workdir,
        dead_temporal(),
    )

    nothing_uploaded(workdir, result)
    assert errors(result.stderr) == [
        "training: network_alpha (16.0) must not exceed network_dim (4); network_alpha=16 is "
        "the sd15 default: set it as well"
    ]
    # For a Civitai model (family unknown until Civitai answers) too, and a valid pair passes.
    civitai = loratrain(
        ["train", str(images), "--model", "civitai:1", "--set", "network_dim=4"],
        workdir,
        dead_temporal(),
    )
    nothing_uploaded(workdir, civitai)
    assert "network_alpha (16.0) must not exceed network_dim (4)" in civitai.stderr
    valid = loratrain(
        [
            "train",
            str(images),
            "--model",
            str(model),
            *("--set", "network_dim=4", "--set", "network_alpha=4", "--trainer", "builtin"),
        ],
        workdir,
        dead_temporal(),
    )
    assert valid.returncode == 1 and "cannot reach Temporal" in valid.stderr, valid.stderr


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "images/cat1.png",
            "--model: images/cat1.png: the model file must end in .safetensors or .ckpt "
            "(got 'cat1.png')",
        ),
        (
            "http://example.com/models/base.safetensors",
            "--model: http://example.com/models/base.safetensors: plain http is only allowed "
            "for localhost; use https",
        ),
        (
            "https://example.com/models/cat.png?sig=s3cr3t",
            "--model: https://example.com/models/cat.png: the model file must end in "
            ".safetensors or .ckpt (got 'cat.png')",
        ),
        (
            "aura.safetensors",
            "--model: aura.safetensors is an AuraFlow model, which loratrain does not train; "
            "supported: SD 1.x, SD 2.x, SDXL (Pony, Illustrious, NoobAI), Flux.1, SD 3.5",
        ),
        (
            "real-xl.safetensors",
            "--model: real-xl.safetensors is an SD 1.x checkpoint, not SDXL: set the request's "
            "base model to SD 1.x or give an SDXL checkpoint",
        ),
        (
            "random-base.safetensors",
            "--trainer: the builtin trainer trains SD 1.x and SD 2.x models, not sdxl: start "
            "the run with `--trainer sd-scripts` (trainer 'sd-scripts' in the request), which "
            "trains SDXL, Flux.1 and SD 3.5 too",
        ),
        ("empty.safetensors", "--model: empty.safetensors is empty (0 bytes): not a model"),
    ],
)
def test_a_model_that_is_not_a_model_is_refused_here(
    model: str, expected: str, workdir: Path
) -> None:
    image_folder(workdir / "images")
    (workdir / "empty.safetensors").write_bytes(b"")
    # Read from their headers here, before anything is uploaded.
    (workdir / "aura.safetensors").write_bytes(checkpoint_bytes("auraflow"))
    (workdir / "real-xl.safetensors").write_bytes(checkpoint_bytes("sd15"))
    # SDXL by its header, whatever its name: the builtin trainer (no sd-scripts here) refuses.
    (workdir / "random-base.safetensors").write_bytes(checkpoint_bytes("sdxl"))

    result = loratrain(["train", "images", "--model", model], workdir, dead_temporal())

    nothing_uploaded(workdir, result)
    assert errors(result.stderr) == [expected]
    assert "s3cr3t" not in result.stderr


def test_s3_inputs_that_are_not_there_are_refused_here(
    settings: Settings, s3: Any, workdir: Path
) -> None:
    """Asked of the real S3 server: a missing bucket, a prefix with nothing under it, one with
    captions only, and an s3:// model that does not exist; all listed at once."""
    env = {**cli_env(settings, "unused"), **dead_temporal()}
    bucket = settings.bucket
    s3.put_object(Bucket=bucket, Key="captions-only/cat1.txt", Body=b"a cat")
    s3.put_object(Bucket=bucket, Key="cats/cat1.png", Body=PNG)
    s3.put_object(Bucket=bucket, Key="models/base.safetensors", Body=b"{}" + bytes(64))
    missing_model = f"s3://{bucket}/models/missing.safetensors"
    cases = {
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/cats/": "IMAGES: bucket 'no-such-bucket-",
        f"s3://{bucket}/no-such-prefix/": f"IMAGES: nothing under s3://{bucket}/no-such-prefix/",
        f"s3://{bucket}/captions-only": f"IMAGES: s3://{bucket}/captions-only/ holds no .png",
        # 'cat' is the folder cat/, never cats/: as the worker reads it.
        f"s3://{bucket}/cat": f"IMAGES: nothing under s3://{bucket}/cat/",
    }
    for images, expected in cases.items():
        result = loratrain(
            ["train", images, "--model", missing_model, "--trainer", "builtin"], workdir, env
        )
        nothing_uploaded(workdir, result)
        found = errors(result.stderr)
        assert len(found) == 2 and found[0].startswith(expected), result.stderr
        assert found[1] == f"--model: {missing_model} does not exist"

    there = loratrain(
        [
            "train",
            f"s3://{bucket}/cats/",
            *("--model", f"s3://{bucket}/models/base.safetensors", "--trainer", "builtin"),
        ],
        workdir,
        env,
    )
    assert there.returncode == 1 and "cannot reach Temporal" in there.stderr, there.stderr


def test_sd_scripts_on_a_local_provider_without_it(workdir: Path) -> None:
    """The local provider's runner has no sd-scripts folder: `--trainer sd-scripts` is refused,
    naming the folder and the setting; the default becomes the builtin trainer, in one line."""
    image_folder(workdir / "images")
    local_model(workdir)
    missing = workdir / "no-sd-scripts"
    env = {**dead_temporal(), "LORA_RUNNER_SD_SCRIPTS_DIR": str(missing)}
    train = ["train", "images", "--model", "base-sd15.safetensors"]

    refused = loratrain([*train, "--trainer", "sd-scripts"], workdir, env)

    nothing_uploaded(workdir, refused)
    assert errors(refused.stderr) == [
        f"--trainer sd-scripts: the local GPU provider runs sd-scripts from {missing}, which "
        "does not exist; set LORA_RUNNER_SD_SCRIPTS_DIR to a kohya-ss sd-scripts checkout "
        "(where the worker or `loratrain dev` starts) or use --trainer builtin"
    ]

    defaulted = loratrain(train, workdir, env)
    assert defaulted.returncode == 1, defaulted.stderr  # past the checks: Temporal is not there
    assert (
        f"note: no sd-scripts for the local GPU provider ({missing} does not exist, "
        "LORA_RUNNER_SD_SCRIPTS_DIR): training with the builtin trainer"
    ) in defaulted.stderr.splitlines()

    # What `loratrain dev` recorded for its runners counts when this terminal sets nothing.
    state = workdir / ".loratrain"
    state.mkdir()
    (state / DEV_ENV_NAME).write_text(f"LORA_RUNNER_SD_SCRIPTS_DIR={json.dumps(str(STANDIN))}\n")
    recorded = loratrain([*train, "--trainer", "sd-scripts"], workdir, dead_temporal())
    assert recorded.returncode == 1 and "cannot reach Temporal" in recorded.stderr
    assert "note: no sd-scripts" not in recorded.stderr


async def test_the_trainer_chosen_here_is_the_one_the_run_gets(
    dev_env: WorkflowEnvironment,
    quiet_worker: tuple[Settings, RecordingProvider],
    workdir: Path,
) -> None:
    settings, _ = quiet_worker
    image_folder(workdir / "images")
    local_model(workdir)
    runs = {}
    for sd_scripts_dir, expected in ((workdir / "none", "builtin"), (STANDIN, "sd-scripts")):
        env = {
            **cli_env(settings, dev_address(dev_env)),
            "LORA_RUNNER_SD_SCRIPTS_DIR": str(sd_scripts_dir),
        }
        run_id = f"trainer-{uuid.uuid4().hex[:8]}"
        train = ["train", "images", "--model", "base-sd15.safetensors", "--run-id", run_id]
        started = await asyncio.to_thread(loratrain, train, workdir, env)
        assert started.returncode == 0, started.stderr
        runs[run_id] = expected
    for run_id, expected in runs.items():
        handle = dev_env.client.get_workflow_handle(run_id)
        assert (await started_request(dev_env, handle)).trainer == expected
        await handle.terminate("test over")


def test_a_caption_the_text_encoder_cuts_is_named_before_the_upload(workdir: Path) -> None:
    images = image_folder(workdir / "images")
    (images / "cat2.txt").write_text(" ".join(["fluffy"] * 90))
    model = workdir / "base.safetensors"
    model.write_bytes(checkpoint_bytes("sd15"))

    result = loratrain(["train", "images", "--model", str(model)], workdir, dead_temporal())

    assert "Traceback" not in result.stderr
    assert (
        "warning: cat2.txt: at least 90 CLIP tokens; SD 1.x reads the first 75, the rest of "
        "the caption is not trained on" in result.stderr
    )
    assert "cat1.txt" not in result.stderr
