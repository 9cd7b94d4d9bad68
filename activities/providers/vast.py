"""The Vast.ai GPU provider, on the `vastai` SDK's sync API (`vastai.api.offers` / `.instances`).

Why the sync API: the provider protocol is sync and the GPU activities already run on the
worker's thread pool, so the async client (aiohttp) would buy nothing. Nothing here speaks HTTP
to Vast by hand: the SDK's functions build every request, and `PacedVastClient` (the SDK's
client with its one request method replaced) decides when each is sent.

Rate limits: Vast limits each endpoint by a minimum interval per API key (show instance 2 s,
destroy 3 s, create 4.5 s with a 12 s penalty when one comes sooner, list instances 1 s, offer
search 10 a minute) and answers 429 without Retry-After. One `PacedVastClient` per key and
Vast address per process (`paced_client`) waits out each endpoint's interval since that key's
last answer there, and on a 429 (another process on the key) waits the interval, the create's
penalty, before trying again. A create is never sent twice: an answer lost to a timeout, a 5xx
or a dropped connection is settled by looking the instance up by its label, and any lookup of
a label waits for this process's create of that label to finish first.

Offer search: one GPU, `gpu_ram >= min_vram_gb x 1000` (MB, the SDK's own multiplier), `dph_total
<= max $/h`, reliability, disk, download bandwidth, a CUDA version the runner image supports,
the GPU names, allowed/blocked countries and the machines that already failed in this run;
verified + rentable + not rented are the SDK's defaults. Every answer is checked again here
(Vast's filters are a convenience, not a guarantee), so an offer that slips through is dropped.

Ranking, by the expected dollars of the whole run on that offer (`vast_cost.run_cost`, where the
formula and Vast's billing rules it follows are written down):

    training_s = reference_training_s x reference_dlperf / dlperf      (reference_s if no dlperf)
    run_usd    = run_cost(image_bytes, boot_overhead_s, download_bytes, work_s = training_s,
                          upload_bytes = reference_upload_bytes)
               (the image pull and boot at the disk's $/h only, the GPU's dph_total from
                `running`, bandwidth both ways at the offer's $/GiB)
    expected   = run_usd / reliability

A host that fails with probability (1 - reliability) costs the run another attempt, so
1 / reliability is the expected number of attempts. Cheaper $/h loses to a faster GPU or a
faster link when it makes the run longer; a metered link counts for what it bills.

Spreading concurrent allocations: offers whose expected cost is within
`vast_offer_tier_tolerance` (5 %) of the best form a tier of near-equals. Each allocation starts
at a position in that tier chosen from its label (sha256, so every worker agrees), walks the
tier round from there, then the rest in order. Runs renting at once then ask for different
offers instead of all fighting over the first one (each lost fight costs a create, 4.5 s of the
key's create pace), and no offer clearly worse than the best is asked for first.

Instance states, from Vast's `actual_status` / `cur_state` / `intended_status` / `status_msg`:
`running` -> running; null, `loading`, `created`, `rebooting` -> starting, unless `status_msg`
reports an error (image pull, docker) -> exited with that message; `exited`, `offline`,
`unknown`, `stopped`, `frozen` -> exited with the host's reason (we never stop or freeze our
own instances, so a stop means the runner gave up); `cur_state` `unloaded` or a missing
instance -> gone / None.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from vastai.api import instances as vast_instances
from vastai.api import offers as vast_offers
from vastai.api.client import VastClient, VastSession, is_search_quota_exceeded

from common.settings import Settings
from workflows.models import GpuRequirements

from .base import Instance, InstanceState, NoOfferError
from .vast_cost import OfferPrices, RunCost, run_cost

log = logging.getLogger("loratrain.vast")

PROVIDER_NAME = "vast"
_STARTING = frozenset({None, "", "loading", "created", "rebooting", "scheduling"})
_HOST_GAVE_UP = frozenset({"exited", "offline", "unknown", "stopped", "frozen"})
# status_msg words that mean the container will never start (pull/daemon errors).
_STATUS_ERROR = re.compile(
    r"error|failed|denied|unauthorized|manifest unknown|not found|no such image|cannot|oci runtime",
    re.IGNORECASE,
)


class VastApiError(Exception):
    """Vast answered something unusable; retryable (the activity tries again)."""


class PaceTimeout(VastApiError):
    """A call's turn at Vast's rate limit would come too late: not asked (retryable)."""


class _Offer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    machine_id: int
    host_id: int | None = None
    gpu_name: str
    num_gpus: int
    gpu_ram: float = Field(description="MB")
    dph_total: float = Field(gt=0)
    reliability: float = Field(
        default=0.0, validation_alias=AliasChoices("reliability", "reliability2")
    )
    inet_down: float = Field(default=0.0, description="Mb/s")
    inet_down_cost: float | None = Field(default=None, description="$/GiB")
    inet_up_cost: float | None = Field(default=None, description="$/GiB")
    storage_total_cost: float | None = Field(
        default=None, description="$/h for the disk the search asked for"
    )
    geolocation: str | None = None
    cuda_max_good: float | None = None
    dlperf: float | None = None
    disk_space: float = Field(default=0.0, description="GB")

    @property
    def country(self) -> str | None:
        return country_of(self.geolocation)

    @property
    def prices(self) -> OfferPrices:
        return OfferPrices(
            dollars_per_hour=self.dph_total,
            storage_dollars_per_hour=self.storage_total_cost or 0.0,
            # A Vast offer that reports no download speed is slow, not instant (0 means local).
            download_mbps=max(self.inet_down, 1.0),
            download_dollars_per_gib=self.inet_down_cost or 0.0,
            upload_dollars_per_gib=self.inet_up_cost or 0.0,
        )


class _InstanceRow(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    label: str | None = None
    actual_status: str | None = None
    cur_state: str | None = None
    intended_status: str | None = None
    status_msg: str | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    machine_id: int | None = None
    host_id: int | None = None
    geolocation: str | None = None
    start_date: float | None = None  # epoch seconds of the instance's creation


@dataclass(frozen=True)
class RankedOffer:
    offer: _Offer
    training_s: float
    cost: RunCost
    expected_usd: float

    @property
    def run_usd(self) -> float:
        return self.cost.usd

    def describe(self) -> str:
        o, c = self.offer, self.cost
        return (
            f"offer {o.id} {o.gpu_name} ${o.dph_total:.3f}/h {o.inet_down:.0f} Mb/s "
            f"${o.inet_down_cost or 0:.4f}/${o.inet_up_cost or 0:.4f} per GiB down/up "
            f"dlperf {o.dlperf or 0:.1f} rel {o.reliability:.3f} {o.country or '??'}: pull "
            f"{c.pull_s:.0f} s, billed {c.download_s:.0f} s download + {self.training_s:.0f} s "
            f"training -> ${c.usd:.3f}, expected ${self.expected_usd:.3f}"
        )


def country_of(geolocation: str | None) -> str | None:
    """The ISO country code at the end of Vast's geolocation ("Sweden, SE" -> "SE")."""
    if not geolocation:
        return None
    code = geolocation.rsplit(",", 1)[-1].strip().upper()
    return code if re.fullmatch(r"[A-Z]{2}", code) else None


def disk_gb_for(settings: Settings, requirements: GpuRequirements, download_bytes: int) -> int:
    """Disk for the image, the downloads twice (zip + unzipped copy) and a margin."""
    needed = (settings.vast_image_bytes + 2 * download_bytes) / 1e9 + settings.vast_disk_margin_gb
    return max(requirements.disk_gb, math.ceil(needed))


def offer_query(
    settings: Settings,
    requirements: GpuRequirements,
    *,
    disk_gb: int,
    exclude_machine_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """The search filters (the SDK adds verified/rentable/not rented, order, limit, type)."""
    query: dict[str, Any] = {
        "num_gpus": {"eq": 1},
        "gpu_ram": {"gte": requirements.min_vram_gb * 1000},
        "dph_total": {"lte": requirements.max_dollars_per_hour},
        "reliability": {"gte": requirements.min_reliability},
        "disk_space": {"gte": disk_gb},
        "inet_down": {"gte": requirements.min_download_mbps},
        "cuda_max_good": {"gte": settings.vast_min_cuda},
    }
    if requirements.gpu_names:
        query["gpu_name"] = {"in": list(requirements.gpu_names)}
    if requirements.countries:
        query["geolocation"] = {"in": list(requirements.countries)}
    elif requirements.blocked_countries:
        query["geolocation"] = {"notin": list(requirements.blocked_countries)}
    excluded = sorted(int(m) for m in exclude_machine_ids if m.isdigit())
    if excluded:
        query["machine_id"] = {"notin": excluded}
    return query


def why_unsuitable(
    offer: _Offer,
    settings: Settings,
    requirements: GpuRequirements,
    disk_gb: int,
    excluded: set[str],
) -> str | None:
    """Why an offer Vast returned does not fit after all, or None when it fits."""
    country = offer.country
    checks = [
        (offer.num_gpus != 1, f"{offer.num_gpus} GPUs"),
        (offer.gpu_ram < requirements.min_vram_gb * 1000, f"{offer.gpu_ram:.0f} MB VRAM"),
        (offer.dph_total > requirements.max_dollars_per_hour, f"${offer.dph_total}/h"),
        (offer.reliability < requirements.min_reliability, f"reliability {offer.reliability}"),
        (offer.disk_space < disk_gb, f"{offer.disk_space:.0f} GB disk"),
        (offer.inet_down < requirements.min_download_mbps, f"{offer.inet_down} Mbps"),
        (
            offer.cuda_max_good is None or offer.cuda_max_good < settings.vast_min_cuda,
            f"CUDA {offer.cuda_max_good}",
        ),
        (
            bool(requirements.gpu_names) and offer.gpu_name not in requirements.gpu_names,
            f"GPU {offer.gpu_name}",
        ),
        (
            bool(requirements.countries) and country not in requirements.countries,
            f"country {country}",
        ),
        (
            bool(requirements.blocked_countries)
            and (country is None or country in requirements.blocked_countries),
            f"country {country}",
        ),
        (str(offer.machine_id) in excluded, f"machine {offer.machine_id} already failed"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def rank_offers(
    offers: Sequence[_Offer], settings: Settings, download_bytes: int
) -> list[RankedOffer]:
    """Offers by expected cost of the whole run, cheapest first (formula in the module doc)."""
    ranked = []
    for offer in offers:
        if offer.dlperf and offer.dlperf > 0:
            training_s = (
                settings.vast_reference_training_s * settings.vast_reference_dlperf / offer.dlperf
            )
        else:
            training_s = settings.vast_reference_training_s
        cost = run_cost(
            offer.prices,
            image_bytes=settings.vast_image_bytes,
            boot_s=settings.vast_boot_overhead_s,
            download_bytes=download_bytes,
            work_s=training_s,
            upload_bytes=settings.vast_reference_upload_bytes,
        )
        expected = cost.usd / max(offer.reliability, 0.01)
        ranked.append(RankedOffer(offer, training_s, cost, expected))
    return sorted(ranked, key=lambda r: (r.expected_usd, r.offer.id))


def spread_order(ranked: Sequence[RankedOffer], label: str, tolerance: float) -> list[RankedOffer]:
    """The ranked offers in the order this allocation tries them (module doc): the tier within
    `tolerance` of the best, from a position its label picks and round, then the rest."""
    if not ranked:
        return []
    ceiling = ranked[0].expected_usd * (1 + tolerance)
    tier = next((i for i, r in enumerate(ranked) if r.expected_usd > ceiling), len(ranked))
    start = int.from_bytes(hashlib.sha256(label.encode("utf-8")).digest()[:8], "big") % tier
    return [*ranked[start:tier], *ranked[:start], *ranked[tier:]]


def instance_state(row: _InstanceRow) -> tuple[InstanceState, str | None]:
    """Vast's view of an instance as our state and the host's reason (module doc)."""
    status, message = row.actual_status, row.status_msg or None
    if row.cur_state == "unloaded":
        return "gone", "destroyed"
    if status == "running":
        return "running", message
    if status in _HOST_GAVE_UP:
        reason = {
            "offline": "host went offline",
            "unknown": "host stopped reporting (no heartbeat)",
        }.get(status or "", f"container {status}")
        return "exited", f"{reason}: {message}" if message else reason
    if message and _STATUS_ERROR.search(message):
        return "exited", f"container failed to start: {message}"
    if status in _STARTING:
        return "starting", message
    return "starting", f"unrecognised status {status!r}: {message}"


def _http_status(error: requests.RequestException) -> int | None:
    response = error.response
    return None if response is None else response.status_code


def _vast_message(error: requests.RequestException) -> str:
    """Vast's own words from an error answer ({"error": ..., "msg": ...}), for logs and users."""
    response = error.response
    if response is None:
        return f"{type(error).__name__}: {error}"
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if isinstance(body, dict):
        words = [str(body[k]) for k in ("error", "msg") if body.get(k)]
        if words:
            return f"HTTP {response.status_code}: {' - '.join(words)}"
    return f"HTTP {response.status_code}"


# -- pacing ---------------------------------------------------------------------------------

Endpoint = str  # "search" | "create" | "list" | "show" | "destroy"
_ENDPOINTS: tuple[tuple[str, re.Pattern[str], Endpoint], ...] = (
    ("POST", re.compile(r"/api/v0/bundles/$"), "search"),
    ("PUT", re.compile(r"/api/v0/asks/\d+/$"), "create"),
    ("GET", re.compile(r"/api/v1/instances/$"), "list"),
    ("GET", re.compile(r"/api/v0/instances/\d+/$"), "show"),
    ("DELETE", re.compile(r"/api/v0/instances/\d+/$"), "destroy"),
)
_TRANSIENT_STATUS = frozenset({502, 503, 504})


def endpoint_of(method: str, url: str) -> Endpoint | None:
    """Which rate-limited Vast endpoint a request goes to, or None for one we do not pace."""
    path = urlsplit(url).path
    return next(
        (name for verb, pattern, name in _ENDPOINTS if verb == method and pattern.search(path)),
        None,
    )


@dataclass(frozen=True)
class VastLimits:
    """Vast's documented limits for one API key, as settings (tests shrink them)."""

    show_s: float
    destroy_s: float
    create_s: float
    create_penalty_s: float
    list_s: float
    searches_per_window: int
    search_window_s: float
    rate_limit_retries: int

    @classmethod
    def from_settings(cls, settings: Settings) -> VastLimits:
        return cls(
            show_s=settings.vast_show_interval_s,
            destroy_s=settings.vast_destroy_interval_s,
            create_s=settings.vast_create_interval_s,
            create_penalty_s=settings.vast_create_penalty_s,
            list_s=settings.vast_list_interval_s,
            searches_per_window=settings.vast_searches_per_window,
            search_window_s=settings.vast_search_window_s,
            rate_limit_retries=settings.vast_rate_limit_retries,
        )

    def window(self, endpoint: Endpoint) -> tuple[int, float]:
        """(calls, seconds): at most that many calls in any window of that many seconds."""
        if endpoint == "search":
            return self.searches_per_window, self.search_window_s
        interval = {"show": self.show_s, "destroy": self.destroy_s, "create": self.create_s}
        return 1, interval.get(endpoint, self.list_s)

    def after_429(self, endpoint: Endpoint) -> float:
        """How long a 429 blocks the endpoint: its interval, or the create's penalty."""
        if endpoint == "create":
            return self.create_penalty_s
        calls, window_s = self.window(endpoint)
        return window_s / calls


class _EndpointPace:
    """One endpoint's calls for one key: at most `calls` answers per window, one at a time.

    The lock is held through the request and the window counts from each answer, so the next
    request reaches Vast at least a full interval after the last one did (Vast measures from
    its arrival, which lies before our answer).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: deque[float] = deque()
        self.blocked_until = 0.0

    @contextlib.contextmanager
    def turn(self, calls: int, window_s: float, max_wait_s: float | None = None) -> Iterator[None]:
        """This thread's turn at the endpoint; `PaceTimeout` when it would come later than
        `max_wait_s` from now (None: wait as long as it takes)."""
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        if not self.lock.acquire(timeout=-1 if max_wait_s is None else max_wait_s):
            raise PaceTimeout(f"no turn at Vast's rate limit within {max_wait_s:g} s")
        try:
            while True:
                now = time.monotonic()
                while self.answers and self.answers[0] <= now - window_s:
                    self.answers.popleft()
                wait = self.blocked_until - now
                if len(self.answers) >= calls:
                    wait = max(wait, self.answers[-calls] + window_s - now)
                if wait <= 0:
                    break
                if deadline is not None and now + wait > deadline:
                    raise PaceTimeout(f"no turn at Vast's rate limit within {max_wait_s:g} s")
                time.sleep(wait)
            try:
                yield
            finally:
                self.answers.append(time.monotonic())
        finally:
            self.lock.release()


class _CreatesInFlight:
    """The labels this process is creating an instance for right now."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._labels: set[str] = set()

    @contextlib.contextmanager
    def creating(self, label: str) -> Iterator[bool]:
        """Hold the label for one create; yields whether another create of it was waited out."""
        waited = self.wait_out(label, claim=True)
        try:
            yield waited
        finally:
            with self._changed:
                self._labels.discard(label)
                self._changed.notify_all()

    def wait_out(self, label: str, *, claim: bool = False) -> bool:
        """Wait until no create of this label is in flight here; whether there was one."""
        with self._changed:
            waited = label in self._labels
            while label in self._labels:
                self._changed.wait()
            if claim:
                self._labels.add(label)
            return waited


class PacedVastClient(VastClient):  # type: ignore[misc]  # the SDK has no type hints
    """The SDK's client, keeping every call within Vast's per-endpoint limits for its key.

    Replaces `VastClient._request` (the one place the SDK sends): the SDK's own loop backs off
    0.15 s x 1.5^n on a 429, far inside Vast's intervals, and re-sends a create whose answer
    timed out, which can rent a second instance.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.vast_api_key is None:
            raise ValueError("LORA_VAST_API_KEY is not set (the Vast provider needs it)")
        super().__init__(
            api_key=settings.vast_api_key.get_secret_value(),
            server_url=settings.vast_base_url.rstrip("/"),
        )
        self.configure(settings)
        self._paces = {name: _EndpointPace() for _, _, name in _ENDPOINTS}
        self.creates = _CreatesInFlight()

    def configure(self, settings: Settings) -> None:
        """The limits, tries and timeouts of these settings (the last provider built wins)."""
        self.limits = VastLimits.from_settings(settings)
        self.retry = settings.vast_sdk_retries
        self.timeout = settings.http_timeout_s
        self.create_timeout_s = settings.vast_create_timeout_s
        self.pace_max_wait_s = settings.vast_pace_max_wait_s

    def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        json_data: Any = None,
        timeout: float | None = None,
    ) -> requests.Response:
        endpoint = endpoint_of(method, url)
        pace = self._paces.get(endpoint) if endpoint else None
        if timeout is None:
            timeout = self.create_timeout_s if endpoint == "create" else self.timeout
        rate_limited = transient = 0
        backoff = 0.15
        while True:
            limits = self.limits
            max_wait = None if endpoint == "create" else self.pace_max_wait_s
            turn = pace.turn(*limits.window(endpoint), max_wait) if pace and endpoint else None
            with turn or contextlib.nullcontext():
                try:
                    response = self._send(method, url, headers, json_data, timeout)
                except (requests.ConnectionError, requests.Timeout):
                    # A create may have reached Vast: the provider settles it by its label.
                    if endpoint == "create" or transient >= self.retry - 1:
                        raise
                    response = None
                throttled = (
                    response is not None
                    and response.status_code == 429
                    and endpoint is not None
                    and not is_search_quota_exceeded(response)
                    and rate_limited < limits.rate_limit_retries
                )
                if throttled and endpoint is not None and pace is not None:
                    # Another process on this key spent the interval (Vast sends no
                    # Retry-After): the endpoint waits it out here, for every thread.
                    wait_s = max(limits.after_429(endpoint), _retry_after_s(response))
                    pace.blocked_until = time.monotonic() + wait_s
            if throttled:
                rate_limited += 1
                log.warning("Vast answered 429 to %s %s; waiting its interval", method, endpoint)
                continue
            retryable = response is None or response.status_code in _TRANSIENT_STATUS
            if retryable and endpoint != "create" and transient < self.retry - 1:
                transient += 1
                time.sleep(backoff)
                backoff *= 1.5
                continue
            assert response is not None
            return response

    def _send(
        self, method: str, url: str, headers: dict[str, str], json_data: Any, timeout: float
    ) -> requests.Response:
        request = requests.Request(method=method, url=url, headers=headers, json=json_data)
        session = VastSession(self.server_url)
        with session:
            response: requests.Response = session.send(
                session.prepare_request(request), timeout=timeout
            )
        return response


def _retry_after_s(response: requests.Response | None) -> float:
    """A Retry-After the answer carries (Vast's do not, today), up to a minute; else 0."""
    try:
        seconds = float((response.headers if response is not None else {})["Retry-After"])
    except (KeyError, ValueError):
        return 0.0
    return min(max(seconds, 0.0), 60.0)


_PACED: dict[tuple[str, str], PacedVastClient] = {}
_PACED_LOCK = threading.Lock()


def paced_client(settings: Settings) -> PacedVastClient:
    """This process's one client for the settings' API key and Vast address."""
    if settings.vast_api_key is None:
        raise ValueError("LORA_VAST_API_KEY is not set (the Vast provider needs it)")
    key = (settings.vast_api_key.get_secret_value(), settings.vast_base_url.rstrip("/"))
    with _PACED_LOCK:
        client = _PACED.get(key)
        if client is None:
            client = _PACED[key] = PacedVastClient(settings)
        else:
            client.configure(settings)
        return client


class VastProvider:
    """Rents Vast.ai instances that run the GPU image's entrypoint (`python -m gpu_runner`)."""

    name = PROVIDER_NAME

    def __init__(self, settings: Settings, client: VastClient | None = None) -> None:
        """On this process's paced client for the key (`paced_client`) unless given one."""
        self.settings = settings
        self.client = paced_client(settings) if client is None else client
        self._creates = (
            self.client.creates if isinstance(self.client, PacedVastClient) else _CreatesInFlight()
        )

    # -- GpuProvider -------------------------------------------------------------------------

    def find(self, label: str) -> Instance | None:
        """The live instance with this label, once this process's create of it has finished."""
        self._creates.wait_out(label)
        return self._lookup(label)

    def _lookup(self, label: str) -> Instance | None:
        # Vast filters on the exact label (a column it stores), so this is one small page.
        rows = [
            row
            for row in self._rows(select_filters={"label": {"in": [label]}})
            if row.label == label
        ]
        live = [row for row in rows if instance_state(row)[0] != "gone"]
        if len(live) > 1:
            log.error("label %s is on %d instances %s", label, len(live), [r.id for r in live])
        return self._describe(min(live, key=lambda r: r.id)) if live else None

    def create(
        self,
        label: str,
        job_url: str,
        requirements: GpuRequirements,
        *,
        exclude_machine_ids: Sequence[str] = (),
        download_bytes: int = 0,
    ) -> Instance:
        """Rent the best-ranked offer that is still free; never a second instance per label.

        Offers are tried at the create endpoint's pace; a create whose answer is lost is never
        sent again, but settled by looking its label up.
        """
        with self._creates.creating(label) as waited:
            if waited:
                # Another thread here was creating this label (a retried activity): look first.
                found = self._lookup(label)
                if found is not None:
                    return found
            return self._create(
                label,
                job_url,
                requirements,
                exclude_machine_ids=exclude_machine_ids,
                download_bytes=download_bytes,
            )

    def _create(
        self,
        label: str,
        job_url: str,
        requirements: GpuRequirements,
        *,
        exclude_machine_ids: Sequence[str],
        download_bytes: int,
    ) -> Instance:
        disk_gb = disk_gb_for(self.settings, requirements, download_bytes)
        ranked = self.ranked_offers(
            requirements,
            exclude_machine_ids=exclude_machine_ids,
            download_bytes=download_bytes,
        )
        if not ranked:
            raise NoOfferError("Vast returned no offer that fits")
        refused: list[str] = []
        order = spread_order(ranked, label, self.settings.vast_offer_tier_tolerance)
        for candidate in order[: self.settings.vast_offers_per_allocation]:
            offer = candidate.offer
            log.info("renting %s for %s", candidate.describe(), label)
            try:
                answer = vast_instances.create_instance(
                    self.client,
                    offer.id,
                    image=self.settings.vast_image,
                    disk=disk_gb,
                    env={"LORA_JOB_URL": job_url},
                    label=label,
                    runtype="args",
                    cancel_unavail=True,
                )
            except requests.HTTPError as e:
                status = _http_status(e)
                if status in (401, 403, 429):
                    # Refused outright (429: after the pacer waited out every retry it allows).
                    raise VastApiError(
                        f"creating an instance for {label}: {_vast_message(e)}"
                    ) from e
                if status is not None and 400 <= status < 500:
                    # Taken, but maybe by us: an earlier try of this allocation in another
                    # worker may have rented the same best offer. Only the label can tell.
                    found = self._lookup(label)
                    if found is not None:
                        return found
                    refused.append(f"offer {offer.id}: {_vast_message(e)}")
                    continue
                return self._created_anyway(label, e)
            except requests.RequestException as e:
                # Timed out, dropped or a 5xx: Vast may be making it still. Never sent again.
                return self._created_anyway(label, e)
            new_id = answer.get("new_contract") if isinstance(answer, dict) else None
            if not isinstance(new_id, int) or not answer.get("success", True):
                # Created or not, the label tells: look before anyone rents again.
                found = self._lookup(label)
                if found is not None:
                    return found
                raise VastApiError(f"Vast answered offer {offer.id} without an instance id")
            return Instance(
                provider=PROVIDER_NAME,
                instance_id=str(new_id),
                label=label,
                state="starting",
                gpu_name=offer.gpu_name,
                dollars_per_hour=offer.dph_total,
                machine_id=str(offer.machine_id),
                host_id=None if offer.host_id is None else str(offer.host_id),
                country=offer.country,
                created_at=datetime.now(UTC),
            )
        raise NoOfferError("every offer tried was taken: " + "; ".join(refused))

    def get(self, instance_id: str) -> Instance | None:
        if not instance_id.isdigit():
            return None
        try:
            row = vast_instances.show_instance(self.client, int(instance_id))
        except requests.HTTPError as e:
            if _http_status(e) == 404:
                return None
            raise VastApiError(f"looking up instance {instance_id}: {_vast_message(e)}") from e
        except (KeyError, TypeError) as e:
            raise VastApiError(f"Vast answered a malformed instance {instance_id} ({e!r})") from e
        if row is None:
            return None
        return self._describe(self._row(row))

    def destroy(self, instance_id: str) -> bool:
        """Destroy the instance and check, at the show endpoint's pace, that Vast unlisted it.

        False when Vast no longer knows it (already destroyed). Checks back off from one show
        interval and double, so a confirmation costs a few calls, not a poll.
        """
        if not instance_id.isdigit():
            return False
        try:
            vast_instances.destroy_instance(self.client, int(instance_id))
        except requests.HTTPError as e:
            if _http_status(e) == 404:
                return False
            raise VastApiError(f"destroying instance {instance_id}: {_vast_message(e)}") from e
        except requests.RequestException as e:
            raise VastApiError(f"destroying instance {instance_id}: {_vast_message(e)}") from e
        deadline = time.monotonic() + self.settings.vast_destroy_confirm_s
        wait_s = self.settings.vast_show_interval_s
        while True:
            current = self.get(instance_id)
            if current is None or current.state == "gone":
                return True
            if time.monotonic() + wait_s > deadline:
                raise VastApiError(
                    f"instance {instance_id} still listed "
                    f"{self.settings.vast_destroy_confirm_s:.0f} s after destroy"
                )
            time.sleep(wait_s)
            wait_s *= 2

    def list_instances(self, label_prefix: str = "") -> list[Instance]:
        # Vast's label filter matches whole labels only (eq/in, no prefix), so the prefix is
        # applied here; the listing's pages come at the list endpoint's pace.
        described = (
            self._describe(row) for row in self._rows() if instance_state(row)[0] != "gone"
        )
        return [instance for instance in described if instance.label.startswith(label_prefix)]

    # -- offers ------------------------------------------------------------------------------

    def ranked_offers(
        self,
        requirements: GpuRequirements,
        *,
        exclude_machine_ids: Sequence[str] = (),
        download_bytes: int = 0,
    ) -> list[RankedOffer]:
        """Offers that fit, by expected cost of the whole run."""
        disk_gb = disk_gb_for(self.settings, requirements, download_bytes)
        query = offer_query(
            self.settings, requirements, disk_gb=disk_gb, exclude_machine_ids=exclude_machine_ids
        )
        try:
            raw = vast_offers.search_offers(
                self.client,
                query=query,
                order=[["dph_total", "asc"]],
                limit=self.settings.vast_offer_search_limit,
                storage=disk_gb,
            )
        except requests.RequestException as e:
            raise VastApiError(f"searching offers: {_vast_message(e)}") from e
        if not isinstance(raw, list):
            raise VastApiError("Vast's offer search answered something other than a list")
        excluded = set(exclude_machine_ids)
        fitting = []
        for item in raw:
            try:
                offer = _Offer.model_validate(item)
            except ValidationError as e:
                log.warning("skipping a malformed offer: %s", e.errors()[0]["msg"])
                continue
            reason = why_unsuitable(offer, self.settings, requirements, disk_gb, excluded)
            if reason is None:
                fitting.append(offer)
            else:
                log.info("skipping offer %s: %s", offer.id, reason)
        return rank_offers(fitting, self.settings, download_bytes)

    # -- internals ---------------------------------------------------------------------------

    def _created_anyway(self, label: str, error: requests.RequestException) -> Instance:
        """After a create whose answer was lost: look its label up until it shows or the
        settle time passes, at the list endpoint's pace; never a second PUT."""
        deadline = time.monotonic() + self.settings.vast_create_settle_s
        while True:
            found = self._lookup(label)
            if found is not None:
                log.warning(
                    "create for %s failed (%s) but made %s", label, error, found.instance_id
                )
                return found
            if time.monotonic() >= deadline:
                raise VastApiError(
                    f"creating an instance for {label}: {_vast_message(error)}; no instance "
                    f"with its label {self.settings.vast_create_settle_s:.0f} s later"
                ) from error
            time.sleep(max(self.settings.vast_list_interval_s, 0.05))

    def _rows(self, select_filters: dict[str, Any] | None = None) -> list[_InstanceRow]:
        try:
            raw = vast_instances.show_instances(self.client, select_filters=select_filters)
        except requests.RequestException as e:
            raise VastApiError(f"listing instances: {_vast_message(e)}") from e
        except (KeyError, TypeError) as e:
            raise VastApiError(f"Vast's instance list is malformed ({e!r})") from e
        return [self._row(item) for item in raw]

    @staticmethod
    def _row(item: Any) -> _InstanceRow:
        try:
            return _InstanceRow.model_validate(item)
        except ValidationError as e:
            raise VastApiError(f"Vast answered a malformed instance: {e.errors()[0]}") from e

    @staticmethod
    def _describe(row: _InstanceRow) -> Instance:
        state, message = instance_state(row)
        return Instance(
            provider=PROVIDER_NAME,
            instance_id=str(row.id),
            label=row.label or "",
            state=state,
            gpu_name=row.gpu_name,
            dollars_per_hour=row.dph_total,
            message=message,
            machine_id=None if row.machine_id is None else str(row.machine_id),
            host_id=None if row.host_id is None else str(row.host_id),
            country=country_of(row.geolocation),
            created_at=None
            if row.start_date is None
            else datetime.fromtimestamp(row.start_date, UTC),
        )
