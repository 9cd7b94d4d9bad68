"""The Vast provider through the real `vastai` SDK against the fake Vast API over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.gpu import AllocateGpuInput, GpuActivities, RunRef
from activities.providers.base import NoOfferError, instance_label, run_label_prefix
from activities.providers.vast import (
    VastApiError,
    VastProvider,
    _Offer,
    disk_gb_for,
    offer_query,
    rank_offers,
    spread_order,
)
from activities.providers.vast_cost import GIB, OfferPrices, run_cost
from common.settings import Settings
from worker.main import ProviderConfigError, gpu_provider, vast_settings_problem
from workflows.models import GpuRequirements

from .fakes.vast_api import PULL_ERROR, FakeVast, make_offer
from .vast_support import fake_vast, wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
JOB_URL = "http://s3.example/runs/r/job.json?X-Amz-Signature=secret"
GB = 1_000_000_000


class VastRig(NamedTuple):
    fake: FakeVast
    settings: Settings
    provider: VastProvider


@pytest.fixture
def vast(settings: Settings, tmp_path: Path) -> Iterator[VastRig]:
    offers = [
        make_offer(1, dph_total=0.50),
        make_offer(2, dph_total=0.40),
        make_offer(3, dph_total=0.30, dlperf=20.0),
    ]
    with fake_vast(settings, tmp_path / "hosts", offers, runner_command=SLEEPER) as (fake, s):
        yield VastRig(fake, s, VastProvider(s))


def label(settings: Settings, run_id: str = "run-1", attempt: int = 1) -> str:
    return instance_label(settings.deployment_name, run_id, attempt)


def test_default_requirements_send_this_offer_query(vast: VastRig) -> None:
    fake, _, provider = vast

    provider.ranked_offers(GpuRequirements(), download_bytes=3 * GB)

    query = fake.offer_queries[-1]
    print("offer query for the default requirements:", query)
    assert query == {
        # The SDK's defaults: verified, rentable, not yet rented hosts.
        "verified": {"eq": True},
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "num_gpus": {"eq": 1},
        "gpu_ram": {"gte": 16000},
        "dph_total": {"lte": 1.0},
        "reliability": {"gte": 0.95},
        "disk_space": {"gte": 40},
        "inet_down": {"gte": 200},
        "cuda_max_good": {"gte": 12.4},
        "order": [["dph_total", "asc"]],
        "type": "on-demand",
        "limit": 64,
        "allocated_storage": 40,
    }


def test_the_query_carries_names_countries_and_failed_machines(settings: Settings) -> None:
    requirements = GpuRequirements(
        gpu_names=["RTX 4090", "RTX 3090"], blocked_countries=["CN"], min_vram_gb=24
    )
    query = offer_query(settings, requirements, disk_gb=60, exclude_machine_ids=["17", "4"])
    assert query["gpu_name"] == {"in": ["RTX 4090", "RTX 3090"]}
    assert query["geolocation"] == {"notin": ["CN"]}
    assert query["machine_id"] == {"notin": [4, 17]}
    assert query["gpu_ram"] == {"gte": 24000}
    allowed = offer_query(settings, GpuRequirements(countries=["SE", "NO"]), disk_gb=40)
    assert allowed["geolocation"] == {"in": ["SE", "NO"]}


def test_offers_rank_by_expected_cost_of_the_whole_run(settings: Settings) -> None:
    settings = settings.model_copy(update={"vast_image_bytes": 8 * GB})
    offers = [
        _Offer.model_validate(o)
        for o in [
            # Cheapest per hour, but a slow GPU and a slow link: the run takes longest.
            make_offer(11, gpu_name="RTX 3060", dph_total=0.12, dlperf=12, inet_down=200),
            make_offer(12, gpu_name="RTX 3090", dph_total=0.22, dlperf=30, inet_down=900),
            make_offer(13, gpu_name="RTX 4090", dph_total=0.38, dlperf=60, inet_down=1500),
            # Same as 13 but its download is metered at $0.02/GiB.
            make_offer(
                14,
                gpu_name="RTX 4090",
                dph_total=0.35,
                dlperf=60,
                inet_down=1500,
                inet_down_cost=0.02,
            ),
            # Cheap and fast, but fails three runs in ten.
            make_offer(
                15, gpu_name="RTX 4090", dph_total=0.30, dlperf=60, inet_down=1500, reliability=0.70
            ),
        ]
    ]

    ranked = rank_offers(offers, settings, download_bytes=4 * GB)

    print("ranking for a 12 GB fetch (8 GB image + 4 GB model and images):")
    for entry in ranked:
        print("  " + entry.describe())
    assert [r.offer.id for r in ranked] == [13, 15, 12, 11, 14]
    by_id = {r.offer.id: r for r in ranked}
    # The formula, spelled out for one offer: the 8 GB image over 900 Mb/s and the boot come
    # before `running` (no disk price here: unbilled), then 4 GB of inputs and 3600 s x 30/30
    # at the GPU's $/h.
    pull_s = settings.vast_boot_overhead_s + 8 * GB * 8 / 900e6
    download_s = 4 * GB * 8 / 900e6
    assert by_id[12].cost.pull_s == pytest.approx(pull_s)
    assert by_id[12].cost.billed_s == pytest.approx(download_s + 3600)
    assert by_id[12].training_s == pytest.approx(3600)
    assert by_id[12].run_usd == pytest.approx(0.22 * (download_s + 3600) / 3600)
    assert by_id[12].expected_usd == pytest.approx(by_id[12].run_usd / 0.99)
    # The image and the inputs both come down the metered link, priced per GiB.
    assert by_id[14].run_usd == pytest.approx(
        0.35 * (by_id[14].cost.download_s + 1800) / 3600 + 0.02 * 12 * GB / GIB
    )


def test_a_metered_upload_ranks_an_offer_below_an_otherwise_equal_one(
    settings: Settings, tmp_path: Path
) -> None:
    offers = [
        # A cent an hour cheaper, but every epoch's LoRA and state go up at $0.02/GiB.
        make_offer(21, dph_total=0.40, inet_up_cost=0.02),
        make_offer(22, dph_total=0.41),
    ]
    with fake_vast(settings, tmp_path / "hosts", offers, runner_command=SLEEPER) as (_, s):
        ranked = VastProvider(s).ranked_offers(GpuRequirements(), download_bytes=GB)

    for entry in ranked:
        print("  " + entry.describe())
    assert [r.offer.id for r in ranked] == [22, 21]
    metered, free = ranked[1].cost, ranked[0].cost
    assert metered.bandwidth_usd - free.bandwidth_usd == pytest.approx(
        0.02 * s.vast_reference_upload_bytes / GIB
    )


def test_an_offer_that_reports_no_download_speed_ranks_as_slow_not_instant(
    settings: Settings,
) -> None:
    offers = [
        _Offer.model_validate(make_offer(31, dph_total=0.40, inet_down=0.0)),
        _Offer.model_validate(make_offer(32, dph_total=0.41, inet_down=500.0)),
    ]
    ranked = rank_offers(offers, settings, 10 * GB)
    assert [r.offer.id for r in ranked] == [32, 31]
    assert ranked[1].cost.download_s > 10_000  # 10 GB at 1 Mb/s, not 0 s


def test_the_image_pull_and_boot_bill_the_disk_not_the_gpu(settings: Settings) -> None:
    settings = settings.model_copy(update={"vast_image_bytes": 20 * GB})
    offers = [
        _Offer.model_validate(o)
        for o in [
            # A slow link pulls the 20 GB image for 1,600 s, at the disk's $0.01/h only.
            make_offer(31, dph_total=2.00, inet_down=100, storage_total_cost=0.01),
            make_offer(32, dph_total=2.04, inet_down=2000, storage_total_cost=0.01),
        ]
    ]

    ranked = rank_offers(offers, settings, download_bytes=GB // 10)

    for entry in ranked:
        print("  " + entry.describe())
    assert [r.offer.id for r in ranked] == [31, 32]
    slow = ranked[0]
    pull_s = settings.vast_boot_overhead_s + 20 * GB * 8 / 100e6
    assert slow.cost.pull_s == pytest.approx(pull_s)
    assert slow.run_usd == pytest.approx(
        0.01 * pull_s / 3600 + 2.00 * (GB // 10 * 8 / 100e6 + slow.training_s) / 3600
    )


def test_bandwidth_prices_are_per_gib() -> None:
    prices = OfferPrices(
        dollars_per_hour=1.0, download_dollars_per_gib=0.01, upload_dollars_per_gib=0.02
    )

    cost = run_cost(
        prices, image_bytes=GIB, boot_s=0, download_bytes=GIB, work_s=0, upload_bytes=3 * GIB
    )

    # 2 GiB down at $0.01 and 3 GiB up at $0.02; read per GB (1e9) it would be 7.4 % more.
    assert cost.bandwidth_usd == pytest.approx(0.08)


def test_create_rents_the_best_offer_with_the_runner_image_label_and_job_url(
    vast: VastRig,
) -> None:
    fake, settings, provider = vast
    requirements = GpuRequirements()

    instance = provider.create(label(settings), JOB_URL, requirements, download_bytes=20 * GB)

    # Offer 3 is cheapest per hour, but its slow GPU makes the run dearer than offer 2.
    assert [i.offer["id"] for i in fake.created()] == [2]
    body = fake.create_bodies[-1]
    assert body["image"] == "ghcr.io/loratrain/loratrain-gpu:test"
    assert body["runtype"] == "args"  # the image's entrypoint: python -m gpu_runner
    assert body["env"] == {"LORA_JOB_URL": JOB_URL}
    assert body["label"] == label(settings) == f"loratrain:{settings.deployment_name}:run-1:1"
    # 1 GB image + twice the 20 GB downloads + 10 GB margin.
    assert body["disk"] == disk_gb_for(settings, requirements, 20 * GB) == 51
    assert instance.provider == "vast" and instance.state == "starting"
    assert instance.instance_id == str(fake.created()[0].id)
    assert (instance.gpu_name, instance.dollars_per_hour) == ("RTX 4090", 0.40)
    assert (instance.machine_id, instance.country) == ("10002", "SE")
    assert instance.host_id is not None
    # Every request carried the account key as a Bearer token.
    assert {who for _, _, who in fake.requests} == {"account"}

    running = wait_until(
        lambda: (i := provider.get(instance.instance_id)) and i.state == "running" and i
    )
    assert running.label == instance.label
    assert provider.find(instance.label) == running
    assert provider.find(label(settings, attempt=2)) is None


def test_a_lost_create_response_still_rents_exactly_one_instance(
    vast: VastRig,
) -> None:
    fake, settings, provider = vast
    fake.lose_create_responses(1)

    instance = provider.create(label(settings), JOB_URL, GpuRequirements())

    # The 504 was not sent again: the label found the instance it had made.
    assert len(fake.created()) == 1
    assert len(fake.calls_to("create")) == 1
    assert instance.instance_id == str(fake.created()[0].id)
    assert instance.label == label(settings)


def test_an_offer_taken_at_create_moves_to_the_next_offer(
    vast: VastRig,
) -> None:
    fake, settings, provider = vast
    fake.machine_faults[10002] = "taken"

    instance = provider.create(label(settings), JOB_URL, GpuRequirements())

    assert [i.offer["id"] for i in fake.created()] == [1]
    assert instance.machine_id == "10001"


def test_near_equal_offers_form_a_tier_each_label_starts_at_its_own_place(
    settings: Settings,
) -> None:
    offers = [_Offer.model_validate(make_offer(n, dph_total=0.300 + n / 1000)) for n in range(20)]
    ranked = rank_offers(offers, settings, download_bytes=GB)
    best = ranked[0].expected_usd
    tier = [r.offer.id for r in ranked if r.expected_usd <= best * 1.05]
    assert 10 < len(tier) < 20

    orders = {n: [r.offer.id for r in spread_order(ranked, f"run-{n}", 0.05)] for n in range(50)}

    starts = {order[0] for order in orders.values()}
    print(f"{len(starts)} first offers for 50 labels in a tier of {len(tier)}")
    assert len(starts) > len(tier) // 2
    for order in orders.values():
        # Every offer once: the tier round from the start, then the rest as ranked.
        assert sorted(order) == sorted(r.offer.id for r in ranked)
        assert set(order[: len(tier)]) == set(tier)
        assert order[len(tier) :] == [r.offer.id for r in ranked[len(tier) :]]
    # The same label starts at the same offer in every worker; no tolerance, no spreading.
    assert [r.offer.id for r in spread_order(ranked, "run-7", 0.05)] == orders[7]
    assert [r.offer.id for r in spread_order(ranked, "run-7", 0.0)] == [r.offer.id for r in ranked]


def test_concurrent_allocations_rarely_ask_for_the_same_offer(
    settings: Settings, tmp_path: Path
) -> None:
    runs = 12
    # Near-equal offers (within 5 % of the best), then clearly dearer ones.
    offers = [make_offer(n, dph_total=0.300 + n / 1000) for n in range(1, 17)]
    offers += [make_offer(n, dph_total=0.50) for n in range(17, 23)]
    with fake_vast(settings, tmp_path / "hosts", offers, runner_command=SLEEPER, limits=True) as (
        fake,
        s,
    ):
        provider = VastProvider(s.model_copy(update={"vast_offers_per_allocation": runs}))
        with ThreadPoolExecutor(runs) as pool:
            rented = list(
                pool.map(
                    lambda n: provider.create(label(s, f"run-{n}"), JOB_URL, GpuRequirements()),
                    range(runs),
                )
            )

    creates = len(fake.calls_to("create"))
    print(f"{creates} creates for {runs} concurrent allocations")
    assert len({i.instance_id for i in rented}) == runs
    # Walking one list from the top, each allocation would ask for every offer taken before.
    assert creates < 2 * runs
    # Nobody rented a clearly dearer offer while near-equal ones were free.
    assert all(i.dollars_per_hour is not None and i.dollars_per_hour < 0.5 for i in rented)
    assert fake.limit_429s == []


def test_excluded_machines_and_unfit_offers_are_never_rented(
    settings: Settings, tmp_path: Path
) -> None:
    offers = [
        make_offer(1, dph_total=0.2),  # its machine already failed in this run
        make_offer(2, dph_total=0.2, geolocation="China, CN"),  # blocked country
        make_offer(3, dph_total=0.2, cuda_max_good=11.8),  # too old a driver for the image
        make_offer(4, dph_total=0.2, num_gpus=2),  # two GPUs, twice the price
        make_offer(5, dph_total=0.9),
    ]
    with fake_vast(settings, tmp_path, offers, runner_command=SLEEPER) as (fake, s):
        provider = VastProvider(s)
        # The fake applies filters like Vast does; a host that lies about them is caught too.
        fake.offer_queries.clear()
        requirements = GpuRequirements(blocked_countries=["CN"])
        ranked = provider.ranked_offers(requirements, exclude_machine_ids=["10001"])
        assert [r.offer.id for r in ranked] == [5]
        instance = provider.create(label(s), JOB_URL, requirements, exclude_machine_ids=["10001"])
        assert instance.machine_id == "10005"


def test_no_fitting_offer_is_a_no_offer_error(vast: VastRig) -> None:
    fake, settings, provider = vast

    with pytest.raises(NoOfferError):
        provider.create(label(settings), JOB_URL, GpuRequirements(min_vram_gb=80))
    assert fake.created() == []


def test_429_bursts_are_waited_out_and_5xx_retried_by_the_activity(
    vast: VastRig,
) -> None:
    fake, _, provider = vast
    fake.rate_limit(2, retry_after_s=0.2)
    started = time.monotonic()
    assert provider.list_instances() == []
    assert time.monotonic() - started >= 0.4  # Retry-After honoured twice

    fake.server_errors(1, status=500)
    with pytest.raises(VastApiError, match="HTTP 500"):
        provider.list_instances()
    assert provider.list_instances() == []


def test_boot_watch_maps_host_failures_to_exited_with_the_hosts_reason(
    settings: Settings, tmp_path: Path
) -> None:
    offers = [make_offer(1), make_offer(2), make_offer(3), make_offer(4)]
    with fake_vast(settings, tmp_path, offers, runner_command=SLEEPER) as (fake, s):
        fake.machine_faults.update({10001: "exits", 10002: "pull_error", 10003: "stuck_loading"})
        provider = VastProvider(s)
        requirements = GpuRequirements()
        made = {}
        for machine in (10001, 10002, 10003, 10004):
            others = [str(m) for m in (10001, 10002, 10003, 10004) if m != machine]
            made[machine] = provider.create(
                label(s, f"run-{machine}"), JOB_URL, requirements, exclude_machine_ids=others
            )
        wait_until(lambda: all(i.actual_status for i in fake.created()))

        states = {m: provider.get(i.instance_id) for m, i in made.items()}
        exited, pulled, loading, running = (states[m] for m in (10001, 10002, 10003, 10004))
        assert exited is not None and exited.state == "exited"
        assert "container exited" in (exited.message or "")
        assert pulled is not None and pulled.state == "exited"
        assert PULL_ERROR in (pulled.message or "")
        assert loading is not None and loading.state == "starting"
        assert running is not None and running.state == "running"

        # The runner's exit is the container's exit.
        victim = fake.instances[int(running.instance_id)]
        assert victim.process is not None
        victim.process.kill()
        gone = wait_until(
            lambda: (i := provider.get(running.instance_id)) and i.state == "exited" and i
        )
        assert "container exited with code -9" in (gone.message or "")


def test_destroy_kills_the_host_confirms_and_treats_not_found_as_done(
    vast: VastRig,
) -> None:
    fake, settings, provider = vast
    instance = provider.create(label(settings), JOB_URL, GpuRequirements())
    wait_until(lambda: fake.instances[int(instance.instance_id)].process is not None)
    process = fake.instances[int(instance.instance_id)].process
    assert process is not None

    assert provider.destroy(instance.instance_id) is True
    assert provider.get(instance.instance_id) is None
    assert provider.destroy(instance.instance_id) is False
    assert provider.destroy("999999") is False
    assert provider.find(instance.label) is None
    assert fake.destroyed_ids() == [int(instance.instance_id)]
    wait_until(lambda: process.poll() is not None)


def test_listing_pages_through_every_instance(settings: Settings, tmp_path: Path) -> None:
    offers = [make_offer(i) for i in range(1, 31)]
    with fake_vast(settings, tmp_path, offers, runner_command=SLEEPER) as (fake, s):
        for offer in offers:
            fake.machine_faults[offer["machine_id"]] = "stuck_loading"  # no processes
        provider = VastProvider(s)
        for i in range(30):
            provider.create(label(s, f"run-{i}"), JOB_URL, GpuRequirements())

        listed = provider.list_instances()

        assert len(listed) == 30 > 25  # more than one page
        assert sorted(i.label for i in listed) == sorted(label(s, f"run-{i}") for i in range(30))
        prefix = run_label_prefix(s.deployment_name, "run-1")  # not run-10 .. run-19
        assert [i.label for i in provider.list_instances(prefix)] == [label(s, "run-1")]


def test_allocation_is_idempotent_and_release_touches_only_this_deployment(
    vast: VastRig,
) -> None:
    fake, settings, provider = vast
    activities = GpuActivities(provider, settings)
    env = ActivityEnvironment()
    allocation = AllocateGpuInput(
        run_id="run-1",
        attempt=1,
        job_url=JOB_URL,
        requirements=GpuRequirements(),
        exclude_machine_ids=["10002"],
        download_bytes=2 * GB,
    )
    first = env.run(activities.allocate_gpu, allocation)
    again = env.run(activities.allocate_gpu, allocation)
    assert again.instance_id == first.instance_id
    assert len(fake.created()) == 1
    assert first.machine_id != "10002"

    other = settings.model_copy(update={"deployment": "someone.else"})
    theirs = GpuActivities(VastProvider(other), other)
    neighbour = env.run(theirs.allocate_gpu, allocation)
    assert neighbour.instance_id != first.instance_id

    assert [i.instance_id for i in env.run(activities.list_labelled_instances)] == [
        first.instance_id
    ]
    assert env.run(activities.release_run_gpus, RunRef(run_id="run-1")) == [first.instance_id]
    assert fake.destroyed_ids() == [int(first.instance_id)]
    assert [i.id for i in fake.live()] == [int(neighbour.instance_id)]


def test_no_offer_becomes_a_retryable_activity_error(vast: VastRig) -> None:
    fake, settings, provider = vast
    fake.offers.clear()
    activities = GpuActivities(provider, settings)
    allocation = AllocateGpuInput(
        run_id="run-1", attempt=1, job_url=JOB_URL, requirements=GpuRequirements()
    )
    with pytest.raises(ApplicationError) as raised:
        ActivityEnvironment().run(activities.allocate_gpu, allocation)
    assert raised.value.type == "NoGpuOffer" and not raised.value.non_retryable
    assert JOB_URL not in raised.value.message


def test_a_wrong_api_key_is_refused_by_the_fake(vast: VastRig) -> None:
    settings = vast.settings

    wrong = VastProvider(settings.model_copy(update={"vast_api_key": SecretStr("nope")}))
    with pytest.raises(VastApiError, match="401"):
        wrong.list_instances()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"vast_api_key": None}, "LORA_VAST_API_KEY is not set"),
        ({"s3_public_endpoint_url": None}, "LORA_S3_PUBLIC_ENDPOINT_URL is not set"),
        (
            {"s3_public_endpoint_url": "http://127.0.0.1:9000"},
            "LORA_S3_PUBLIC_ENDPOINT_URL=http://127.0.0.1:9000 is a loopback address",
        ),
        (
            {"relay_public_url": "http://localhost:8088"},
            "LORA_RELAY_PUBLIC_URL=http://localhost:8088 is a loopback address",
        ),
        ({"relay_public_url": "http://[::1]:8088"}, "is a loopback address"),
    ],
)
def test_the_worker_refuses_vast_with_addresses_a_gpu_cannot_reach(
    settings: Settings, changes: dict[str, object], reason: str
) -> None:
    good = settings.model_copy(
        update={
            "gpu_provider": "vast",
            "vast_api_key": SecretStr(VAST_KEY_FOR_CHECKS),
            "s3_public_endpoint_url": "https://s3.example.com",
            "relay_public_url": "https://relay.example.com",
        }
    )
    assert vast_settings_problem(good) is None
    assert isinstance(gpu_provider(good), VastProvider)
    bad = good.model_copy(update=changes)
    with pytest.raises(ProviderConfigError) as raised:
        gpu_provider(bad)
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)


VAST_KEY_FOR_CHECKS = "checks-only-key"


def test_loratrain_worker_names_the_unreachable_address_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    env.update(
        {
            "LORA_STATE_DIR": str(tmp_path / "state"),
            "LORA_CODEC_KEY": "bG9yYXRyYWluLXRlc3QtY29kZWMta2V5LTMyLWJ5dGU=",
            "LORA_WEBHOOK_MASTER_SECRET": "test-master-secret",
            "LORA_GPU_PROVIDER": "vast",
            "LORA_VAST_API_KEY": VAST_KEY_FOR_CHECKS,
            "LORA_S3_PUBLIC_ENDPOINT_URL": "http://127.0.0.1:9000",
            "LORA_RELAY_PUBLIC_URL": "https://relay.example.com",
            # Nothing listens here: the refusal must come before any connection.
            "LORA_TEMPORAL_ADDRESS": "127.0.0.1:9",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: LORA_S3_PUBLIC_ENDPOINT_URL=http://127.0.0.1:9000 is a loopback address that "
        "Vast GPUs cannot reach; set it to an address reachable from the internet"
    ], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
