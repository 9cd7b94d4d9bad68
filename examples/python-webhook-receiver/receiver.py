"""A receiver for loratrain's user webhooks: standard library HTTP server + `standardwebhooks`.

Each run POSTs its events (`training.status`, `training.progress`, `training.completed`,
`training.failed`, `training.stalled`, `training.cancelled`; bodies in
schemas/user-webhook.schema.json) to the webhook URL of its request, signed per Standard Webhooks
with the request's `whsec_` secret. This receiver verifies the raw body before reading it,
answers 401 to anything unsigned, tampered or older than five minutes, 400 to a signed body
that is not a webhook, and handles each event once (the `webhook-id` is the same on every retry).

    LORATRAIN_WEBHOOK_SECRET=whsec_... python receiver.py --port 8091

then start runs with `"webhook": {"url": "http://<this host>:8091/webhooks/loratrain",
"secret": "whsec_..."}` (or `loratrain train ... --webhook-url ... --webhook-secret ...`).
A 2xx answer tells the run the event arrived; a 4xx makes it give that event up; a 5xx or no
answer makes it retry for up to a day.
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import sys
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

PATH = "/webhooks/loratrain"
MAX_BODY_BYTES = 1024 * 1024
# Ids of handled events, to answer a redelivery without handling it twice.
REMEMBERED_IDS = 10_000
EVENT_TYPES = frozenset(
    {
        "training.status",
        "training.progress",
        "training.completed",
        "training.failed",
        "training.stalled",
        "training.cancelled",
    }
)


def handle_event(webhook_id: str, event: dict[str, Any]) -> None:
    """What your backend does with one verified event; here, one JSON line on stdout."""
    line = {
        "at": datetime.now(UTC).isoformat(),
        "msg": "webhook received",
        "webhook_id": webhook_id,
        "type": event["type"],
        "run_id": event["run_id"],
        "data": event["data"],
    }
    print(json.dumps(line), flush=True)


def envelope_problem(event: object) -> str | None:
    """Why a verified body is not a loratrain webhook ({type, run_id, timestamp, data}), or None."""
    if not isinstance(event, dict):
        return "the body is not a JSON object"
    for key, kind in (("type", str), ("run_id", str), ("timestamp", str), ("data", dict)):
        if not isinstance(event.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    return None


class Receiver:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)  # a secret that is not base64 fails here, at start
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def receive(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
        """The answer (status, JSON body or None) to one POST."""
        try:
            self._webhook.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error) as e:
            # Malformed headers raise ValueError or binascii.Error, not only the library's own.
            return 401, {"error": f"signature refused: {e or type(e).__name__}"}
        try:
            event = json.loads(body)
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        problem = envelope_problem(event)
        if problem is not None:
            return 400, {"error": f"not a loratrain webhook: {problem}"}
        if event["type"] not in EVENT_TYPES:
            # A type added after this receiver was written: acknowledged, never refused.
            return 202, {"ignored": event["type"]}
        webhook_id = headers["webhook-id"]
        with self._lock:
            if webhook_id in self._seen:
                return 200, {"duplicate": webhook_id}
            handle_event(webhook_id, event)
            self._seen[webhook_id] = None
            if len(self._seen) > REMEMBERED_IDS:
                self._seen.popitem(last=False)
        return 204, None


def make_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != PATH:
                self._answer(404, {"error": f"no route POST {self.path}"})
                return
            try:
                length = int(self.headers.get("content-length", ""))
            except ValueError:
                self._answer(411, {"error": "send a Content-Length"})
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                self._answer(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"})
                return
            body = self.rfile.read(length)
            headers = {
                name: self.headers.get(name, "")
                for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
            }
            self._answer(*receiver.receive(body, headers))

        def _answer(self, status: int, body: dict[str, Any] | None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # handle_event says what arrived; refusals are in the answers

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args(argv)
    secret = os.environ.get("LORATRAIN_WEBHOOK_SECRET", "")
    if not secret.startswith("whsec_"):
        print("error: set LORATRAIN_WEBHOOK_SECRET to the runs' whsec_ secret", file=sys.stderr)
        return 2
    try:
        receiver = Receiver(secret)
    except (ValueError, binascii.Error):
        print("error: LORATRAIN_WEBHOOK_SECRET must be whsec_ followed by base64", file=sys.stderr)
        return 2
    server = ThreadingHTTPServer((args.host, args.port), make_handler(receiver))
    print(
        json.dumps({"msg": "listening", "url": f"http://{args.host}:{server.server_port}{PATH}"}),
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
