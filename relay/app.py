"""The webhook relay: signed runner events in, Temporal signals out; plus the UI's codec server.

`POST /v1/runs/{run_id}/executions/{execution}/events` takes one Standard Webhooks-signed
`RunnerEvent` from a GPU runner and delivers it to the run's workflow as the `runner_event`
signal, with the execution it was signed for. Checks run in the order DESIGN.md fixes, so nothing
about a run leaks to an unsigned caller: size (413), signature (401), body (400), run (404/410;
410 also when the id now names a later run). The relay keeps no state it needs: the run's secret
is derived from the master secret and the run's first execution id, and Temporal says whether the
run exists. `POST /v1/runs/{run_id}/events` serves runners of runs started before executions
were named.

Milestones are signalled in the request that posts them. Progress and heartbeats are coalesced
per run (ProgressCoalescer): at most one signal per run and `relay_progress_interval_s`, carrying
the newest, or per the longer interval the run asks for while nobody watches it (its
`progress_every_s` query); the runner is answered 202 at once for the ones held back.

`POST /codec/decode` and `/codec/encode` are a Temporal codec server (proto3-JSON `Payloads`),
so operators can read encrypted payloads in the Temporal UI.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from cryptography.exceptions import InvalidTag
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.storage import epoch_prefix
from common.converter import EncryptionCodec, codec_from_settings
from common.logs import configure_logging
from common.s3 import s3_client
from common.settings import Settings
from common.temporal import connect_client
from gpu_runner import protocol
from workflows.models import RelayedEvent, RunStatus

# Named for the service, as the worker's `loratrain.worker`: log lines do not follow module moves.
log = logging.getLogger("loratrain.relay")

RUNNER_EVENT_SIGNAL = "runner_event"
RELAYED_EVENT_SIGNAL = "relayed_event"
RUN_STATUS_QUERY = "status"
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# What a runner (or any caller) is told to wait before retrying a 503.
RETRY_AFTER_S = 5
# Bounds on every Temporal call, so a stuck cluster turns into a 503, not a hung request.
TEMPORAL_CONNECT_TIMEOUT = timedelta(seconds=5)
TEMPORAL_RPC_TIMEOUT = timedelta(seconds=10)
# After a failed connect, requests answer 503 at once for this long instead of each retrying.
RECONNECT_INTERVAL_S = 1.0
# History payloads can be large (Temporal's default blob limit is 2 MB); this bounds memory only.
MAX_CODEC_BYTES = 16 * 1024 * 1024
# Only the newest of these matters to a run: the relay coalesces them (ProgressCoalescer).
COALESCED_TYPES: frozenset[str] = frozenset({"training.progress", "heartbeat"})
# Runs whose coalescing state is kept before idle ones are forgotten.
MAX_TRACKED_RUNS = 10_000
# The query a run answers with how often it wants progress (workflows/training.py).
PROGRESS_EVERY_QUERY = "progress_every_s"
CODEC_CORS_HEADERS = ["content-type", "x-namespace", "authorization"]

_RUN_ID = TypeAdapter(protocol.RunId)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")
_UNAVAILABLE = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.ABORTED,
}


class Rejection(Exception):
    """An answer other than success; becomes the JSON response `{"error": message, **extra}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.extra = extra or {}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, **self.extra}, self.status_code, headers=self.headers
        )


def _temporal_unavailable(reason: str) -> Rejection:
    return Rejection(
        503,
        f"Temporal is unreachable ({reason}); retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class TemporalConnection:
    """One Temporal client shared by all requests, connected at startup or, failing that, lazily."""

    def __init__(self, settings: Settings, client: Client | None) -> None:
        self._settings = settings
        self._client = client
        self._lock = asyncio.Lock()
        self._last_attempt = float("-inf")
        self._last_error = "not connected yet"

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def get(self) -> Client:
        """The client, connecting first if needed; raises a 503 Rejection when that fails."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._last_attempt < RECONNECT_INTERVAL_S:
                raise _temporal_unavailable(self._last_error)
            self._last_attempt = time.monotonic()
            try:
                self._client = await connect_client(
                    self._settings, connect_timeout=TEMPORAL_CONNECT_TIMEOUT
                )
            except Exception as e:  # the core raises RuntimeError; anything else means the same
                self._last_error = f"cannot connect to {self._settings.temporal_address}"
                log.warning("%s: %s", self._last_error, e)
                raise _temporal_unavailable(self._last_error) from None
            log.info("connected to Temporal at %s", self._settings.temporal_address)
            return self._client


# --------------------------------------------------------------------------------------------
# Runner events
# --------------------------------------------------------------------------------------------


async def _read_limited_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes whether or not Content-Length is sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _CONTENT_LENGTH.fullmatch(declared.strip()):
            raise Rejection(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise Rejection(413, f"body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejection(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _verify_signature(
    settings: Settings, run_id: str, execution: str | None, request: Request, body: bytes
) -> None:
    try:
        _RUN_ID.validate_python(run_id)
        if execution is not None:
            _RUN_ID.validate_python(execution)
    except ValidationError:
        # 401 rather than 404: no runner was ever given a secret for an id that is not a valid
        # run id, so no signature can match; answering 404 would skip the signature check.
        raise Rejection(401, "invalid signature: not a valid run id") from None
    secret = protocol.derive_run_secret(settings.require_master_secret(), run_id, execution)
    headers = {name: request.headers[name] for name in SIGNATURE_HEADERS if name in request.headers}
    try:
        protocol.verify_payload(secret, headers, body)
    except protocol.SignatureError as e:
        raise Rejection(401, f"invalid signature: {e}") from None


def _parse_event(run_id: str, request: Request, body: bytes) -> protocol.RunnerEvent:
    try:
        event = protocol.parse_event(body)
    except ValueError as e:
        raise Rejection(400, str(e)) from None
    if event.run_id != run_id:
        raise Rejection(400, f"event is for run {event.run_id!r}, posted to run {run_id!r}")
    webhook_id = request.headers["webhook-id"]  # present: the signature check needs it
    if webhook_id != event.webhook_id:
        raise Rejection(
            400, f"webhook-id {webhook_id!r} does not match the event ({event.webhook_id!r})"
        )
    return event


class FirstExecutions:
    """The first execution id of each run id this relay delivered to, so an event signed for an
    earlier run of a reused id gets 410 (its GPU stops) instead of reaching the later run. Only
    a cache: a miss or a mismatch asks Temporal again."""

    def __init__(self, limit: int = 10_000, ttl_s: float = 60.0) -> None:
        self._limit = limit
        self._ttl_s = ttl_s
        # run id -> (first execution id, when Temporal said so): a reused id is seen within ttl.
        self._known: dict[str, tuple[str, float]] = {}

    async def check(self, handle: WorkflowHandle[Any, Any], execution: str) -> None:
        known = self._known.get(handle.id)
        if (
            known is not None
            and known[0] == execution
            and time.monotonic() - known[1] < self._ttl_s
        ):
            return
        try:
            description = await handle.describe(rpc_timeout=TEMPORAL_RPC_TIMEOUT)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise Rejection(404, f"no run {handle.id!r}") from None
            raise _rpc_failure("describe", handle.id, e) from None
        except Exception:
            log.exception("describing run %s failed unexpectedly", handle.id)
            raise _temporal_unavailable("unexpected error") from None
        first = description.raw_description.workflow_execution_info.first_run_id
        if first and first != execution:
            raise Rejection(
                410,
                "run is closed: its id now names a later run",
                extra={"status": "REPLACED"},
            )
        if len(self._known) >= self._limit:
            self._known.clear()
        self._known[handle.id] = (execution, time.monotonic())


async def _signal_run(
    client: Client,
    event: protocol.RunnerEvent,
    execution: str | None,
    first_executions: FirstExecutions,
) -> None:
    handle = client.get_workflow_handle(event.run_id)
    signal: str
    arg: protocol.RunnerEvent | RelayedEvent
    if execution is None:
        # A runner of a run started before executions were named: the older route and signal.
        signal, arg = RUNNER_EVENT_SIGNAL, event
    else:
        await first_executions.check(handle, execution)
        signal, arg = RELAYED_EVENT_SIGNAL, RelayedEvent(event=event, execution=execution)
    try:
        await handle.signal(signal, arg, rpc_timeout=TEMPORAL_RPC_TIMEOUT)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            # Temporal answers NOT_FOUND both for an unknown id and a closed run: ask which.
            raise await _why_not_found(handle) from None
        raise _rpc_failure("signal", event.run_id, e) from None
    except Exception:
        log.exception("signalling run %s failed unexpectedly", event.run_id)
        raise _temporal_unavailable("unexpected error") from None


async def _why_not_found(handle: WorkflowHandle[Any, Any]) -> Rejection:
    try:
        description = await handle.describe(rpc_timeout=TEMPORAL_RPC_TIMEOUT)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return Rejection(404, f"no run {handle.id!r}")
        return _rpc_failure("describe", handle.id, e)
    except Exception:
        log.exception("describing run %s failed unexpectedly", handle.id)
        return _temporal_unavailable("unexpected error")
    status = description.status
    if status is None or status == WorkflowExecutionStatus.RUNNING:
        # A new execution with this id started between the signal and the describe: retrying
        # delivers to it.
        return _temporal_unavailable("the run changed while delivering")
    return Rejection(410, "run is closed", extra={"status": status.name})


def _rpc_failure(call: str, run_id: str, error: RPCError) -> Rejection:
    if error.status in _UNAVAILABLE:
        log.warning("%s of run %s: Temporal unavailable: %s", call, run_id, error.status.name)
    else:
        log.error("%s of run %s failed: %s %s", call, run_id, error.status.name, error.message)
    return _temporal_unavailable(error.status.name.lower() if error.status else "rpc error")


def _age_ms(sent_at: datetime) -> float:
    """Milliseconds since a runner stamped an event (a naive time is read as UTC)."""
    if sent_at.tzinfo is None:
        sent_at = sent_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - sent_at).total_seconds() * 1000


class RunEventRate:
    """At most `per_minute` signed events per run and minute through this relay process.

    A runner sends a handful a minute (progress is coalesced); a flood from a leaked run secret
    would only grow the run's history. Counted after the signature check, so an unsigned caller
    cannot spend a run's allowance. Per process: N relays allow N times as much.
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, collections.deque[float]] = {}

    def admit(self, run_id: str, now: float) -> float | None:
        """None when admitted, else the seconds until the run may send again."""
        window = self._windows.setdefault(run_id, collections.deque())
        while window and now - window[0] >= 60:
            window.popleft()
        if len(window) >= self.per_minute:
            return 60 - (now - window[0])
        window.append(now)
        if len(self._windows) > 10_000:  # forget runs that went quiet
            self._windows = {k: w for k, w in self._windows.items() if w and now - w[-1] < 60}
        return None


# Signals one event to its run (raising a Rejection when it cannot): the event, the execution it
# was signed for, and when the relay received it (monotonic).
Deliver = Callable[[protocol.RunnerEvent, str | None, float], Awaitable[None]]


def _delivery(connection: TemporalConnection) -> Deliver:
    first_executions = FirstExecutions()

    async def deliver(event: protocol.RunnerEvent, execution: str | None, received: float) -> None:
        await _signal_run(await connection.get(), event, execution, first_executions)
        # latency: receipt to Temporal's acknowledgement here; age: since the runner sent it.
        log.info(
            "delivered run=%s attempt=%d seq=%d type=%s latency_ms=%d age_ms=%d",
            event.run_id,
            event.attempt,
            event.seq,
            event.type,
            (time.monotonic() - received) * 1000,
            _age_ms(event.at),
        )

    return deliver


# How often a run (by id: its current execution answers) wants its progress and heartbeats
# signalled (seconds; 0: as they come).
Wanted = Callable[[str], Awaitable[float]]


def _progress_wanted(connection: TemporalConnection) -> Wanted:
    async def wanted(run_id: str) -> float:
        handle = (await connection.get()).get_workflow_handle(run_id)
        every_s = await handle.query(PROGRESS_EVERY_QUERY, rpc_timeout=TEMPORAL_RPC_TIMEOUT)
        return float(every_s)

    return wanted


@dataclass
class _Held:
    event: protocol.RunnerEvent
    received: float


def _adds_nothing(heartbeat: protocol.RunnerEvent, progress: protocol.RunnerEvent) -> bool:
    """Whether the workflow learns nothing from `heartbeat` once it has `progress`: it reads a
    heartbeat's step (liveness) and its stage (an upload retrying), not its byte counts."""
    beat, step = heartbeat.parsed(), progress.parsed()
    return (
        isinstance(beat, protocol.HeartbeatData)
        and isinstance(step, protocol.TrainingProgressData)
        and heartbeat.attempt == progress.attempt
        and beat.stage == "training"
        and (beat.step is None or beat.step <= step.step)
    )


class _RunLane:
    """One run's coalesced events in this relay process. `lock` is held around every signal of
    the run that goes through the lane, so the run receives them in the order they were sent."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.lock = asyncio.Lock()
        # The newest progress and the newest heartbeat not yet signalled.
        self.held: dict[str, _Held] = {}
        self.last_signal = float("-inf")
        self.timer: asyncio.Task[None] | None = None
        # A signal sent in the background failed: the run's next event is signalled in its own
        # request, so the runner hears why (410: stop; 503: retry) instead of another 202.
        self.answer_next = False
        # How often the run wants its progress (its answer to PROGRESS_EVERY_QUERY), when it
        # was last asked, and the question in flight.
        self.wanted_s = 0.0
        self.asked_at = float("-inf")
        self.asking: asyncio.Task[None] | None = None
        # Set when the run asks for its progress sooner (a watch came): the timer looks again.
        self.sooner = asyncio.Event()

    def take(self) -> _Held | None:
        """What the next signal carries: the newest progress (a heartbeat it makes redundant
        goes with it), else the newest heartbeat; a heartbeat that still matters waits one
        interval more rather than make a second signal."""
        progress = self.held.pop("training.progress", None)
        if progress is None:
            return self.held.pop("heartbeat", None)
        heartbeat = self.held.get("heartbeat")
        if heartbeat is not None and _adds_nothing(heartbeat.event, progress.event):
            del self.held["heartbeat"]
        return progress

    def restore(self, held: _Held) -> None:
        """Hold a signal that failed for another try, unless a newer event replaced it."""
        self.held.setdefault(held.event.type, held)

    def idle(self, now: float, interval_s: float) -> bool:
        return (
            not self.held
            and self.timer is None
            and self.asking is None
            and not self.lock.locked()
            and now - self.last_signal >= interval_s
        )


class ProgressCoalescer:
    """Delivers runner events to runs, with progress and heartbeats coalesced per run.

    Milestones (every other type) are signalled at once, after whatever the run has held, so a
    milestone never overtakes the progress sent before it. A progress or heartbeat event is
    signalled at once when the run had no such signal for `interval_s`; otherwise it is held
    (the newest of each type wins) and signalled when the interval is up. So a run gets at most
    one progress or heartbeat signal per interval, and the status of a run someone watches is
    never staler than that.
    State is per process and per run (id and execution); N relays send at most N times as many.
    With `interval_s` 0 every event is signalled as it comes.

    With `wanted`, a run's interval is the longer of `interval_s` and what the run asks for,
    asked every `recheck_s` in the background: a run nobody watches wants its progress every
    few minutes, so it costs a few history events an hour; once a watch attaches, the next
    check (within `recheck_s`) brings it back to `interval_s`. A run that cannot answer gets
    `interval_s`.
    """

    def __init__(
        self,
        interval_s: float,
        deliver: Deliver,
        wanted: Wanted | None = None,
        recheck_s: float = 30.0,
    ) -> None:
        self.interval_s = interval_s
        self.recheck_s = recheck_s
        self._deliver = deliver
        self._wanted = wanted
        self._lanes: dict[tuple[str, str | None], _RunLane] = {}

    async def take(
        self, event: protocol.RunnerEvent, execution: str | None, received: float
    ) -> None:
        """Signal `event` now or hold it for the run's next signal. Raises a Rejection when a
        signal sent now fails (including one the run held, sent before a milestone)."""
        key = (event.run_id, execution)
        if self.interval_s <= 0:
            await self._deliver(event, execution, received)
            return
        if event.type not in COALESCED_TYPES:
            lane = self._lanes.get(key)
            if lane is None:
                await self._deliver(event, execution, received)
                return
            async with lane.lock:
                while lane.held:  # a heartbeat left after the progress goes first too
                    await self._send_held(lane, execution)
                await self._deliver(event, execution, received)
            return
        now = time.monotonic()
        lane = self._lane(key, now)
        self._ask_wanted(lane, now)
        lane.held[event.type] = _Held(event, received)
        if lane.answer_next or now - lane.last_signal >= self._interval(lane):
            async with lane.lock:
                await self._send_held(lane, execution)
        if lane.held and lane.timer is None:  # held, or a heartbeat left for the next interval
            lane.timer = asyncio.create_task(
                self._send_when_due(lane, execution), name=f"coalesced-{event.run_id}"
            )

    async def close(self) -> None:
        """Signal everything held (a relay shutting down), then stop the timers."""
        lanes = list(self._lanes.items())
        await asyncio.gather(
            *(self._flush(lane, key[1], when_due=False) for key, lane in lanes if lane.held)
        )
        timers = [lane.timer for _, lane in lanes if lane.timer is not None]
        timers += [lane.asking for _, lane in lanes if lane.asking is not None]
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        self._lanes.clear()

    def _lane(self, key: tuple[str, str | None], now: float) -> _RunLane:
        lane = self._lanes.get(key)
        if lane is None:
            if len(self._lanes) >= MAX_TRACKED_RUNS:  # forget runs that went quiet
                self._lanes = {
                    k: v for k, v in self._lanes.items() if not v.idle(now, self._interval(v))
                }
            lane = self._lanes[key] = _RunLane(key[0])
        return lane

    def _interval(self, lane: _RunLane) -> float:
        return max(self.interval_s, lane.wanted_s)

    def _ask_wanted(self, lane: _RunLane, now: float) -> None:
        """Ask the run how often it wants progress, in the background, every `recheck_s`."""
        if self._wanted is None or lane.asking is not None or now - lane.asked_at < self.recheck_s:
            return
        lane.asked_at = now
        lane.asking = asyncio.create_task(self._ask(lane), name=f"progress-wanted-{lane.run_id}")

    async def _ask(self, lane: _RunLane) -> None:
        assert self._wanted is not None
        try:
            wanted_s = max(0.0, await self._wanted(lane.run_id))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # An older worker (no such query: the lane stays at the relay's pace), a closed
            # run, or Temporal busy: what the run last said stands.
            log.debug("run %s did not say how often it wants progress: %s", lane.run_id, e)
            return
        finally:
            lane.asking = None
        if wanted_s < lane.wanted_s:
            lane.sooner.set()
        lane.wanted_s = wanted_s

    async def _send_held(self, lane: _RunLane, execution: str | None) -> None:
        """Signal what the lane holds, if anything; the caller holds `lane.lock`."""
        held = lane.take()
        if held is None:
            return
        lane.last_signal = time.monotonic()
        try:
            await self._deliver(held.event, execution, held.received)
        except Rejection as rejection:
            lane.answer_next = True
            if rejection.status_code >= 500:
                lane.restore(held)
            raise
        lane.answer_next = False

    async def _flush(self, lane: _RunLane, execution: str | None, *, when_due: bool) -> None:
        """Signal what the lane holds in the background: when due, the next signal if the
        interval is still up once the lock is ours; else (shutting down) all of it. A failure is
        logged, and the runner hears it when it next posts (answer_next)."""
        async with lane.lock:
            if when_due and time.monotonic() - lane.last_signal < self._interval(lane):
                return  # a signal went out while this waited for the lock
            try:
                await self._send_held(lane, execution)
                while lane.held and not when_due:
                    await self._send_held(lane, execution)
            except Rejection as rejection:
                log.warning(
                    "held event for run %s not delivered (%d): %s",
                    lane.run_id,
                    rejection.status_code,
                    rejection.message,
                )
            except Exception:
                log.exception("held event for run %s not delivered", lane.run_id)

    async def _send_when_due(self, lane: _RunLane, execution: str | None) -> None:
        try:
            while lane.held:
                now = time.monotonic()
                self._ask_wanted(lane, now)  # a watch may have come meanwhile
                wait_s = lane.last_signal + self._interval(lane) - now
                if wait_s > 0:
                    lane.sooner.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.sooner.wait(), min(wait_s, self.recheck_s))
                    continue
                await self._flush(lane, execution, when_due=True)
        finally:
            lane.timer = None


def _events_endpoint(
    settings: Settings, coalescer: ProgressCoalescer
) -> Callable[[Request], Awaitable[Response]]:
    rate = RunEventRate(settings.relay_max_events_per_minute)

    async def post_event(request: Request) -> Response:
        received = time.monotonic()
        run_id = request.path_params["run_id"]
        execution: str | None = request.path_params.get("execution")
        try:
            async with asyncio.timeout(settings.http_timeout_s):
                body = await _read_limited_body(request, protocol.MAX_EVENT_BYTES)
            _verify_signature(settings, run_id, execution, request, body)
            wait_s = rate.admit(run_id, received)
            if wait_s is not None:
                raise Rejection(
                    429,
                    f"run {run_id} sent more than {rate.per_minute} events in a minute",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
            event = _parse_event(run_id, request, body)
            await coalescer.take(event, execution, received)
        except Rejection as rejection:
            if rejection.status_code >= 500:
                log.warning("event for run %s not delivered: %s", run_id, rejection.message)
            else:
                log.info("event rejected with %d: %s", rejection.status_code, rejection.message)
            return rejection.response()
        except TimeoutError:
            return Rejection(408, "request body not received in time").response()
        except ClientDisconnect:
            return Rejection(400, "client disconnected before sending the body").response()
        return JSONResponse({"accepted": True, "id": event.webhook_id}, 202)

    return post_event


# --------------------------------------------------------------------------------------------
# Upload URLs for saved epochs
# --------------------------------------------------------------------------------------------


def _uploads_endpoint(
    settings: Settings, connection: TemporalConnection
) -> Callable[[Request], Awaitable[Response]]:
    """Presigned PUTs for one epoch's files, under the run's own prefix, for a runner whose
    request is signed with its run's secret while the run is open. The GPU never holds S3
    credentials: each URL names one key and lives settings.epoch_upload_url_ttl_s."""
    presigner = s3_client(settings, settings.s3_public_endpoint_url)
    first_executions = FirstExecutions()

    async def post_uploads(request: Request) -> Response:
        run_id, execution = request.path_params["run_id"], request.path_params["execution"]
        try:
            async with asyncio.timeout(settings.http_timeout_s):
                body = await _read_limited_body(request, protocol.MAX_EVENT_BYTES)
            _verify_signature(settings, run_id, execution, request, body)
            try:
                asked = protocol.UploadUrlsRequest.model_validate_json(body)
            except ValidationError as e:
                raise Rejection(
                    400, f"not an upload request: {protocol.describe_invalid(e)}"
                ) from None
            if asked.run_id != run_id:
                raise Rejection(400, f"request is for run {asked.run_id!r}, not {run_id!r}")
            await _check_current(await connection.get(), asked, execution, first_executions)
        except Rejection as rejection:
            log.info("upload URLs refused with %d: %s", rejection.status_code, rejection.message)
            return rejection.response()
        except TimeoutError:
            return Rejection(408, "request body not received in time").response()
        except ClientDisconnect:
            return Rejection(400, "client disconnected before sending the body").response()
        prefix = epoch_prefix(run_id, execution, asked.epoch)
        ttl_s = settings.epoch_upload_url_ttl_s
        keys = {name: f"{prefix}/{name}" for name in asked.files}
        urls = {
            name: presigner.generate_presigned_url(
                "put_object", Params={"Bucket": settings.bucket, "Key": key}, ExpiresIn=ttl_s
            )
            for name, key in keys.items()
        }
        answer = protocol.UploadUrls(
            bucket=settings.bucket, urls=urls, keys=keys, expires_in_s=ttl_s
        )
        return Response(answer.model_dump_json(), 200, media_type="application/json")

    return post_uploads


async def _check_current(
    client: Client,
    asked: protocol.UploadUrlsRequest,
    execution: str,
    first_executions: FirstExecutions,
) -> None:
    """410 unless the run of this first execution is still running and the asking GPU is its
    current attempt: a replaced host that still runs never writes over its successor's epochs."""
    run_id = asked.run_id
    handle = client.get_workflow_handle(run_id)
    await first_executions.check(handle, execution)
    try:
        description = await handle.describe(rpc_timeout=TEMPORAL_RPC_TIMEOUT)
    except RPCError as e:
        raise _rpc_failure("describe", run_id, e) from None
    status = description.status
    if status is not None and status != WorkflowExecutionStatus.RUNNING:
        raise Rejection(410, "run is closed", extra={"status": status.name})
    try:
        current: RunStatus = await handle.query(
            RUN_STATUS_QUERY, result_type=RunStatus, rpc_timeout=TEMPORAL_RPC_TIMEOUT
        )
    except RPCError as e:
        raise _rpc_failure("query", run_id, e) from None
    except WorkflowQueryFailedError as e:
        raise _temporal_unavailable(f"the run did not answer its status query: {e}") from None
    if current.attempt != asked.attempt:
        raise Rejection(
            410,
            f"GPU attempt {asked.attempt} was replaced: the run is on attempt {current.attempt}",
            extra={"status": "REPLACED"},
        )


# --------------------------------------------------------------------------------------------
# Codec server
# --------------------------------------------------------------------------------------------


def _codec_endpoint(
    convert: Callable[[Sequence[Payload]], Awaitable[list[Payload]]],
    verb: str,
    token: str | None,
) -> Callable[[Request], Awaitable[Response]]:
    expected = f"Bearer {token}".encode() if token else None

    async def endpoint(request: Request) -> Response:
        try:
            given = request.headers.get("authorization", "").encode()
            if expected is not None and not hmac.compare_digest(given, expected):
                raise Rejection(401, "the codec server needs Authorization: Bearer <token>")
            body = await _read_limited_body(request, MAX_CODEC_BYTES)
            try:
                payloads = json_format.Parse(body, Payloads())
            except (json_format.ParseError, ValueError) as e:
                raise Rejection(
                    400, f'body is not {{"payloads": [...]}} in proto3 JSON: {e}'
                ) from None
            try:
                converted = await convert(payloads.payloads)
            except (InvalidTag, DecodeError, ValueError) as e:
                raise Rejection(400, f"cannot {verb} payloads: {e or type(e).__name__}") from None
        except Rejection as rejection:
            return rejection.response()
        except ClientDisconnect:
            return Rejection(400, "client disconnected before sending the body").response()
        return JSONResponse({"payloads": [json_format.MessageToDict(p) for p in converted]})

    return endpoint


def _codec_routes(codec: EncryptionCodec, settings: Settings) -> list[Route]:
    secret = settings.codec_auth_token
    token = secret.get_secret_value() if secret else None
    return [
        Route("/decode", _codec_endpoint(codec.decode, "decode", token), methods=["POST"]),
        Route("/encode", _codec_endpoint(codec.encode, "encode", token), methods=["POST"]),
    ]


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, 500)


def create_app(settings: Settings, client: Client | None = None) -> Starlette:
    """The relay as an ASGI app.

    With `client` None, one Temporal client is connected at startup and shared by requests; while
    Temporal is unreachable the relay keeps serving, answers 503, and retries on later requests.
    Raises at once when the master secret or the codec key is missing from `settings`.
    """
    settings.require_master_secret()
    codec = codec_from_settings(settings)
    connection = TemporalConnection(settings, client)
    coalescer = ProgressCoalescer(
        settings.relay_progress_interval_s,
        _delivery(connection),
        _progress_wanted(connection),
        settings.relay_progress_recheck_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not connection.connected:
            with contextlib.suppress(Rejection):  # logged; requests retry
                await connection.get()
        try:
            yield
        finally:
            await coalescer.close()  # what runs hold back reaches them before the relay stops

    async def healthz(request: Request) -> Response:
        # Liveness only: a relay without Temporal still answers (503s) and reconnects itself.
        return JSONResponse({"ok": True, "temporal_connected": connection.connected})

    events = _events_endpoint(settings, coalescer)
    uploads = _uploads_endpoint(settings, connection)
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/runs/{run_id}/events", events, methods=["POST"]),
            Route("/v1/runs/{run_id}/executions/{execution}/events", events, methods=["POST"]),
            Route("/v1/runs/{run_id}/executions/{execution}/uploads", uploads, methods=["POST"]),
            Mount(
                "/codec",
                routes=_codec_routes(codec, settings),
                # Only the codec server is called from browsers (the Temporal UI).
                middleware=[
                    Middleware(
                        CORSMiddleware,
                        allow_origins=settings.codec_cors_origins,
                        allow_methods=["POST"],
                        allow_headers=CODEC_CORS_HEADERS,
                        max_age=600,
                    )
                ],
            ),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )


def check_codec_exposure(settings: Settings) -> None:
    """Refuse an open codec server on a relay that listens beyond loopback: GPU boxes (the
    internet) reach the relay, and the codec decrypts every payload of every run."""
    if settings.codec_auth_token is None and not _is_loopback(settings.relay_host):
        raise RuntimeError(
            f"the relay listens on {settings.relay_host}, beyond loopback, so its codec routes "
            "need a token: set LORA_CODEC_AUTH_TOKEN"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_relay(settings: Settings) -> None:
    """Serve the relay on settings.relay_host:settings.relay_port until interrupted."""
    check_codec_exposure(settings)
    configure_logging()
    config = uvicorn.Config(
        create_app(settings),
        host=settings.relay_host,
        port=settings.relay_port,
        timeout_graceful_shutdown=10,
        # Our format for uvicorn's lines too; each delivered event has its own line instead of
        # an access log line.
        log_config=None,
        access_log=False,
        # The C parser and, where it installs (not Windows), the C event loop: both are
        # dependencies, named here so a relay never falls back to the pure-Python parser.
        loop="auto",
        http="httptools",
    )
    uvicorn.Server(config).run()
