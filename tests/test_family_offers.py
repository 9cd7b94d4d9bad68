"""What a family's run needs of a GPU reaches the offer search: the Vast provider, through the
real SDK against the fake Vast API, never rents a GPU below the family's VRAM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from activities.gpu_requirements import effective_requirements, family_minimums
from activities.providers.base import instance_label
from activities.providers.vast import VastProvider
from common.settings import Settings
from gpu_runner.protocol import BaseModelFamily, TrainingConfig
from workflows.models import GpuRequirements

from .fakes.vast_api import make_offer
from .vast_support import fake_vast

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
JOB_URL = "http://s3.example/runs/r/job.json?X-Amz-Signature=secret"
FLUX_DEV_BYTES = 11_900_000_000
# One offer per VRAM size, the smallest the cheapest: a search that ignores the family's
# needs rents the 8 GB card.
OFFERS = [
    make_offer(8, gpu_name="RTX 3070", gpu_ram=8192, dph_total=0.05, dlperf=12.0),
    make_offer(12, gpu_name="RTX 3060", gpu_ram=12288, dph_total=0.10, dlperf=15.0),
    make_offer(16, gpu_name="RTX 4060 Ti", gpu_ram=16380, dph_total=0.20, dlperf=25.0),
    make_offer(24, gpu_name="RTX 4090", gpu_ram=24564, dph_total=0.40, dlperf=60.0),
    make_offer(48, gpu_name="RTX A6000", gpu_ram=49140, dph_total=0.80, dlperf=45.0),
]


def test_a_flux_run_never_rents_a_gpu_below_what_flux_needs(
    settings: Settings, tmp_path: Path
) -> None:
    asked = GpuRequirements(min_vram_gb=4, max_dollars_per_hour=5.0)
    needed_gb, _ = family_minimums("flux", "dev", TrainingConfig(), FLUX_DEV_BYTES)
    requirements = effective_requirements(asked, "flux", "dev", TrainingConfig(), FLUX_DEV_BYTES)
    assert needed_gb >= 12
    assert requirements.min_vram_gb == needed_gb

    with fake_vast(settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPER) as (fake, s):
        provider = VastProvider(s)
        # What the user asked alone would take the 8 GB card first.
        assert provider.ranked_offers(asked)[0].offer.gpu_ram == 8192

        ranked = provider.ranked_offers(requirements, download_bytes=FLUX_DEV_BYTES)
        assert len(ranked) >= 3, "at least the 16, 24 and 48 GB offers qualify"
        assert all(r.offer.gpu_ram >= needed_gb * 1000 for r in ranked)
        assert fake.offer_queries[-1]["gpu_ram"] == {"gte": needed_gb * 1000}

        instance = provider.create(
            instance_label(s.deployment_name, "flux-run", 1),
            JOB_URL,
            requirements,
            download_bytes=FLUX_DEV_BYTES,
        )
        rented = fake.created()
        assert [i.id for i in rented] == [int(instance.instance_id)]
        assert rented[0].offer["gpu_ram"] >= needed_gb * 1000
        assert rented[0].offer["id"] != 8
        # The disk asked of the host covers what the family's files need.
        assert rented[0].disk >= requirements.disk_gb


@pytest.mark.parametrize(
    ("family", "variant", "config"),
    [
        ("sd15", None, TrainingConfig()),
        ("sd2", None, TrainingConfig()),
        ("sdxl", None, TrainingConfig()),
        ("sdxl", None, TrainingConfig(text_encoder_lr=1e-5)),
        ("flux", "dev", TrainingConfig()),
        ("sd3", "medium", TrainingConfig()),
        ("sd3", "large", TrainingConfig()),
        ("sd3", None, TrainingConfig()),
    ],
)
def test_requirements_are_the_larger_of_the_users_and_the_familys(
    family: BaseModelFamily, variant: str | None, config: TrainingConfig
) -> None:
    vram_gb, disk_gb = family_minimums(family, variant, config, 6_000_000_000)
    assert vram_gb >= 8 and disk_gb >= 10

    low = effective_requirements(
        GpuRequirements(min_vram_gb=4, disk_gb=10), family, variant, config, 6_000_000_000
    )
    assert (low.min_vram_gb, low.disk_gb) == (vram_gb, disk_gb)

    high = GpuRequirements(min_vram_gb=80, disk_gb=500, gpu_names=["H100 SXM"], countries=["SE"])
    kept = effective_requirements(high, family, variant, config, 6_000_000_000)
    assert kept == high


def test_what_families_need_is_ordered_as_their_models_are_large() -> None:
    def vram(family: BaseModelFamily, variant: str | None = None, **config: float) -> int:
        return family_minimums(family, variant, TrainingConfig(**config), None)[0]

    assert vram("sd15") <= vram("sd2") <= vram("sdxl") <= vram("flux", "dev")
    assert vram("sdxl", text_encoder_lr=1e-5) >= vram("sdxl")
    assert vram("sd3", "medium") < vram("sd3", "large")
    # An unknown SD 3 variant is taken as the larger model.
    assert vram("sd3") == vram("sd3", "large")


def test_other_and_unknown_sizes_keep_the_users_requirements() -> None:
    asked = GpuRequirements(min_vram_gb=20, disk_gb=60)
    assert effective_requirements(asked, "other", None, TrainingConfig(), None) == asked
    # Settings the family refuses (the run's intake says so) never raise here.
    odd = TrainingConfig(network_dim=4)
    assert effective_requirements(asked, "sd15", None, odd, None).min_vram_gb == 20
