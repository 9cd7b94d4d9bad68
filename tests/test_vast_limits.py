"""The Vast provider within Vast's real rate limits: the fake enforces them, shrunk x0.05.

Vast limits each endpoint by a minimum interval per API key and answers 429 without
Retry-After (tests/fakes/vast_api.py, VAST_LIMITS). These tests count the 429s the fake sent.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from vastai.api import instances as vast_instances
from vastai.api.client import VastClient

from activities.providers.base import instance_label, run_label_prefix
from activities.providers.vast import PaceTimeout, VastProvider, _EndpointPace
from common.settings import Settings
from workflows.models import GpuRequirements

from .fakes.vast_api import VAST_LIMITS, FakeVast, make_offer
from .vast_support import LIMIT_SCALE, VAST_KEY, fake_vast, wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
JOB_URL = "http://s3.example/runs/r/job.json?X-Amz-Signature=secret"
OFFERS = [make_offer(n, dph_total=0.30 + n / 100) for n in range(1, 11)]


class LimitedRig(NamedTuple):
    fake: FakeVast
    settings: Settings
    provider: VastProvider


@pytest.fixture
def limited(settings: Settings, tmp_path: Path) -> Iterator[LimitedRig]:
    with fake_vast(settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPER, limits=True) as (
        fake,
        s,
    ):
        s = s.model_copy(update={"vast_offers_per_allocation": len(OFFERS)})
        yield LimitedRig(fake, s, VastProvider(s))


def label(settings: Settings, run_id: str = "run-1") -> str:
    return instance_label(settings.deployment_name, run_id, 1)


def gaps(fake: FakeVast, endpoint: str) -> list[float]:
    times = [arrival for _, _, arrival, _ in fake.calls_to(endpoint)]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def test_the_settings_default_to_vasts_documented_limits() -> None:
    defaults = Settings.model_fields
    assert defaults["vast_show_interval_s"].default == VAST_LIMITS["show"] == 2.0
    assert defaults["vast_destroy_interval_s"].default == VAST_LIMITS["destroy"] == 3.0
    assert defaults["vast_create_interval_s"].default == VAST_LIMITS["create"] == 4.5
    assert defaults["vast_create_penalty_s"].default == VAST_LIMITS["create_penalty"] == 12.0
    assert defaults["vast_list_interval_s"].default == VAST_LIMITS["list"] == 1.0
    assert defaults["vast_searches_per_window"].default == VAST_LIMITS["searches_per_minute"]
    assert defaults["vast_search_window_s"].default == 60.0
    # The SDK's own default for a slow create, not the 30 s of other calls.
    assert defaults["vast_create_timeout_s"].default == 120.0


def test_providers_on_one_key_share_one_paced_client(limited: LimitedRig) -> None:
    _, settings, provider = limited
    assert VastProvider(settings).client is provider.client


def test_calls_from_many_threads_never_trip_a_429(limited: LimitedRig) -> None:
    fake, settings, provider = limited

    runs = [f"run-{n}" for n in range(6)]
    all_rented = threading.Barrier(len(runs))

    def one_run(run_id: str) -> tuple[bool, bool]:
        run_label = label(settings, run_id)
        instance = provider.create(run_label, JOB_URL, GpuRequirements())
        found = provider.find(run_label)
        assert provider.get(instance.instance_id) is not None
        listed = provider.list_instances(run_label_prefix(settings.deployment_name, run_id))
        assert [i.instance_id for i in listed] == [instance.instance_id]
        all_rented.wait(timeout=60)  # every run holds its instance at once
        return (
            found is not None and found.instance_id == instance.instance_id,
            provider.destroy(instance.instance_id),
        )

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(one_run, runs))

    calls = Counter(endpoint for endpoint, _, _, _ in fake.calls)
    print("calls per endpoint:", dict(calls), "429s:", len(fake.limit_429s))
    assert fake.limit_429s == []
    assert results == [(True, True)] * len(runs)  # every destroy reported success
    # They raced for the same best offers: each was refused or rented, one at create's pace.
    assert sorted(i.offer["id"] for i in fake.created()) == [1, 2, 3, 4, 5, 6]
    assert sorted(i.label for i in fake.created()) == sorted(label(settings, r) for r in runs)
    assert fake.live() == []
    for endpoint in ("create", "show", "destroy", "list"):
        assert min(gaps(fake, endpoint)) >= VAST_LIMITS[endpoint] * LIMIT_SCALE


def test_a_destroy_that_succeeded_reports_success_after_a_few_paced_checks(
    limited: LimitedRig,
) -> None:
    fake, settings, provider = limited
    instance = provider.create(label(settings), JOB_URL, GpuRequirements())
    # Vast keeps showing a destroyed instance a while (three show intervals here).
    fake.destroy_unlist_delay_s = 3 * settings.vast_show_interval_s
    shows_before = len(fake.calls_to("show"))

    assert provider.destroy(instance.instance_id) is True

    checks = fake.calls_to("show")[shows_before:]
    assert 1 <= len(checks) <= 4  # backing off, not a 0.25 s poll
    assert fake.destroyed_ids() == [int(instance.instance_id)]
    assert fake.limit_429s == []


def test_offers_are_tried_at_creates_pace(limited: LimitedRig) -> None:
    fake, settings, provider = limited
    fake.machine_faults.update({10001: "taken", 10002: "taken"})

    instance = provider.create(label(settings), JOB_URL, GpuRequirements())

    assert instance.machine_id == "10003"
    assert len(fake.calls_to("create")) == 3
    assert min(gaps(fake, "create")) >= VAST_LIMITS["create"] * LIMIT_SCALE
    assert fake.limit_429s == []


def test_a_create_that_times_out_is_settled_by_its_label_and_never_sent_again(
    settings: Settings, tmp_path: Path
) -> None:
    with fake_vast(settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPER, limits=True) as (
        fake,
        s,
    ):
        s = s.model_copy(update={"vast_create_timeout_s": 0.5, "vast_create_settle_s": 20.0})
        provider = VastProvider(s)
        fake.create_delay_s = 1.5  # Vast makes the instance after the client gave up
        run_label = label(s)

        with ThreadPoolExecutor(2) as pool:
            creating = pool.submit(provider.create, run_label, JOB_URL, GpuRequirements())
            wait_until(lambda: fake.calls_to("create"))
            # A retried allocation asks for the label while the create is in flight.
            looking = pool.submit(provider.find, run_label)
            instance = creating.result(timeout=60)
            found = looking.result(timeout=60)

        assert found is not None and found.instance_id == instance.instance_id
        assert len(fake.calls_to("create")) == 1
        assert [i.label for i in fake.created()] == [run_label]
        assert fake.limit_429s == []


def test_a_429_from_another_process_on_the_key_waits_out_the_create_penalty(
    settings: Settings, tmp_path: Path
) -> None:
    scale = 0.2
    with fake_vast(
        settings, tmp_path / "hosts", OFFERS, runner_command=SLEEPER, limits=True, limit_scale=scale
    ) as (fake, s):
        provider = VastProvider(s)
        provider.ranked_offers(GpuRequirements())  # the search's connection, warmed
        other_worker = VastClient(api_key=VAST_KEY, server_url=s.vast_base_url, retry=1)
        vast_instances.create_instance(
            other_worker, 10, image=s.vast_image, runtype="args", label="someone-else"
        )
        # Whatever this machine's speed, ours comes inside the other process's interval.
        fake.spent_by_another.add("create")
        started = time.monotonic()

        instance = provider.create(label(s), JOB_URL, GpuRequirements())

        assert time.monotonic() - started >= VAST_LIMITS["create_penalty"] * scale
        assert [endpoint for endpoint, _, _ in fake.limit_429s] == ["create"]  # ours, once
        assert [i.label for i in fake.created()] == ["someone-else", instance.label]


def test_a_turn_that_would_come_too_late_fails_at_once_instead_of_holding_a_thread() -> None:
    """Instance checks queue at show's pace; one whose turn lies past the wait it may take is
    not asked (the next check tries again), so queued checks never hold the worker's threads."""
    pace = _EndpointPace()
    with pace.turn(1, 60.0):
        pass
    started = time.monotonic()
    with pytest.raises(PaceTimeout, match=r"within 0\.2 s"), pace.turn(1, 60.0, max_wait_s=0.2):
        pass
    assert time.monotonic() - started < 30  # not the minute the window asks


def test_a_turn_held_by_another_thread_times_out_too() -> None:
    pace = _EndpointPace()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pace.turn(1, 0.0):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        with pytest.raises(PaceTimeout), pace.turn(1, 0.0, max_wait_s=0.1):
            pass
    finally:
        release.set()
        holder.join()
