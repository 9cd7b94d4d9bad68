"""A recording relay for runner tests: verifies every signature, records events, misbehaves on cue.

    relay = RecordingRelay(master_secret)
    with serve_asgi(relay.app) as base_url:
        events_url = relay.events_url(base_url, run_id)
        ...
        assert relay.types() == ["gpu.ready", "images.ready", ...]

It checks what the real relay checks, in the same order (size 413, signature 401, body 400), with
the run's secret derived from the master secret; it answers 202 for good events. Knobs:
`fail_next(n)` answers 503 to the next n requests, `fail_for(seconds)` answers 503 for a while,
`fail_for_after(event_type, seconds)` starts such an outage once an event of that type arrived,
`close_on(event_type)` answers 410 from the first event of that type on, `closed = True` answers
410 to everything, `reject(event_type, status)` answers `status` to events of that type.

With `presigner` (an S3 client) and `bucket` it also hands out epoch upload URLs, as the real
relay does, at `/v1/runs/<run_id>/uploads`: presigned PUTs under `runs/<run_id>/epochs/<epoch>/`
for a request signed with the run's secret; `refuse_uploads = True` answers 503 instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpu_runner.protocol import (
    MAX_EVENT_BYTES,
    RunnerEvent,
    SignatureError,
    UploadUrls,
    UploadUrlsRequest,
    derive_run_secret,
    parse_event,
    verify_payload,
)


@dataclass(frozen=True)
class Answer:
    """One request and what the relay answered (events only when the body was verified)."""

    status: int
    event: RunnerEvent | None
    at: float


class RecordingRelay:
    def __init__(self, master_secret: str, presigner: Any = None, bucket: str = "") -> None:
        self.master_secret = master_secret
        self.presigner = presigner
        self.bucket = bucket
        self.upload_requests: list[UploadUrlsRequest] = []
        self.refuse_uploads = False
        self.events: list[RunnerEvent] = []  # accepted (202), first delivery of each webhook id
        self.answers: list[Answer] = []
        self.duplicates = 0
        self.bad_signatures = 0
        self.closed = False
        self._fail_next = 0
        self._fail_until = 0.0
        self._outage_after: tuple[str, float] | None = None
        self._close_on: str | None = None
        self._reject: dict[str, int] = {}
        self._seen_ids: set[str] = set()
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/runs/{run_id}/events", self._post, methods=["POST"]),
                Route("/v1/runs/{run_id}/uploads", self._uploads, methods=["POST"]),
            ]
        )

    # -- knobs -------------------------------------------------------------------------------

    def fail_next(self, requests: int) -> None:
        with self._lock:
            self._fail_next = requests

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self._fail_until = time.monotonic() + seconds

    def fail_for_after(self, event_type: str, seconds: float) -> None:
        with self._lock:
            self._outage_after = (event_type, seconds)

    def close_on(self, event_type: str) -> None:
        with self._lock:
            self._close_on = event_type

    def reject(self, event_type: str, status: int) -> None:
        with self._lock:
            self._reject[event_type] = status

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def uploads_url(base_url: str, run_id: str) -> str:
        return f"{base_url}/v1/runs/{run_id}/uploads"

    @staticmethod
    def events_url(base_url: str, run_id: str) -> str:
        return f"{base_url}/v1/runs/{run_id}/events"

    def snapshot(self) -> list[RunnerEvent]:
        with self._lock:
            return list(self.events)

    def types(self, *, heartbeats: bool = False) -> list[str]:
        return [e.type for e in self.snapshot() if heartbeats or e.type != "heartbeat"]

    def of_type(self, event_type: str) -> list[RunnerEvent]:
        return [e for e in self.snapshot() if e.type == event_type]

    def wait_for(self, predicate: Callable[[list[RunnerEvent]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.02)
        return predicate(self.snapshot())

    def wait_for_type(self, event_type: str, timeout_s: float = 30.0) -> RunnerEvent:
        if not self.wait_for(lambda es: any(e.type == event_type for e in es), timeout_s):
            raise AssertionError(f"no {event_type} event within {timeout_s}s: {self.types()}")
        return self.of_type(event_type)[0]

    # -- the endpoint ------------------------------------------------------------------------

    def _answer(self, status: int, event: RunnerEvent | None = None) -> Response:
        self.answers.append(Answer(status, event, time.monotonic()))
        return JSONResponse({"status": status}, status)

    async def _uploads(self, request: Request) -> Response:
        body = await request.body()
        run_id = request.path_params["run_id"]
        try:
            secret = derive_run_secret(self.master_secret, run_id)
            verify_payload(secret, dict(request.headers), body)
            asked = UploadUrlsRequest.model_validate_json(body)
        except SignatureError:
            return JSONResponse({"error": "invalid signature"}, 401)
        except ValidationError:
            return JSONResponse({"error": "not an upload request"}, 400)
        if self.refuse_uploads or self.presigner is None:
            return JSONResponse({"error": "no uploads now"}, 503)
        self.upload_requests.append(asked)
        keys = {name: f"runs/{run_id}/epochs/{asked.epoch:04d}/{name}" for name in asked.files}
        urls = {
            name: self.presigner.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=900
            )
            for name, key in keys.items()
        }
        answer = UploadUrls(bucket=self.bucket, urls=urls, keys=keys, expires_in_s=900)
        return Response(answer.model_dump_json(), 200, media_type="application/json")

    async def _post(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            if len(body) > MAX_EVENT_BYTES:
                return self._answer(413)
            run_id = request.path_params["run_id"]
            try:
                verify_payload(
                    derive_run_secret(self.master_secret, run_id), dict(request.headers), body
                )
            except SignatureError:
                self.bad_signatures += 1
                return self._answer(401)
            try:
                event = parse_event(body)
            except ValueError:
                return self._answer(400)
            if event.run_id != run_id or request.headers.get("webhook-id") != event.webhook_id:
                return self._answer(400)
            if self._close_on is not None and event.type == self._close_on:
                self.closed = True
            if self.closed:
                return self._answer(410, event)
            if event.type in self._reject:
                return self._answer(self._reject[event.type], event)
            now = time.monotonic()
            if self._fail_next > 0:
                self._fail_next -= 1
                return self._answer(503, event)
            if now < self._fail_until:
                return self._answer(503, event)
            if event.webhook_id in self._seen_ids:
                self.duplicates += 1
                return self._answer(202, event)
            self._seen_ids.add(event.webhook_id)
            self.events.append(event)
            if self._outage_after is not None and event.type == self._outage_after[0]:
                self._fail_until = now + self._outage_after[1]
                self._outage_after = None
            return self._answer(202, event)
