"""Deliver the runner's events to the relay: in order, signed, retried until the orphan timeout.

One delivery task sends one event at a time, so the relay sees events in the order they were
emitted. `seq` is assigned when an event is first sent (not when it is emitted), so coalescing
progress events never leaves a gap. A retried event keeps its seq (the relay de-duplicates on it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import httpx
from pydantic import BaseModel

from gpu_runner.protocol import EventType, RunnerEvent, make_event, sign_event

log = logging.getLogger("gpu_runner.events")

# Only the newest of these matters: one waiting unsent is replaced by a newer one.
COALESCED_TYPES: frozenset[EventType] = frozenset({"training.progress", "heartbeat"})

# Answers that mean "try again later"; every other 4xx is final for that event.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


class _Outcome(Enum):
    DELIVERED = "delivered"
    DROPPED = "dropped"
    CLOSED = "closed"
    ORPHANED = "orphaned"


@dataclass
class _Pending:
    type: EventType
    data: BaseModel


GiveUpReason = Literal["closed", "orphaned"]


class EventSender:
    """An ordered, retrying, coalescing queue of events for one run attempt.

    `gave_up` is set when the relay answers 410 (the run is closed: the runner must stop) or when
    nothing could be delivered for `orphan_timeout_s` (the orchestrator is gone: the runner exits
    and the reaper destroys the instance). After that, emitted events are discarded.
    """

    def __init__(
        self,
        *,
        run_id: str,
        attempt: int,
        events_url: str,
        secret: str,
        client: httpx.AsyncClient,
        orphan_timeout_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self._run_id = run_id
        self._attempt = attempt
        self._events_url = events_url
        self._secret = secret
        self._client = client
        self._orphan_timeout_s = orphan_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._last_delivery = time.monotonic()
        self._failed_since_delivery = False
        self.next_seq = 1
        self.delivered = 0
        self.dropped = 0
        self.gave_up = asyncio.Event()
        self.give_up_reason: GiveUpReason | None = None

    def start(self) -> None:
        self._last_delivery = time.monotonic()
        self._task = asyncio.create_task(self._deliver_forever(), name="event-delivery")

    def emit(self, event_type: EventType, data: BaseModel) -> None:
        """Queue an event; never blocks. A waiting progress/heartbeat is replaced by a newer one."""
        if self.gave_up.is_set():
            return
        if event_type in COALESCED_TYPES:
            for i, waiting in enumerate(self._queue):
                if waiting.type == event_type:
                    self._queue[i] = _Pending(event_type, data)
                    return
        self._queue.append(_Pending(event_type, data))
        self._idle.clear()
        self._wakeup.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued event was sent (or the sender gave up); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return not self._queue

    async def close(self) -> None:
        """Stop the delivery task; whatever is still queued is lost."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _give_up(self, reason: GiveUpReason) -> None:
        self.give_up_reason = reason
        self._queue.clear()
        self.gave_up.set()
        self._idle.set()

    def _orphaned(self) -> bool:
        return time.monotonic() - self._last_delivery > self._orphan_timeout_s

    async def _deliver_forever(self) -> None:
        while True:
            while not self._queue:
                self._idle.set()
                self._wakeup.clear()
                if self._failed_since_delivery:
                    # Nothing to send, but the relay has been failing: give up on time anyway.
                    remaining = self._orphan_timeout_s - (time.monotonic() - self._last_delivery)
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), max(remaining, 0) + 0.01)
                    except TimeoutError:
                        if self._orphaned():
                            self._log_orphaned()
                            self._give_up("orphaned")
                            return
                else:
                    await self._wakeup.wait()
            pending = self._queue.popleft()
            event = make_event(
                self._run_id, self.next_seq, pending.data, pending.type, attempt=self._attempt
            )
            # The seq is used up even when the relay refuses the event: reusing it could make the
            # relay take a different event for a duplicate of one it already saw.
            self.next_seq += 1
            outcome = await self._deliver(event)
            if outcome is _Outcome.CLOSED:
                log.warning("relay answered 410: run %s is closed; stopping", self._run_id)
                self._give_up("closed")
                return
            if outcome is _Outcome.ORPHANED:
                self._log_orphaned()
                self._give_up("orphaned")
                return

    def _log_orphaned(self) -> None:
        log.error(
            "no event delivered to the relay for %.0f s; giving up (the orchestrator cleans up)",
            self._orphan_timeout_s,
        )

    async def _deliver(self, event: RunnerEvent) -> _Outcome:
        seq, event_type = event.seq, event.type
        delay = self._retry_initial_s
        while True:
            # Re-signed on every try, so a long outage never trips the timestamp tolerance.
            body, headers = sign_event(self._secret, event)
            try:
                response = await self._client.post(self._events_url, content=body, headers=headers)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self._last_delivery = time.monotonic()
                    self._failed_since_delivery = False
                    self.delivered += 1
                    return _Outcome.DELIVERED
                if status == 410:
                    return _Outcome.CLOSED
                if status < 500 and status not in RETRYABLE_STATUSES:
                    self._failed_since_delivery = True
                    self.dropped += 1
                    log.error(
                        "relay refused event %s (seq %d) with HTTP %d: %s; dropping it",
                        event_type,
                        seq,
                        status,
                        response.text[:200],
                    )
                    return _Outcome.DROPPED
                problem = f"HTTP {status}"
            self._failed_since_delivery = True
            remaining = self._orphan_timeout_s - (time.monotonic() - self._last_delivery)
            if remaining <= 0:
                return _Outcome.ORPHANED
            wait_s = min(delay, remaining)
            log.warning(
                "could not deliver event %s (seq %d): %s; retrying in %.2f s",
                event_type,
                seq,
                problem,
                wait_s,
            )
            await asyncio.sleep(wait_s)
            delay = min(delay * 2, self._retry_max_s)
