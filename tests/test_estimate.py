"""`loratrain estimate` and `train --dry-run`: the demo data against the local S3 server and the
fake Vast API; offers, time and cost in seconds, and nothing uploaded or rented."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from activities.estimate import (
    LORA_BYTES_PER_RANK,
    SECONDS_PER_STEP,
    Estimate,
    gpu_class,
    planned_steps,
    seconds_per_step,
    upload_bytes,
)
from common.settings import Settings
from gpu_runner.demo_assets import write_demo_dataset
from gpu_runner.protocol import SampleSettings, TrainingConfig
from gpu_runner.trainers.sd_scripts import vram_needed_gb

from .conftest import free_port
from .fake_civitai import checkpoint_bytes
from .fakes.vast_api import FakeVast, make_offer
from .test_cli import cli_env, loratrain, workdir
from .test_cli_runs import errors
from .vast_support import VAST_KEY, fake_vast

__all__ = ["workdir"]  # fixture

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
OFFERS = [
    make_offer(1, gpu_name="RTX 3060", gpu_ram=12288, dph_total=0.08, dlperf=15.0),
    make_offer(2, gpu_name="RTX 4090", gpu_ram=24564, dph_total=0.40, dlperf=60.0),
    make_offer(3, gpu_name="RTX 3090", gpu_ram=24576, dph_total=0.22, dlperf=30.0),
    make_offer(4, gpu_name="RTX A6000", gpu_ram=49140, dph_total=0.55, inet_down=300.0),
]
TINY_MODEL_BYTES = 2_000_000


class Stack:
    def __init__(self, settings: Settings, fake: FakeVast, vast_settings: Settings, s3: Any):
        self.settings, self.fake, self.vast_settings, self.s3 = settings, fake, vast_settings, s3

    def env(self) -> dict[str, str]:
        return {
            **cli_env(self.settings, f"127.0.0.1:{free_port()}"),  # no Temporal: none needed
            "LORA_GPU_PROVIDER": "vast",
            "LORA_VAST_API_KEY": VAST_KEY,
            "LORA_VAST_BASE_URL": self.vast_settings.vast_base_url,
            "LORA_VAST_IMAGE_BYTES": str(self.vast_settings.vast_image_bytes),
        }

    def objects(self) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.settings.bucket)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def stack(settings: Settings, s3: Any, tmp_path: Path) -> Iterator[Stack]:
    """The local S3 server with the demo's model in it, and the fake Vast with four offers."""
    s3.put_object(
        Bucket=settings.bucket,
        Key="models/tiny-sd15.safetensors",
        Body=checkpoint_bytes("sd15", size=TINY_MODEL_BYTES),
    )
    with fake_vast(settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPER) as (fake, vs):
        yield Stack(settings, fake, vs, s3)


def demo_images(workdir: Path) -> Path:
    write_demo_dataset(workdir / "images")
    return workdir / "images"


def test_estimate_on_the_demo_data_shows_offers_time_and_cost_and_rents_nothing(
    stack: Stack, workdir: Path
) -> None:
    images = demo_images(workdir)
    model = f"s3://{stack.settings.bucket}/models/tiny-sd15.safetensors"
    before = stack.objects()

    # Its time (the target: under 5 s) is measured, not asserted: a loaded machine
    # is no measure (the session's note has the figure).
    started = time.monotonic()
    result = loratrain(["estimate", str(images), "--model", model], workdir, stack.env())
    print(result.stdout, result.stderr, f"took {time.monotonic() - started:.2f} s", sep="\n")

    assert result.returncode == 0, result.stderr
    assert stack.objects() == before
    assert stack.fake.created() == []
    out = result.stdout
    assert "12 images, 12 captions" in out
    assert "ceil(12 images x 10 repeats / batch 2) x 10 epochs = 600" in out
    # SD 1.5 qualifies on 16 GB (the request's default, above SD 1.5's own need): no 3060.
    assert "RTX 3060" not in out
    for name in ("RTX 3090", "RTX 4090", "RTX A6000"):
        assert name in out
    expected = [line for line in out.splitlines() if line.startswith("expected: ")]
    assert len(expected) == 1 and "$" in expected[0] and "RTX 3090" in expected[0], out
    assert "assumptions:" in out


def test_estimate_json_ranks_offers_by_expected_cost(stack: Stack, workdir: Path) -> None:
    images = demo_images(workdir)
    model = f"s3://{stack.settings.bucket}/models/tiny-sd15.safetensors"

    result = loratrain(
        ["estimate", str(images), "--model", model, "--json", "--set", "batch_size=4"],
        workdir,
        stack.env(),
    )

    assert result.returncode == 0, result.stderr
    estimate = Estimate.model_validate_json(result.stdout)
    assert estimate.steps == 300 and estimate.training.batch_size == 4
    assert estimate.model.family == "sd15"
    assert estimate.model.bytes == len(checkpoint_bytes("sd15", size=TINY_MODEL_BYTES))
    assert estimate.requirements.min_vram_gb == 16
    costs = [o.cost_usd for o in estimate.offers]
    assert costs == sorted(costs) and len(costs) == 3
    assert all(o.vram_gb and o.vram_gb >= 16 for o in estimate.offers)
    best = estimate.offers[0]
    assert best.hours * 3600 == pytest.approx(best.download_s + best.overhead_s + best.training_s)
    # The GPU is billed from `running`: not while the 1 GB image is pulled and the container
    # boots (the fake's offers price neither the disk nor bandwidth).
    pull_s = stack.settings.vast_boot_overhead_s + 1e9 * 8 / (best.download_mbps or 0) / 1e6
    assert (best.hours - best.billed_hours) * 3600 == pytest.approx(pull_s)
    assert best.cost_usd == pytest.approx(best.dollars_per_hour * best.billed_hours)
    assert best.upload_bytes > 0 and best.bandwidth_usd == 0


def test_train_dry_run_prints_the_estimate_and_starts_nothing(stack: Stack, workdir: Path) -> None:
    images = demo_images(workdir)
    model = f"s3://{stack.settings.bucket}/models/tiny-sd15.safetensors"
    before = stack.objects()

    result = loratrain(["train", str(images), "--model", model, "--dry-run"], workdir, stack.env())

    assert result.returncode == 0, result.stderr
    assert "expected: " in result.stdout and "RTX 3090" in result.stdout
    assert "uploading" not in result.stdout and "started run" not in result.stdout
    assert "cannot reach Temporal" not in result.stderr
    assert stack.objects() == before
    assert stack.fake.created() == []


def test_no_qualifying_offer_is_one_line(stack: Stack, workdir: Path) -> None:
    images = demo_images(workdir)
    model = f"s3://{stack.settings.bucket}/models/tiny-sd15.safetensors"
    for offer_id in list(stack.fake.offers):
        stack.fake.offers[offer_id]["dph_total"] = 9.0

    result = loratrain(["estimate", str(images), "--model", model], workdir, stack.env())

    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert errors(result.stderr) == [
        "no Vast offer qualifies: any GPU with at least 16 GB VRAM, at most $1/h, reliability "
        ">= 0.95, 40 GB disk, download >= 200 Mbps; raise gpu.max_dollars_per_hour, lower "
        "gpu.min_reliability or widen gpu.gpu_names"
    ]


def test_bad_models_are_one_line(stack: Stack, workdir: Path) -> None:
    images = demo_images(workdir)
    bucket = stack.settings.bucket
    missing = loratrain(
        ["estimate", str(images), "--model", f"s3://{bucket}/models/none.safetensors"],
        workdir,
        stack.env(),
    )
    assert missing.returncode == 2
    assert errors(missing.stderr) == [
        f"--model: s3://{bucket}/models/none.safetensors does not exist"
    ]

    # A local model runs only on the local provider: said before anything is asked.
    (workdir / "base.safetensors").write_bytes(b"{}" + bytes(64))
    local = loratrain(
        ["estimate", str(images), "--model", "base.safetensors"], workdir, stack.env()
    )
    assert local.returncode == 2 and "Traceback" not in local.stderr
    assert errors(local.stderr)[0].startswith("--model: ") and "local GPU provider" in local.stderr


def test_a_model_no_family_trains_is_one_line(workdir: Path) -> None:
    """On the local provider, a checkpoint named as Pony V7 (AuraFlow) has family `other`."""
    images = demo_images(workdir)
    model = workdir / "pony.safetensors"
    model.write_bytes(checkpoint_bytes("sd15"))

    result = loratrain(
        ["estimate", str(images), "--model", f"file://{model}#base_model=Pony%20V7"],
        workdir,
        {"LORA_GPU_PROVIDER": "local"},
    )

    assert result.returncode in (1, 2), result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    found = errors(result.stderr)
    assert len(found) == 1 and found[0].startswith("--model: ") and "Pony V7" in found[0]


def test_the_local_provider_offers_this_machine_at_no_cost(workdir: Path) -> None:
    images = demo_images(workdir)
    model = workdir / "base-sd15.safetensors"
    model.write_bytes(checkpoint_bytes("sd15"))

    result = loratrain(
        ["estimate", str(images), "--model", str(model), "--json", "--trainer", "builtin"],
        workdir,
        {"LORA_GPU_PROVIDER": "local"},
    )

    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)
    assert [o["offer"] for o in estimate["offers"]] == ["local"]
    assert estimate["offers"][0]["cost_usd"] == 0.0
    assert estimate["offers"][0]["hours"] > 0


def test_steps_and_seconds_per_step() -> None:
    config = TrainingConfig().for_family("sdxl")
    assert planned_steps(config, 25) == (
        2500,
        "ceil(25 images x 10 repeats / batch 1) x 10 epochs = 2500",
    )
    capped = TrainingConfig(max_train_steps=800).for_family("sdxl")
    assert planned_steps(capped, 25)[0] == 800

    reference, name = seconds_per_step("sdxl", None, "RTX 3090", config)
    assert reference == SECONDS_PER_STEP["sdxl"] and "reference" in name
    faster, _ = seconds_per_step("sdxl", None, "RTX 4090", config)
    slower, _ = seconds_per_step("sdxl", None, "RTX 3060", config)
    assert faster < reference < slower
    doubled = config.model_copy(update={"batch_size": 2})
    assert seconds_per_step("sdxl", None, "RTX 3090", doubled)[0] == pytest.approx(2 * reference)
    smaller = config.model_copy(update={"resolution": 512})
    assert seconds_per_step("sdxl", None, "RTX 3090", smaller)[0] == pytest.approx(reference / 4)
    assert (
        seconds_per_step("sd3", "large", "RTX 3090", config)[0]
        > seconds_per_step("sd3", "medium", "RTX 3090", config)[0]
    )
    assert gpu_class("Some Future GPU")[1] == 1.0


def test_uploads_count_every_epochs_lora_state_and_samples() -> None:
    config = TrainingConfig().for_family("sdxl")
    lora = LORA_BYTES_PER_RANK["sdxl"] * 32
    quiet = SampleSettings(enabled=False)

    uploads, line = upload_bytes("sdxl", config, quiet)

    # Ten epochs' LoRAs, the kept one again, and nine states (none after the last epoch) of
    # three LoRAs each with an 8-bit optimizer, six with a 32-bit one.
    assert uploads == pytest.approx(11 * lora + 9 * 3 * lora)
    assert "10 epochs" in line
    adamw = config.model_copy(update={"optimizer": "AdamW"})
    assert upload_bytes("sdxl", adamw, quiet)[0] == pytest.approx(11 * lora + 9 * 6 * lora)
    # Two 1024 px samples an epoch by default.
    sampled = upload_bytes("sdxl", config, SampleSettings())[0]
    assert sampled - uploads == pytest.approx(20 * 1024 * 1024 * 1.5, rel=1e-6)
    # The Vast ranking's reference run is this estimate's default SDXL run.
    reference = Settings.model_fields["vast_reference_upload_bytes"].default
    assert reference == pytest.approx(sampled, rel=0.01)


def test_a_flux_estimate_takes_its_files_from_model_file_and_sizes_the_gpu(
    stack: Stack, workdir: Path
) -> None:
    """A Flux.1 dev transformer in S3 with its CLIP-L, T5-XXL and AE given as --model-file:
    the estimate names the family, counts the files' bytes, and asks for the VRAM Flux needs,
    whatever the request's minimum."""
    images = demo_images(workdir)
    sizes: dict[str, int] = {}
    for name, kind in {
        "model": "flux-dev",
        "clip_l": "clip_l",
        "t5xxl": "t5xxl",
        "ae": "ae",
    }.items():
        body = checkpoint_bytes(kind)
        sizes[name] = len(body)
        stack.s3.put_object(Bucket=stack.settings.bucket, Key=f"flux/{name}.safetensors", Body=body)
    where = f"s3://{stack.settings.bucket}/flux"
    roles = [
        ("--model-file", f"{role}={where}/{role}.safetensors") for role in ("clip_l", "t5xxl", "ae")
    ]

    result = loratrain(
        ["estimate", str(images), "--model", f"{where}/model.safetensors", "--json"]
        + [arg for pair in roles for arg in pair],
        workdir,
        stack.env(),
    )

    assert result.returncode == 0, result.stderr
    estimate = Estimate.model_validate_json(result.stdout)
    assert (estimate.model.family, estimate.model.variant) == ("flux", "dev")
    assert estimate.model.component_bytes == sizes["clip_l"] + sizes["t5xxl"] + sizes["ae"]
    needed = vram_needed_gb("flux", "dev", TrainingConfig().for_family("flux"))
    assert estimate.requirements.min_vram_gb == max(16, needed)
    least = estimate.requirements.min_vram_gb
    assert estimate.offers and all(o.vram_gb and o.vram_gb >= least for o in estimate.offers)


def test_a_model_file_that_is_not_a_role_is_refused_before_anything(workdir: Path) -> None:
    images = demo_images(workdir)
    model = workdir / "base-sd15.safetensors"
    model.write_bytes(checkpoint_bytes("sd15"))

    result = loratrain(
        ["estimate", str(images), "--model", str(model), "--model-file", "vae=x.safetensors"],
        workdir,
        {"LORA_GPU_PROVIDER": "local"},
    )

    assert result.returncode == 2
    assert errors(result.stderr) == [
        "--model-file: 'vae' is not a role; use one of clip_l, clip_g, t5xxl, ae"
    ]
