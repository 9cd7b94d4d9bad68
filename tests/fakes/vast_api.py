"""A fake Vast.ai API, shaped like the real one at the endpoints the `vastai` SDK calls.

Endpoints (paths, bodies and fields from the SDK 1.9.1 source and Vast's API reference):
- `POST /api/v0/bundles/` (search_offers): body `{<field>: {op: value}, "order", "limit",
  "type", "allocated_storage"}`; ops eq/neq/gt/gte/lt/lte/in/notin; answers `{"offers": [...]}`
  with `id, machine_id, host_id, gpu_name, num_gpus, gpu_ram (MB), dph_total, reliability,
  inet_down, inet_up (Mb/s), inet_down_cost, inet_up_cost ($/GiB), storage_total_cost ($/h; a
  fixed figure here, where Vast prices the search's allocated_storage), geolocation ("Sweden,
  SE"), cuda_max_good, dlperf, disk_space, verified, rentable, rented`. An offer held by a live
  instance is `rented`.
- `PUT /api/v0/asks/{offer_id}/` (create_instance): `{"success": true, "new_contract": id,
  "instance_api_key": key}`; an offer already taken answers 400 `no_such_ask`.
- `GET /api/v1/instances/?select_filters=&order_by=&limit=&after_token=` (show_instances):
  `{"instances": [...], "next_token", "total_instances"}`, paginated (limit <= 25).
- `GET /api/v0/instances/{id}/?owner=me` (show_instance): `{"instances": row or null}`.
- `DELETE /api/v0/instances/{id}/` (destroy_instance); `PUT /api/v0/instances/{id}/` with
  `{"state": "stopped"}` (stop_instance).
Instance rows carry `actual_status` (null -> loading -> running | exited), `cur_state`
(running, unloaded after destroy), `intended_status`, `status_msg`, `label`, `dph_total`,
`machine_id`, `host_id`, `geolocation`, `start_date`, `extra_env` ([[name, value], ...]).

Auth: `Authorization: Bearer <account key>` for everything; an instance's own key
(`instance_api_key`, which its container gets as CONTAINER_API_KEY) may read, stop and destroy
that instance only. Anything else is 401.

Booting an instance starts the real runner: `python -m gpu_runner` as a child process in its own
process group with the create's `env` (LORA_JOB_URL) plus CONTAINER_ID, CONTAINER_API_KEY,
LORA_RUNNER_VAST_API_URL (this server) and the test's `runner_env`. The runner's exit makes the
instance `exited`; destroy kills its process group.

Rate limits (`limits=True`): Vast's documented limits per endpoint and API key (`VAST_LIMITS`,
from its OpenAPI `x-rate-limit`, times `limit_scale` so tests stay fast): a minimum interval
since the key's last accepted call (show 2 s, destroy 3 s, create 4.5 s, list 1 s) and 10 offer
searches a minute. Too soon is a plain-text 429 "API requests too frequent" WITHOUT Retry-After;
a create too soon also blocks the key's creates for a 12 s penalty from then. Every such 429 is
in `limit_429s`; `calls` holds (endpoint, key kind, arrival, status) of every call.

Faults: `machine_faults[machine_id]` = "exits" (the container exits at boot, the runner never
starts), "stuck_loading", "pull_error" (an image pull error in status_msg), "taken" (someone
else rents the offer at create); `rate_limit(n, retry_after_s)` (429 bursts), `server_errors(n,
status)` (5xx), `lose_create_responses(n)` (the instance is made, the answer is a 504),
`instance_keys_may_destroy = False` (an instance key may only stop its instance),
`create_answer_delay_s` (the create is slow to answer after the instance was made),
`create_delay_s` (Vast takes that long to make the instance, then answers),
`destroy_unlist_delay_s` (a destroyed instance is still shown, running, for that long).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MachineFault = Literal["exits", "stuck_loading", "pull_error", "taken"]
PULL_ERROR = (
    "Error response from daemon: manifest for ghcr.io/loratrain/loratrain-gpu:latest not found: "
    "manifest unknown"
)
PAGE_LIMIT = 25
# Vast's limits per endpoint and API key (api-reference/openapi/yaml/*.yaml, x-rate-limit):
# seconds between calls, except search (calls per minute).
VAST_LIMITS = {
    "show": 2.0,
    "destroy": 3.0,
    "create": 4.5,
    "create_penalty": 12.0,
    "list": 1.0,
    "searches_per_minute": 10,
}
ROOT = Path(__file__).resolve().parents[2]


def make_offer(
    offer_id: int,
    *,
    machine_id: int | None = None,
    gpu_name: str = "RTX 4090",
    dph_total: float = 0.40,
    gpu_ram: int = 24564,
    reliability: float = 0.99,
    inet_down: float = 800.0,
    inet_down_cost: float = 0.0,
    inet_up_cost: float = 0.0,
    storage_total_cost: float = 0.0,
    geolocation: str = "Sweden, SE",
    cuda_max_good: float = 12.6,
    dlperf: float = 60.0,
    disk_space: float = 200.0,
    num_gpus: int = 1,
    host_id: int | None = None,
) -> dict[str, Any]:
    """An offer as Vast's search returns it (only the fields that matter here, plus flags)."""
    machine = machine_id if machine_id is not None else 10_000 + offer_id
    return {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "machine_id": machine,
        "host_id": host_id if host_id is not None else 500 + machine % 97,
        "gpu_name": gpu_name,
        "num_gpus": num_gpus,
        "gpu_ram": gpu_ram,
        "gpu_total_ram": gpu_ram * num_gpus,
        "dph_total": dph_total,
        "reliability": reliability,
        "reliability2": reliability,
        "inet_down": inet_down,
        "inet_down_cost": inet_down_cost,
        "inet_up": inet_down / 2,
        "inet_up_cost": inet_up_cost,
        "storage_total_cost": storage_total_cost,
        "geolocation": geolocation,
        "cuda_max_good": cuda_max_good,
        "dlperf": dlperf,
        "disk_space": disk_space,
        "verified": True,
        "external": False,
        "rentable": True,
        "rented": False,
    }


def _country(geolocation: str | None) -> str | None:
    return geolocation.rsplit(",", 1)[-1].strip() if geolocation else None


def _matches(value: Any, op: str, wanted: Any) -> bool:
    if op == "eq":
        return bool(value == wanted)
    if op == "neq":
        return bool(value != wanted)
    if op == "in":
        return value in wanted
    if op in ("notin", "nin"):
        return value not in wanted
    if value is None:
        return False
    return bool(
        {
            "gt": value > wanted,
            "gte": value >= wanted,
            "lt": value < wanted,
            "lte": value <= wanted,
        }[op]
    )


@dataclass
class FakeInstance:
    id: int
    offer: dict[str, Any]
    label: str | None
    image: str
    env: dict[str, str]
    disk: float
    api_key: str = field(repr=False)
    created_at: float
    actual_status: str | None = None
    cur_state: str = "running"
    intended_status: str = "running"
    status_msg: str | None = None
    process: subprocess.Popen[bytes] | None = None
    exited_at: float | None = None
    destroyed_at: float | None = None

    def row(self) -> dict[str, Any]:
        offer = self.offer
        return {
            "id": self.id,
            "label": self.label,
            "actual_status": self.actual_status,
            "cur_state": self.cur_state,
            "next_state": self.cur_state,
            "intended_status": self.intended_status,
            "status_msg": self.status_msg,
            "image_uuid": self.image,
            "image_runtype": "args",
            "gpu_name": offer["gpu_name"],
            "num_gpus": 1,
            "gpu_ram": offer["gpu_ram"],
            "dph_total": offer["dph_total"],
            "machine_id": offer["machine_id"],
            "host_id": offer["host_id"],
            "geolocation": offer["geolocation"],
            "inet_down": offer["inet_down"],
            "disk_space": self.disk,
            "start_date": self.created_at,
            "extra_env": [[k, v] for k, v in self.env.items()],
        }


class FakeVast:
    """The fake's state and its Starlette app (`app`); serve with tests.http_support.serve_asgi."""

    def __init__(
        self,
        *,
        api_key: str,
        offers: Iterable[dict[str, Any]] = (),
        runner_env: dict[str, str] | None = None,
        workdir: Path,
        boot_delay_s: float = 0.1,
        runner_command: list[str] | None = None,
        limits: bool = False,
        limit_scale: float = 1.0,
    ) -> None:
        self.api_key = api_key
        self.offers: dict[int, dict[str, Any]] = {o["id"]: dict(o) for o in offers}
        self.runner_env = dict(runner_env or {})
        self.workdir = workdir
        self.boot_delay_s = boot_delay_s
        self.runner_command = runner_command or [sys.executable, "-m", "gpu_runner"]
        self.machine_faults: dict[int, MachineFault] = {}
        # Seconds between making an instance and answering the create.
        self.create_answer_delay_s = 0.0
        # Seconds between a create's arrival and the instance being made.
        self.create_delay_s = 0.0
        # Seconds a destroyed instance is still shown (running) by show and list.
        self.destroy_unlist_delay_s = 0.0
        self.limits = limits
        self.limit_scale = limit_scale
        # (endpoint, key kind, monotonic arrival, status) of every call; the limits' 429s.
        self.calls: list[tuple[str, str, float, int]] = []
        self.limit_429s: list[tuple[str, str, float]] = []
        self._last_accepted: dict[tuple[str, str], float] = {}
        self._create_penalty_until: dict[str, float] = {}
        # Endpoints whose next call gets a limit 429 whatever its timing: another process on the
        # key just spent the interval (a test's way to meet that without racing a clock).
        self.spent_by_another: set[str] = set()
        self._searches: dict[str, deque[float]] = {}
        # False: an instance's own key may stop it but not destroy it (403).
        self.instance_keys_may_destroy = True
        self.instances: dict[int, FakeInstance] = {}
        # (method, path, which key: "account" | "instance:<id>" | "none")
        self.requests: list[tuple[str, str, str]] = []
        self.offer_queries: list[dict[str, Any]] = []
        self.create_bodies: list[dict[str, Any]] = []
        self.destroy_calls: list[tuple[int, float, str]] = []
        self.stop_calls: list[tuple[int, str]] = []
        self.base_url = ""  # set by the test once served, so instances can call back
        self._next_id = 4_000_001
        self._rate_limited = 0
        self._retry_after_s: float | None = 0.0
        self._server_errors: list[int] = []
        self._lost_creates = 0
        self._lock = threading.RLock()
        self.app = Starlette(
            routes=[
                Route("/api/v0/bundles/", self._search, methods=["POST"]),
                Route("/api/v0/asks/{offer_id:int}/", self._create, methods=["PUT"]),
                Route("/api/v1/instances/", self._list, methods=["GET"]),
                Route(
                    "/api/v0/instances/{instance_id:int}/",
                    self._instance,
                    methods=["GET", "PUT", "DELETE"],
                ),
            ]
        )

    # -- knobs -------------------------------------------------------------------------------

    def rate_limit(self, requests: int, retry_after_s: float | None = 0.1) -> None:
        """The next `requests` calls answer 429 (with Retry-After unless it is None)."""
        with self._lock:
            self._rate_limited = requests
            self._retry_after_s = retry_after_s

    def server_errors(self, requests: int, status: int = 500) -> None:
        with self._lock:
            self._server_errors.extend([status] * requests)

    def lose_create_responses(self, creates: int = 1) -> None:
        with self._lock:
            self._lost_creates = creates

    # -- what tests read ---------------------------------------------------------------------

    def created(self) -> list[FakeInstance]:
        with self._lock:
            return sorted(self.instances.values(), key=lambda i: i.id)

    def live(self) -> list[FakeInstance]:
        return [i for i in self.created() if i.destroyed_at is None]

    def calls_to(self, endpoint: str) -> list[tuple[str, str, float, int]]:
        with self._lock:
            return [call for call in self.calls if call[0] == endpoint]

    def destroyed_ids(self) -> list[int]:
        return [instance_id for instance_id, _, _ in self.destroy_calls]

    def close(self) -> None:
        """Kill every runner still running (test teardown)."""
        for instance in self.created():
            self._kill(instance)

    # -- HTTP --------------------------------------------------------------------------------

    def _shown(self, instance: FakeInstance | None) -> bool:
        if instance is None:
            return False
        destroyed = instance.destroyed_at
        return destroyed is None or time.time() < destroyed + self.destroy_unlist_delay_s

    @staticmethod
    def _row(instance: FakeInstance) -> dict[str, Any]:
        row = instance.row()
        if instance.destroyed_at is not None:
            # Destroyed but not yet unlisted: Vast still shows it, on its way down.
            row.update(cur_state="running", intended_status="stopped")
        return row

    def _over_limit(self, endpoint: str, key: str, now: float) -> bool:
        """Whether this call breaks Vast's limit for the endpoint and key (and count it)."""
        scale = self.limit_scale
        if endpoint in self.spent_by_another:
            self.spent_by_another.discard(endpoint)
            if endpoint == "create":
                self._create_penalty_until[key] = now + VAST_LIMITS["create_penalty"] * scale
            return True
        if endpoint == "search":
            window = 60.0 * scale
            recent = self._searches.setdefault(key, deque())
            while recent and recent[0] <= now - window:
                recent.popleft()
            if len(recent) >= VAST_LIMITS["searches_per_minute"]:
                return True
            recent.append(now)
            return False
        last = self._last_accepted.get((endpoint, key))
        too_soon = last is not None and now - last < VAST_LIMITS[endpoint] * scale
        if endpoint == "create":
            if too_soon or now < self._create_penalty_until.get(key, 0.0):
                self._create_penalty_until[key] = now + VAST_LIMITS["create_penalty"] * scale
                return True
        elif too_soon:
            return True
        self._last_accepted[(endpoint, key)] = now
        return False

    def _authorize(
        self, request: Request, endpoint: str, instance_id: int | None = None
    ) -> Response | str:
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        who = "none"
        if key and secrets.compare_digest(key, self.api_key):
            who = "account"
        elif key and instance_id is not None:
            instance = self.instances.get(instance_id)
            if instance is not None and secrets.compare_digest(key, instance.api_key):
                who = f"instance:{instance_id}"
        self.requests.append((request.method, request.url.path, who))
        kind = who.split(":")[0]
        now = time.monotonic()
        answer = self._refusal(endpoint, who, key, now)
        self.calls.append((endpoint, kind, now, 200 if answer is None else answer.status_code))
        return who if answer is None else answer

    def _refusal(self, endpoint: str, who: str, key: str, now: float) -> Response | None:
        if who == "none":
            return JSONResponse(
                {"success": False, "error": "invalid_user_key", "msg": "Invalid user key"},
                status_code=401,
            )
        if self.limits and self._over_limit(endpoint, key, now):
            self.limit_429s.append((endpoint, who.split(":")[0], now))
            threshold = VAST_LIMITS.get(endpoint, 0.0)
            # Like Vast: plain text, no Retry-After.
            return Response(
                f"API requests too frequent: endpoint threshold={threshold}",
                status_code=429,
                media_type="text/plain",
            )
        if self._rate_limited > 0:
            self._rate_limited -= 1
            headers = {}
            if self._retry_after_s is not None:
                headers["Retry-After"] = f"{self._retry_after_s:g}"
            return JSONResponse(
                {"success": False, "error": "rate_limited", "msg": "API requests too frequent"},
                status_code=429,
                headers=headers,
            )
        if self._server_errors:
            status = self._server_errors.pop(0)
            return JSONResponse({"success": False, "error": "server_error"}, status_code=status)
        return None

    async def _search(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            who = self._authorize(request, "search")
            if isinstance(who, Response):
                return who
            if who != "account":
                return JSONResponse({"success": False, "error": "forbidden"}, status_code=403)
            self.offer_queries.append(body)
            rented = {i.offer["id"] for i in self.instances.values() if i.destroyed_at is None}
            found = []
            for offer in self.offers.values():
                row = dict(offer, rented=offer["id"] in rented)
                if all(self._offer_matches(row, name, ops) for name, ops in body.items()):
                    found.append(row)
            for column, direction in body.get("order", []):
                found.sort(key=lambda o: o.get(column) or 0, reverse=direction == "desc")
            limit = body.get("limit")
            return JSONResponse({"offers": found[:limit] if limit else found})

    @staticmethod
    def _offer_matches(offer: dict[str, Any], name: str, ops: Any) -> bool:
        if name in ("order", "limit", "type", "allocated_storage", "disable_bundling"):
            return True
        if not isinstance(ops, dict):
            raise ValueError(f"bad query for {name}: {ops!r}")
        value = _country(offer["geolocation"]) if name == "geolocation" else offer.get(name)
        return all(_matches(value, op, wanted) for op, wanted in ops.items())

    async def _create(self, request: Request) -> Response:
        offer_id = int(request.path_params["offer_id"])
        body = await request.json()
        with self._lock:
            who = self._authorize(request, "create")
            if isinstance(who, Response):
                return who
            self.create_bodies.append(body)
        # Vast takes its time; the instance is made whether or not the caller still waits.
        await asyncio.sleep(self.create_delay_s)
        with self._lock:
            offer = self.offers.get(offer_id)
            taken = any(
                i.offer["id"] == offer_id and i.destroyed_at is None
                for i in self.instances.values()
            )
            if offer is not None and self.machine_faults.get(offer["machine_id"]) == "taken":
                taken = True
                # Someone else rented it: it no longer shows in searches either.
                del self.offers[offer_id]
            if offer is None or taken:
                return JSONResponse(
                    {
                        "success": False,
                        "error": "no_such_ask",
                        "msg": f"Instance type {offer_id} is no longer available.",
                    },
                    status_code=400,
                )
            if not body.get("image") or body.get("runtype") != "args":
                return JSONResponse(
                    {"success": False, "error": "invalid_args", "msg": "image and runtype"},
                    status_code=400,
                )
            instance = FakeInstance(
                id=self._next_id,
                offer=offer,
                label=body.get("label"),
                image=body["image"],
                env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
                disk=float(body.get("disk") or 10),
                api_key=secrets.token_hex(32),
                created_at=time.time(),
            )
            self._next_id += 1
            self.instances[instance.id] = instance
            threading.Timer(self.boot_delay_s, self._boot, args=(instance.id,)).start()
            if self._lost_creates > 0:
                self._lost_creates -= 1
                return JSONResponse({"success": False, "error": "gateway_timeout"}, 504)
            answer = {
                "success": True,
                "new_contract": instance.id,
                "instance_api_key": instance.api_key,
            }
        # The instance exists from here on, whether or not the caller lives to hear of it.
        await asyncio.sleep(self.create_answer_delay_s)
        return JSONResponse(answer)

    async def _list(self, request: Request) -> Response:
        with self._lock:
            who = self._authorize(request, "list")
            if isinstance(who, Response):
                return who
            if who != "account":
                return JSONResponse({"success": False, "error": "forbidden"}, status_code=403)
            params = request.query_params
            filters = json.loads(params.get("select_filters") or "{}")
            limit = min(int(json.loads(params.get("limit") or "25")), PAGE_LIMIT)
            after = int(params["after_token"]) if params.get("after_token") else 0
            rows = [
                self._row(i)
                for i in sorted(self.instances.values(), key=lambda i: i.id)
                if self._shown(i)
                and i.id > after
                and all(
                    _matches(i.row().get(name), op, wanted)
                    for name, ops in filters.items()
                    for op, wanted in ops.items()
                )
            ]
            page = rows[:limit]
            next_token = str(page[-1]["id"]) if len(rows) > limit else None
            return JSONResponse(
                {
                    "success": True,
                    "instances_found": len(page),
                    "total_instances": len(rows),
                    "next_token": next_token,
                    "instances": page,
                }
            )

    async def _instance(self, request: Request) -> Response:
        instance_id = int(request.path_params["instance_id"])
        body = await request.json() if request.method != "GET" else {}
        with self._lock:
            endpoint = {"GET": "show", "DELETE": "destroy"}.get(request.method, "manage")
            who = self._authorize(request, endpoint, instance_id)
            if isinstance(who, Response):
                return who
            instance = self.instances.get(instance_id)
            if request.method == "GET" and instance is not None and self._shown(instance):
                return JSONResponse({"instances": self._row(instance)})
            if instance is None or instance.destroyed_at is not None:
                if request.method == "GET":
                    return JSONResponse({"instances": None})
                return JSONResponse(
                    {"success": False, "error": "no_such_instance", "msg": "Instance not found"},
                    status_code=404,
                )
            if request.method == "GET":
                return JSONResponse({"instances": instance.row()})
            if request.method == "DELETE":
                if who != "account" and not self.instance_keys_may_destroy:
                    return JSONResponse(
                        {"success": False, "error": "forbidden", "msg": "key may not destroy"},
                        status_code=403,
                    )
                self.destroy_calls.append((instance_id, time.time(), who))
                instance.destroyed_at = time.time()
                instance.cur_state = "unloaded"
                threading.Thread(target=self._kill, args=(instance,), daemon=True).start()
                return JSONResponse({"success": True})
            if body.get("state") == "stopped":
                self.stop_calls.append((instance_id, who))
                instance.intended_status = "stopped"
                instance.actual_status = "stopped"
                threading.Thread(target=self._kill, args=(instance,), daemon=True).start()
                return JSONResponse({"success": True})
            return JSONResponse({"success": False, "error": "invalid_args"}, status_code=400)

    # -- the host ----------------------------------------------------------------------------

    def _boot(self, instance_id: int) -> None:
        with self._lock:
            instance = self.instances[instance_id]
            if instance.destroyed_at is not None:
                return
            fault = self.machine_faults.get(instance.offer["machine_id"])
            instance.actual_status = "loading"
            if fault == "stuck_loading":
                instance.status_msg = "Pulling image layers"
                return
            if fault == "pull_error":
                instance.status_msg = PULL_ERROR
                return
            if fault == "exits":
                instance.actual_status = "exited"
                instance.status_msg = "container exited with code 139 (host fault)"
                instance.exited_at = time.time()
                return
            directory = self.workdir / str(instance.id)
            directory.mkdir(parents=True, exist_ok=True)
            env = {
                "PATH": os.environ.get("PATH", os.defpath),
                "PYTHONPATH": str(ROOT),
                **self.runner_env,
                "LORA_RUNNER_WORKDIR": str(directory / "work"),
                **instance.env,
                "CONTAINER_ID": str(instance.id),
                "CONTAINER_API_KEY": instance.api_key,
                "LORA_RUNNER_VAST_API_URL": self.base_url,
            }
            with (directory / "runner.log").open("ab") as log:
                instance.process = subprocess.Popen(
                    self.runner_command,
                    cwd=directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            instance.actual_status = "running"
            instance.status_msg = f"success, running {instance.image}"
            process = instance.process
        threading.Thread(target=self._watch, args=(instance, process), daemon=True).start()

    def _watch(self, instance: FakeInstance, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        with self._lock:
            if instance.destroyed_at is None and instance.actual_status == "running":
                instance.actual_status = "exited"
                instance.status_msg = f"container exited with code {code}"
                instance.exited_at = time.time()

    def _kill(self, instance: FakeInstance) -> None:
        process = instance.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def runner_log(self, instance_id: int) -> str:
        path = self.workdir / str(instance_id) / "runner.log"
        return path.read_text(errors="replace") if path.exists() else ""
