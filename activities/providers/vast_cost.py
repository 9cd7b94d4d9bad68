"""What one run costs on one Vast offer, as Vast bills it: the one formula behind both the
ranking at rent time (`vast.rank_offers`) and the estimate before a run (`activities/estimate`).

Vast bills three things separately (docs.vast.ai, guides/reference/billing.mdx "Pricing" and
guides/instances/pricing.mdx):
- the GPU, `dph_total` $/h, for every second the instance is running ("active/connected"):
  while the image is pulled and the container starts (`loading`) the GPU is not billed.
  `dph_total` is the GPU's `dph_base` plus `storage_total_cost`, the disk the search asked for.
- storage, `storage_total_cost` $/h, for every second the instance exists, loading included.
  An offer that leaves it out is taken to bill nothing before `running`.
- bandwidth, every byte in or out in any state, at `inet_down_cost` / `inet_up_cost`. Vast's
  docs and OpenAPI write "$/GB"; Vast's own SDK shows these prices per TB as x 1024
  (vastai/cli/display.py), so its GB is binary: a price is per GiB, 2**30 bytes.

    pull_s     = boot_s + 8 x image_bytes / (inet_down Mb/s x 1e6)         loading: storage only
    download_s = 8 x download_bytes / (inet_down Mb/s x 1e6)               running: GPU billed
    billed_s   = download_s + work_s                    (work: load, cache, train; the caller's)
    usd        = storage_total_cost x pull_s / 3600 + dph_total x billed_s / 3600
               + inet_down_cost x (image_bytes + download_bytes) / 2**30
               + inet_up_cost x upload_bytes / 2**30

Uploads (each epoch's LoRA, state and samples) go up while the next epoch trains, so they add
bytes but no time.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class OfferPrices:
    """An offer's prices and link, in Vast's units."""

    dollars_per_hour: float  # dph_total: GPU and disk while running
    storage_dollars_per_hour: float = 0.0  # storage_total_cost: the disk from creation
    download_mbps: float = 0.0  # inet_down, Mb/s; 0: nothing to download from (local)
    download_dollars_per_gib: float = 0.0  # inet_down_cost
    upload_dollars_per_gib: float = 0.0  # inet_up_cost


@dataclass(frozen=True)
class RunCost:
    pull_s: float  # image pull + container start, before `running`
    download_s: float  # the run's inputs, once running
    billed_s: float  # seconds the GPU is billed
    bandwidth_usd: float
    usd: float

    @property
    def wall_s(self) -> float:
        """From create to the end of training."""
        return self.pull_s + self.billed_s


def transfer_s(size_bytes: float, mbps: float) -> float:
    """Seconds to move `size_bytes` over a `mbps` Mb/s link (none at 0 Mb/s: a local run)."""
    return size_bytes * 8 / (max(mbps, 1.0) * 1e6) if mbps > 0 else 0.0


def run_cost(
    prices: OfferPrices,
    *,
    image_bytes: float,
    boot_s: float,
    download_bytes: float,
    work_s: float,
    upload_bytes: float,
) -> RunCost:
    """The whole run's dollars and seconds on one offer (formula in the module doc)."""
    pull_s = boot_s + transfer_s(image_bytes, prices.download_mbps)
    download_s = transfer_s(download_bytes, prices.download_mbps)
    billed_s = download_s + work_s
    bandwidth_usd = (
        prices.download_dollars_per_gib * (image_bytes + download_bytes)
        + prices.upload_dollars_per_gib * upload_bytes
    ) / GIB
    usd = (
        prices.storage_dollars_per_hour * pull_s / 3600
        + prices.dollars_per_hour * billed_s / 3600
        + bandwidth_usd
    )
    return RunCost(pull_s, download_s, billed_s, bandwidth_usd, usd)
