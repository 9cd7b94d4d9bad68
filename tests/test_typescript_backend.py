"""The backends in examples/ against the embedded stack's real parts: a real `loratrain dev`
(Temporal dev server, SeaweedFS, relay, and the worker training with the builtin trainer on the
CPU), the TypeScript backend (examples/typescript-backend, compiled with tsc, run with node) and
the Python webhook receiver (examples/python-webhook-receiver).

One run, started by the TypeScript backend on images uploaded through its presigned URLs, is
shared by the module: it trains to `completed` while the backend streams its statuses and
receives its webhooks. A second run, started by `loratrain train`, is read and cancelled through
the backend and reports to the Python receiver.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import Payload

from activities.notify import UserWebhookInput, webhook_body
from common.converter import EncryptionCodec, load_codec_key
from devstack.stack import read_dev_env
from gpu_runner.demo_assets import TINY_MODEL_FILENAME, demo_training_config, write_demo_dataset
from gpu_runner.protocol import sign_payload
from workflows.models import RunStatus, RunStatusName

from .conftest import free_port
from .processes import Captured
from .test_cli import RunningDev, running_dev

ROOT = Path(__file__).resolve().parent.parent
BACKEND_DIR = ROOT / "examples" / "typescript-backend"
RECEIVER = ROOT / "examples" / "python-webhook-receiver" / "receiver.py"
# DESIGN.md's order of a run that completes.
STATUS_ORDER = ["pending", "pendingGpu", "pendingImages", "pendingModel", "training", "completed"]
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"typescript-backend-test-secret!!").decode()
# Stack start, model build, npm ci and a CPU training run on 2 busy cores, with room to spare.
pytestmark = pytest.mark.timeout(900)


def npm(*args: str, timeout_s: float = 600) -> None:
    npm_path = shutil.which("npm")
    assert npm_path is not None
    result = subprocess.run(
        [npm_path, *args],
        cwd=BACKEND_DIR,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"},
    )
    assert result.returncode == 0, f"npm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def built_backend() -> Path:
    """The backend compiled by tsc; `npm ci` first where node_modules is missing or older than
    the lockfile (CI: a fresh clone with the npm registry reachable)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to test examples/typescript-backend")
    installed = BACKEND_DIR / "node_modules" / ".package-lock.json"
    lockfile = BACKEND_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
        npm("ci", "--no-audit")
    npm("run", "build", timeout_s=300)
    return BACKEND_DIR / "dist" / "main.js"


def json_lines(process: Captured) -> list[dict[str, Any]]:
    """What a backend logged: its JSON lines (node's own warnings are not JSON)."""
    found = []
    for line in process.output.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                found.append(value)
    return found


def stop(process: Captured) -> None:
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        try:
            process.finish(timeout_s=15)
        except subprocess.TimeoutExpired:
            process.kill()


def poll(
    check: Callable[[], Any],
    what: str,
    timeout_s: float = 60,
    details: Callable[[], str] = lambda: "",
) -> Any:
    """`check()`'s first truthy answer; fails after `timeout_s` with `what` and `details()`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{details()}")
        time.sleep(0.2)


def until_webhook(
    receiver: Backend | Receiver, run_id: str, event_type: str
) -> list[dict[str, Any]]:
    """Every webhook of the run the receiver has logged, once one of them is `event_type`."""

    def arrived() -> list[dict[str, Any]] | None:
        received = receiver.webhooks(run_id)
        return received if any(w["type"] == event_type for w in received) else None

    found: list[dict[str, Any]] = poll(
        arrived, f"the run's {event_type} webhook", details=lambda: receiver.process.output
    )
    return found


# ------------------------------------------------------------------------------------------------
# The stack, the tiny model, the backend, the Python receiver
# ------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    dev: RunningDev
    dev_env: dict[str, str]
    model: Path
    images: Path

    @property
    def state(self) -> Path:
        return self.dev.state

    def loratrain(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`loratrain ARGS` as a user runs it next to the stack: only its state dir given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=self.state.parent,
            env={**env, "PYTHONPATH": str(ROOT), "LORA_STATE_DIR": str(self.state)},
            capture_output=True,
            text=True,
            timeout=120,
        )


def stop_build(build: subprocess.Popen[bytes]) -> None:
    if build.poll() is None:
        build.kill()
        build.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real `loratrain dev` on free ports, and the demo's tiny model and images (the model
    built while the stack starts)."""
    work = tmp_path_factory.mktemp("ts-backend")
    model = work / TINY_MODEL_FILENAME
    images = work / "images"
    write_demo_dataset(images)
    with contextlib.ExitStack() as cleanup:
        build_log = cleanup.enter_context((work / "model-build.log").open("wb"))
        build = subprocess.Popen(
            [sys.executable, "-m", "gpu_runner.demo_assets", "--model", str(model)],
            cwd=ROOT,
            stdout=build_log,
            stderr=subprocess.STDOUT,
        )
        cleanup.callback(stop_build, build)
        # `running_dev` starts the stack with this environment, its state in work/.loratrain.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LORA_STATE_DIR", str(work / ".loratrain"))
            dev = cleanup.enter_context(running_dev(work))
        assert build.wait(timeout=600) == 0, (work / "model-build.log").read_text()
        yield Stack(dev, read_dev_env(dev.state / "dev.env"), model, images)


@dataclass
class Backend:
    process: Captured
    url: str

    def client(self, timeout_s: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def webhooks(self, run_id: str) -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(self.process)
            if line.get("msg") == "webhook received" and line.get("run_id") == run_id
        ]


@contextlib.contextmanager
def running_backend(main_js: Path, stack: Stack, **settings: str) -> Iterator[Backend]:
    """`node dist/main.js` with nothing but the stack's state dir (it reads dev.env, as the CLI
    does), its port, its public URL, the webhook secret, and `settings`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")}
    process = Captured(
        ["node", str(main_js)],
        cwd=BACKEND_DIR,
        env={
            **env,
            "LORA_STATE_DIR": str(stack.state),
            "BACKEND_PORT": str(port),
            "BACKEND_PUBLIC_URL": url,
            "LORATRAIN_WEBHOOK_SECRET": WEBHOOK_SECRET,
            **settings,
        },
    )
    try:
        process.wait_for_line('"msg":"listening"', timeout_s=60)
        yield Backend(process, url)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def backend(built_backend: Path, stack: Stack) -> Iterator[Backend]:
    with running_backend(built_backend, stack) as running:
        yield running


@dataclass
class Receiver:
    process: Captured
    url: str

    def webhooks(self, run_id: str) -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(self.process)
            if line.get("msg") == "webhook received" and line.get("run_id") == run_id
        ]


@pytest.fixture(scope="module")
def python_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    port = free_port()
    process = Captured(
        [sys.executable, str(RECEIVER), "--port", str(port)],
        cwd=tmp_path_factory.mktemp("receiver"),
        env={**os.environ, "LORATRAIN_WEBHOOK_SECRET": WEBHOOK_SECRET},
    )
    try:
        process.wait_for_line('"msg": "listening"', timeout_s=30)
        yield Receiver(process, f"http://127.0.0.1:{port}/webhooks/loratrain")
    finally:
        stop(process)


# ------------------------------------------------------------------------------------------------
# The shared run: uploaded, started, streamed and received by the TypeScript backend
# ------------------------------------------------------------------------------------------------


@dataclass
class SseEvent:
    event: str
    id: str | None
    data: dict[str, Any]


def read_events(client: httpx.Client, path: str, timeout_s: float = 300) -> list[SseEvent]:
    """Every Server-Sent Event of the stream until the server ends it (after `end`)."""
    events: list[SseEvent] = []
    deadline = time.monotonic() + timeout_s
    fields: dict[str, str] = {}
    # The backend writes a keep-alive comment every 15 s: a read that waits longer is a hang.
    with client.stream("GET", path, timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"the stream did not end in {timeout_s} s"
            if line == "":
                if "data" in fields:
                    events.append(
                        SseEvent(
                            fields.get("event", "message"),
                            fields.get("id"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return events


@dataclass
class TrainedRun:
    run_id: str
    started: dict[str, Any]
    events: list[SseEvent]

    @property
    def statuses(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.event == "status"]


@pytest.fixture(scope="module")
def trained_run(backend: Backend, stack: Stack) -> TrainedRun:
    """The demo's images PUT through the backend's presigned URLs, the run started by its POST
    (no webhook given: the backend names its own receiver), its event stream read to the end."""
    with backend.client() as client, httpx.Client(timeout=30) as s3:
        names = sorted(p.name for p in stack.images.iterdir())
        offered = client.post("/uploads", json={"files": names})
        assert offered.status_code == 200, offered.text
        plan = offered.json()
        for upload in plan["uploads"]:
            put = s3.put(
                upload["url"],
                content=(stack.images / upload["name"]).read_bytes(),
                headers=upload["headers"],
            )
            assert put.status_code == 200, put.text
        request = {
            "images": plan["images"],
            "model": str(stack.model),
            "training": demo_training_config().model_dump(mode="json", exclude_defaults=True),
            "trainer": "builtin",
        }
        started = client.post("/runs", params={"run_id": plan["run_id"]}, json=request)
        assert started.status_code == 201, started.text
        again = client.post("/runs", params={"run_id": plan["run_id"]}, json=request)
        assert again.status_code == 409, again.text
        events = read_events(client, f"/runs/{plan['run_id']}/events")
    return TrainedRun(plan["run_id"], started.json(), events)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_the_generated_types_match_the_schemas(built_backend: Path) -> None:
    npm("run", "generate:check", timeout_s=120)


CODEC_SCRIPT = """
const { AesGcmCodec } = require('./dist/codec.js');
const { temporal } = require('@temporalio/proto');
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const codec = new AesGcmCodec({ [input.keyId]: Buffer.from(input.key, 'base64') }, input.keyId);
const Payload = temporal.api.common.v1.Payload;
const b64 = (bytes) => Buffer.from(bytes).toString('base64');
const wire = (p) => b64(Payload.encode(p).finish());
(async () => {
  const out = { decoded: [], encoded: null, refused: [] };
  for (const sealed of input.decode) {
    const [plain] = await codec.decode([Payload.decode(Buffer.from(sealed, 'base64'))]);
    out.decoded.push(wire(plain));
  }
  const [sealed] = await codec.encode([Payload.decode(Buffer.from(input.encode, 'base64'))]);
  out.encoded = wire(sealed);
  for (const bad of input.refuse) {
    try {
      await codec.decode([Payload.decode(Buffer.from(bad, 'base64'))]);
      out.refused.push(null);
    } catch (e) {
      out.refused.push(e.message);
    }
  }
  process.stdout.write(JSON.stringify(out));
})();
"""


async def test_the_codec_reads_and_writes_what_the_python_codec_does(
    built_backend: Path,
) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    python = EncryptionCodec(load_codec_key(key), "k1")
    other = EncryptionCodec(load_codec_key(base64.b64encode(bytes(32)).decode()), "k2")
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"run_id":"r1","version":3}')
    unencrypted = Payload(metadata={"encoding": b"binary/null"})
    (sealed,) = await python.encode([plain])
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    (foreign,) = await other.encode([plain])

    def wire(p: Payload) -> str:
        return base64.b64encode(p.SerializeToString()).decode()

    answer = await asyncio.to_thread(
        subprocess.run,
        ["node", "-e", CODEC_SCRIPT],
        cwd=BACKEND_DIR,
        input=json.dumps(
            {
                "key": key,
                "keyId": "k1",
                "decode": [wire(sealed), wire(unencrypted)],
                "encode": wire(plain),
                "refuse": [wire(tampered), wire(foreign)],
            }
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    out = json.loads(answer.stdout)

    def payload(encoded: str) -> Payload:
        return Payload.FromString(base64.b64decode(encoded))

    # What Python sealed, TypeScript opens; what is not sealed passes through.
    assert [payload(p) for p in out["decoded"]] == [plain, unencrypted]
    # What TypeScript seals is the documented format, and Python opens it.
    ts_sealed = payload(out["encoded"])
    assert dict(ts_sealed.metadata) == {"encoding": b"binary/encrypted", "encryption-key-id": b"k1"}
    assert len(ts_sealed.data) == 12 + len(plain.SerializeToString()) + 16
    assert await python.decode([ts_sealed]) == [plain]
    # A changed byte fails the tag; another key id is never tried with this key.
    refused_tampered, refused_foreign = out["refused"]
    assert refused_tampered and "authenticate" in refused_tampered
    assert refused_foreign == 'payload encrypted with unknown key id "k2"'


def test_the_backend_refuses_bad_requests_before_temporal(backend: Backend) -> None:
    with backend.client() as client:
        bad = client.post(
            "/runs",
            json={
                "images": {"bucket": "loratrain"},
                "model": "",
                "training": {"epochs": 0},
                "colour": "blue",
            },
        )
        assert bad.status_code == 400, bad.text
        assert set(bad.json()["problems"]) >= {
            '/: unknown field "colour"',
            "/model: must NOT have fewer than 1 characters",
            "/training/epochs: must be >= 1",
        }
        files = client.post("/uploads", json={"files": ["../cat.png", "cat.gif", ".hidden.png"]})
        assert files.status_code == 400, files.text
        assert files.json()["problems"] == [
            'files: "../cat.png" is not a file name (no folders, not hidden)',
            "files: cat.gif: not a .png/.jpg/.jpeg/.webp image or .txt caption",
            'files: ".hidden.png" is not a file name (no folders, not hidden)',
        ]
        assert client.get("/runs/no-such-run").status_code == 404
        assert client.get("/runs/no-such-run/events").status_code == 404
        assert client.post("/runs/no-such-run/cancel").status_code == 404
        assert client.get("/runs/not%20a%20run").status_code == 400
        assert client.post("/runs", content=b"{not json").status_code == 400


def test_a_run_the_backend_starts_trains_to_completed_and_streams_every_status_in_order(
    trained_run: TrainedRun, backend: Backend
) -> None:
    assert trained_run.started["temporal_ui"].endswith(f"/workflows/{trained_run.run_id}")
    *statuses, end = trained_run.events
    assert end.event == "end"
    assert end.data == {
        "run_id": trained_run.run_id,
        "status": "completed",
        "execution_status": None,
    }
    assert statuses and all(e.event == "status" for e in statuses)
    versions = [int(e.id or -1) for e in statuses]
    assert versions == [s.data["version"] for s in statuses]
    assert versions == sorted(set(versions)), "each event is a newer status"
    # Each event's history continues the one before; the names never go back in DESIGN's order.
    histories = [[h["status"] for h in s.data["history"]] for s in statuses]
    for earlier, later in itertools.pairwise(histories):
        assert later[: len(earlier)] == earlier
    names = [s.data["status"] for s in statuses]
    assert [STATUS_ORDER.index(n) for n in names] == sorted(STATUS_ORDER.index(n) for n in names)
    assert names[0] == "pending" and names[-1] == "completed"
    assert histories[-1] == STATUS_ORDER
    final = statuses[-1].data
    # Passed through whole: it parses as the model (every key, none unknown).
    assert RunStatus.model_validate(final).run_id == trained_run.run_id
    assert final["result"]["location"]["key"].endswith(".safetensors")
    assert len(final["epoch_losses"]) == demo_training_config().epochs
    with backend.client() as client:
        read = client.get(f"/runs/{trained_run.run_id}")
        assert read.status_code == 200
        assert read.json()["result"] == final["result"]
        # Over, and the client has it all: a reconnecting EventSource is told to stop (204).
        latest = read.json()["version"]
        resumed = client.get(
            f"/runs/{trained_run.run_id}/events", headers={"Last-Event-ID": str(latest)}
        )
        assert resumed.status_code == 204


def test_the_backend_receives_the_runs_signed_webhooks(
    trained_run: TrainedRun, backend: Backend
) -> None:
    received = until_webhook(backend, trained_run.run_id, "training.completed")
    statuses = [w["data"]["status"] for w in received if w["type"] == "training.status"]
    # Each is delivered by its own child workflow: all arrive, in any order.
    assert sorted(statuses, key=STATUS_ORDER.index) == STATUS_ORDER
    (completed,) = [w for w in received if w["type"] == "training.completed"]
    assert completed["data"]["model"] == trained_run.statuses[-1]["result"]
    assert len({w["webhook_id"] for w in received}) == len(received)
    assert not [
        line for line in json_lines(backend.process) if line.get("msg") == "webhook refused"
    ]

    assert_verifies_signatures(f"{backend.url}/webhooks/loratrain", trained_run.run_id)


def test_the_python_receiver_accepts_genuine_webhooks_and_refuses_tampered_ones(
    python_receiver: Receiver,
) -> None:
    run_id = f"receiver-{uuid.uuid4().hex[:8]}"
    assert_verifies_signatures(python_receiver.url, run_id)

    # The receiver logs each webhook it handled; its output reaches this process a moment later.
    def both() -> list[dict[str, Any]] | None:
        found = python_receiver.webhooks(run_id)
        return found if len(found) >= 2 else None

    handled = poll(
        both,
        "the receiver's two handled webhooks",
        details=lambda: python_receiver.process.output,
    )
    assert [w["type"] for w in handled] == ["training.completed"] * 2
    assert handled[1]["data"]["added"] == 1


def assert_verifies_signatures(url: str, run_id: str) -> None:
    """The receiver at `url` takes a webhook signed as the worker signs one (activities/notify.py,
    the same functions), once, and refuses it tampered, re-signed with another secret, unsigned,
    or too old (401), and a signed body that is not a webhook (400)."""
    event = UserWebhookInput(
        run_id=run_id,
        url=url,
        secret=WEBHOOK_SECRET,
        msg_id=f"{run_id}:test:{uuid.uuid4().hex}",
        event_type="training.completed",
        payload={
            "status": "completed",
            "model": {
                "location": {"bucket": "loratrain", "key": f"runs/{run_id}/model.safetensors"},
                "bytes": 1000,
                "sha256": "0" * 64,
                "epoch": 2,
                "loss": 0.5,
            },
            "download_url": "http://127.0.0.1:1/model",
        },
    )
    body = webhook_body(event, datetime.now(UTC))
    headers = sign_payload(WEBHOOK_SECRET, event.msg_id, body)
    other_secret = "whsec_" + base64.b64encode(b"some other secret, not theirs!!!").decode()
    old = datetime.now(UTC) - timedelta(minutes=10)
    not_a_webhook = json.dumps({"type": "training.completed", "run_id": run_id}).encode()
    with httpx.Client(timeout=30) as client:

        def post(content: bytes, sent: dict[str, str]) -> httpx.Response:
            return client.post(url, content=content, headers=sent)

        tampered = body.replace(b'"epoch":2', b'"epoch":3')
        assert tampered != body
        assert post(tampered, headers).status_code == 401
        assert post(body, sign_payload(other_secret, event.msg_id, body)).status_code == 401
        assert post(body, {"content-type": "application/json"}).status_code == 401
        assert (
            post(body, sign_payload(WEBHOOK_SECRET, event.msg_id, body, at=old)).status_code == 401
        )
        assert post(body, {**headers, "webhook-signature": "v1,!!!"}).status_code == 401
        signed_other = sign_payload(WEBHOOK_SECRET, event.msg_id + "-x", not_a_webhook)
        assert post(not_a_webhook, signed_other).status_code == 400

        genuine = post(body, headers)
        assert genuine.status_code == 204, genuine.text
        # A retry of the same event (same webhook-id) is acknowledged, not handled again.
        again = post(body, sign_payload(WEBHOOK_SECRET, event.msg_id, body))
        assert again.status_code == 200 and again.json() == {"duplicate": event.msg_id}

        # A field added to the contract later (an additive change) is no reason to refuse one.
        newer = event.model_copy(
            update={"msg_id": event.msg_id + "-newer", "payload": {**event.payload, "added": 1}}
        )
        newer_body = webhook_body(newer, datetime.now(UTC))
        accepted = post(newer_body, sign_payload(WEBHOOK_SECRET, newer.msg_id, newer_body))
        assert accepted.status_code == 204, accepted.text


def test_the_cli_and_the_backend_read_and_cancel_each_others_runs(
    trained_run: TrainedRun, backend: Backend, stack: Stack, python_receiver: Receiver
) -> None:
    # The run the backend started, read by `loratrain status`: the same, decoded.
    shown = stack.loratrain("status", trained_run.run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    status = RunStatus.model_validate_json(shown.stdout)
    assert status.status == RunStatusName.COMPLETED
    assert status.result is not None
    assert status.result.model_dump(mode="json") == trained_run.statuses[-1]["result"]

    # A run `loratrain train` started (on the images already in S3, reporting to the Python
    # receiver), read and cancelled through the backend.
    cli_run = f"cli-{uuid.uuid4().hex[:8]}"
    images = f"s3://{stack.dev_env['LORA_BUCKET']}/uploads/{trained_run.run_id}/"
    started = stack.loratrain(
        "train",
        images,
        "--model",
        str(stack.model),
        "--trainer",
        "builtin",
        "--run-id",
        cli_run,
        "--epochs",
        "50",
        "--webhook-url",
        python_receiver.url,
        "--webhook-secret",
        WEBHOOK_SECRET,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    with backend.client() as client:
        read = client.get(f"/runs/{cli_run}")
        assert read.status_code == 200, read.text
        cli_status = RunStatus.model_validate(read.json())
        assert cli_status.run_id == cli_run
        assert cli_status.history[0].status == RunStatusName.PENDING

        cancelled = client.post(f"/runs/{cli_run}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        events = read_events(client, f"/runs/{cli_run}/events", timeout_s=120)
        assert events[-1].event == "end" and events[-1].data["status"] == "cancelled"

        # Once it has given its GPU back and closed, there is nothing left to cancel.
        poll(
            lambda: client.post(f"/runs/{cli_run}/cancel").status_code == 409,
            "the cancelled run to close",
        )
    shown = stack.loratrain("status", cli_run, "--json")
    assert shown.returncode == 0, shown.stderr
    assert RunStatus.model_validate_json(shown.stdout).status == RunStatusName.CANCELLED

    # The Python receiver accepted the run's genuine webhooks.
    received = until_webhook(python_receiver, cli_run, "training.cancelled")
    statuses = [w["data"]["status"] for w in received if w["type"] == "training.status"]
    assert "pending" in statuses and "cancelled" in statuses


def test_a_backend_with_another_codec_key_says_so(
    built_backend: Path, stack: Stack, trained_run: TrainedRun
) -> None:
    other_key = base64.b64encode(b"not the key the worker encrypts!").decode()
    with (
        running_backend(built_backend, stack, LORA_CODEC_KEY=other_key) as backend,
        backend.client() as client,
    ):
        read = client.get(f"/runs/{trained_run.run_id}")
    assert read.status_code == 502, read.text
    assert "(is LORA_CODEC_KEY the worker's?)" in read.json()["error"]
