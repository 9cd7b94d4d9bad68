"""`loratrain`: run the embedded stack, the services, and start and follow training runs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn, get_args
from urllib.parse import quote

import httpx
import typer
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.converter import DataConverter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from gpu_runner.protocol import ComponentRole, EpochFile, RunId, TrainingConfig
from workflows.models import (
    RunStatus,
    RunStatusName,
    SavedEpochInfo,
    TrainingRequest,
    WaitingOn,
)

from .converter import CodecKeyError
from .deliveries import describe as describe_deliveries
from .deliveries import webhook_deliveries
from .settings import DEV_ENV_NAME, SEARCH_ATTRIBUTE, Settings
from .waiting import status_json, waiting_on, watch_waiting

# Imported where used: the stack (boto3) and the dataset checks (Pillow) cost every command that
# only asks Temporal a question a second of start-up.
if TYPE_CHECKING:
    from activities.civitai import ModelReference
    from workflows.training import TrainingWorkflow

    from .devstack import ChildExited, DevStack

app = typer.Typer(
    help="Train LoRA adapters on rented GPUs, durably, with Temporal.",
    no_args_is_help=True,
    # Locals can hold secrets (codec key, webhook secrets): never print them in a traceback.
    pretty_exceptions_show_locals=False,
)
# soft_wrap: messages and paths stay on one line whatever the terminal width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

WORKFLOW_TYPE = "TrainingWorkflow"
# `watch` long-polls for changes; after this long without one it asks the status again, which
# tells a quiet run from a dead worker (the update alone would wait for a worker forever).
UPDATE_POLL_S = 60.0
# The run answers each long poll after this long even without a change, so no update outlives the
# watcher that asked (the server holds at most 10 in flight per run).
WATCH_WAIT_S = UPDATE_POLL_S - 10
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Executions Temporal ended from outside: the run never reached a final status of its own, and a
# query only replays the last one it had ("training 13 %").
_ENDED_FROM_OUTSIDE = frozenset(
    {WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.TIMED_OUT}
)
CONNECT_TIMEOUT_S = 10.0
_STATUS_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE)
_NAMES = frozenset(s.value for s in RunStatusName)
_TERMINAL_NAMES = frozenset(s.value for s in RunStatusName if s.terminal)
_STATUS_STYLE = {
    RunStatusName.COMPLETED: "green",
    RunStatusName.FAILED: "red",
    RunStatusName.STALLED: "red",
    RunStatusName.CANCELLED: "yellow",
}


class Trainer(StrEnum):
    sd_scripts = "sd-scripts"
    builtin = "builtin"


# Which command-line input a TrainingRequest field came from, for validation messages.
_OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("images",): "IMAGES",
    ("images", "bucket"): "IMAGES (bucket name)",
    ("images", "prefix"): "IMAGES (prefix)",
    ("model",): "--model",
    ("training", "epochs"): "--epochs",
    ("training", "resolution"): "--resolution",
    ("training", "trigger_word"): "--trigger-word",
    ("webhook", "url"): "--webhook-url",
    ("webhook", "secret"): "--webhook-secret",
    ("trainer",): "--trainer",
}


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", style="red", markup=False, highlight=False)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """Settings from LORA_ variables, then the state dir's dev.env (LORA_STATE_DIR, or the
    per-user default), so every command finds a running `loratrain dev` from any directory."""
    try:
        settings = Settings()
    except ValidationError as e:
        for error in e.errors():
            name = "LORA_" + "_".join(str(part) for part in error["loc"]).upper()
            err.print(f"error: {name}: {error['msg']}", style="red", markup=False)
        raise typer.Exit(1) from None
    return settings


def new_run_id() -> str:
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def ui_link(settings: Settings, run_id: str) -> str:
    namespace = quote(settings.temporal_namespace, safe="")
    return (
        f"{settings.temporal_ui_url.rstrip('/')}/namespaces/{namespace}/workflows/"
        f"{quote(run_id, safe='')}"
    )


# ------------------------------------------------------------------------------------------------
# Temporal helpers
# ------------------------------------------------------------------------------------------------


async def connect(settings: Settings) -> Client:
    """The project's client, or a plain message and exit 1 when Temporal does not answer."""
    from worker.main import connect_client

    try:
        return await asyncio.wait_for(connect_client(settings), CONNECT_TIMEOUT_S)
    except CodecKeyError as e:
        fail(
            f"{e}: start `loratrain dev` once (it writes one to "
            f"{settings.state_dir / DEV_ENV_NAME}), or set it"
        )
    except (RuntimeError, RPCError, TimeoutError):
        fail(f"cannot reach Temporal at {settings.temporal_address}: is `loratrain dev` running?")


def training_handle(client: Client, run_id: str) -> WorkflowHandle[TrainingWorkflow, RunStatus]:
    from workflows.training import TrainingWorkflow

    return client.get_workflow_handle_for(TrainingWorkflow.run, run_id)


async def describe_run(
    handle: WorkflowHandle[Any, Any], settings: Settings
) -> WorkflowExecutionDescription:
    try:
        return await handle.describe(rpc_timeout=timedelta(seconds=CONNECT_TIMEOUT_S))
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            if "namespace" in e.message.lower():
                fail(f"namespace {settings.temporal_namespace!r} does not exist: {e.message}")
            fail(f"no run {handle.id!r} in namespace {settings.temporal_namespace!r}")
        fail(f"Temporal refused to describe run {handle.id!r}: {e.message}")


async def query_status(
    handle: WorkflowHandle[TrainingWorkflow, RunStatus],
    description: WorkflowExecutionDescription,
    settings: Settings,
) -> RunStatus:
    """The run's status; a run that Temporal terminated or timed out says so in
    `execution_status`, whatever its last status was."""
    from workflows.training import TrainingWorkflow

    timeout = timedelta(seconds=settings.query_timeout_s)
    ended_from_outside = description.status in _ENDED_FROM_OUTSIDE
    try:
        status = await handle.query(TrainingWorkflow.status, rpc_timeout=timeout)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
        if description.status == WorkflowExecutionStatus.COMPLETED:
            # A completed run returns its final status; reading it needs no worker.
            return await handle.result()
        state = description.typed_search_attributes.get(_STATUS_KEY)
        if ended_from_outside:
            # No worker to replay it: what Temporal itself knows is enough to say how it ended.
            last = RunStatusName(state) if state in _NAMES else RunStatusName.PENDING
            status = RunStatus(run_id=handle.id, status=last)
        elif isinstance(e, RPCError):
            # Timeouts come back worded in several ways; the user needs one answer, always.
            known = f"{state}, " if state else ""
            fail(
                f"run {handle.id!r} ({known}Temporal: {_execution_status(description)}) did not "
                f"answer its status query within {settings.query_timeout_s:g} s: is a worker for "
                f"task queue {description.task_queue!r} running (`loratrain worker` or "
                "`loratrain dev`)?"
            )
        else:
            fail(f"run {handle.id!r} could not answer its status query: {e}")
    if ended_from_outside and not status.status.terminal:
        return status.model_copy(update={"execution_status": _execution_status(description)})
    return status


def _execution_status(execution: WorkflowExecution) -> str:
    return execution.status.name.lower() if execution.status else "unknown"


def run_async(main: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(130) from None


def main() -> NoReturn:
    """The `loratrain` process: run the command, then exit without finalizing the interpreter.

    The Temporal client runs its RPCs on Rust (tokio) threads that Python cannot stop, and the
    SDK has no way to shut them down (sdk-python#300). When the interpreter finalizes while one
    of them still finishes a call (a query that just timed out, a connection being dropped), that
    thread takes the GIL of a dying interpreter and CPython aborts with `Fatal Python error:
    PyGILState_Release` (rc -6) after the command had already printed its answer. Everything the
    command does is done when `app` returns, so the process flushes and leaves at once.
    """
    code = 0
    try:
        app()
    except SystemExit as e:
        if isinstance(e.code, str):
            err.print(e.code, markup=False, highlight=False)
        code = 1 if isinstance(e.code, str) else (e.code or 0)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------------------
# Services
# ------------------------------------------------------------------------------------------------


@app.command()
def dev() -> None:
    """Run the embedded stack in the foreground: Temporal, its UI, local S3, relay, worker.

    A part that crashes is restarted; Ctrl-C stops everything.
    """
    from .devstack import ChildExited, DevStack, DevStackError, StartInterrupted

    settings = load_settings()
    stack = DevStack(settings)

    def request_stop(signum: int, frame: object) -> None:
        stack.request_stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    out.print("starting the embedded stack…", style="dim")
    try:
        stack.start(
            report=lambda line: err.print(line, style="yellow", markup=False, highlight=False)
        )
    except StartInterrupted:
        out.print("stopped")
        return
    except ChildExited as e:
        _report_dead_child(e)
        raise typer.Exit(1) from None
    except DevStackError as e:
        fail(str(e))
    _print_stack(stack)
    stack.supervise(lambda line: err.print(line, style="yellow", markup=False, highlight=False))
    out.print("stopping…", style="dim")
    stack.stop()
    out.print("stopped")


@app.command()
def demo() -> None:
    """Train a real LoRA end to end on this machine, offline; Ctrl-C cancels the run.

    A tiny base model and demo images made here, a run on the embedded stack (started for the
    demo unless `loratrain dev` runs), live progress, and the LoRA downloaded into ./outputs/.
    """
    from .demo import run_demo

    run_demo(load_settings())


def _report_dead_child(e: ChildExited) -> None:
    err.print(f"error: {e}", style="red", markup=False, highlight=False)
    tail = e.child.log_tail(15)
    if tail:
        err.print(f"last lines of {e.child.log_path}:", style="dim", markup=False)
        for line in tail:
            err.print(f"  {line}", markup=False, highlight=False)


def _print_stack(stack: DevStack) -> None:
    s = stack.settings
    rows = [
        ("Temporal", f"{s.temporal_address}  (namespace {s.temporal_namespace})"),
        ("Temporal UI", s.temporal_ui_url),
        ("local S3", f"{stack.s3_url}  (bucket {s.bucket})"),
        ("relay", f"{s.relay_public_url}  (codec server {stack.codec_url})"),
        ("worker", f"task queue {s.task_queue}, GPU provider {s.gpu_provider}"),
        ("state, logs", f"{stack.state_dir}/  {stack.logs_dir}/"),
    ]
    out.print("loratrain dev is up", style="bold green")
    for name, where in rows:
        out.print(f"  {name:<12} {where}", markup=False, highlight=False)
    out.print("Start a run: loratrain train ./images --model <civitai:ID | URL | path>")
    out.print("Ctrl-C stops everything.", style="bold")


@app.command()
def worker() -> None:
    """Run the Temporal worker (workflows and activities) until SIGINT or SIGTERM."""
    from worker.main import ProviderConfigError, run_worker

    settings = load_settings()
    try:
        asyncio.run(_until_signalled(run_worker(settings)))
    except (CodecKeyError, ProviderConfigError) as e:
        fail(str(e))


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`, cancelling it (so it shuts down cleanly) on SIGINT or SIGTERM."""
    task = asyncio.create_task(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


@app.command()
def relay() -> None:
    """Serve the webhook relay and the Temporal UI's codec server."""
    from worker.relay import run_relay

    settings = load_settings()
    try:
        run_relay(settings)
    except (RuntimeError, CodecKeyError) as e:
        fail(str(e))


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


@app.command()
def train(
    images: Annotated[
        str,
        typer.Argument(
            metavar="IMAGES",
            help="A local folder of images and .txt captions, or s3://bucket/prefix.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(help="civitai:<versionId>, an https URL, s3://bucket/key, or a local path."),
    ],
    run_id: Annotated[
        str | None, typer.Option(help="Default: run-<utc time>-<random>. Reusing one is safe.")
    ] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    resolution: Annotated[int | None, typer.Option(help="Multiple of 64.")] = None,
    trigger_word: Annotated[str | None, typer.Option()] = None,
    webhook_url: Annotated[str | None, typer.Option(help="Your endpoint for run events.")] = None,
    webhook_secret: Annotated[str | None, typer.Option(help="whsec_… signing secret.")] = None,
    trainer: Annotated[
        Trainer | None,
        typer.Option(
            help="Default: sd-scripts; builtin on the local GPU provider when it has no "
            "sd-scripts (LORA_RUNNER_SD_SCRIPTS_DIR)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Any training setting, e.g. --set batch_size=4 --set optimizer=Prodigy "
            "--set mixed_precision=bf16 (repeat it).",
        ),
    ] = None,
    model_file: Annotated[
        list[str] | None,
        typer.Option(
            "--model-file",
            metavar="ROLE=REF",
            help="A file the model's family loads beside it (clip_l, clip_g, t5xxl, ae), in any "
            "scheme --model takes; default: the family's public files (repeat it).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Resolve everything and show the GPUs that qualify, the best offers and the "
            "expected time and cost; upload, rent and start nothing.",
        ),
    ] = False,
) -> None:
    """Check the dataset, model, settings and trainer here, then upload, start a run, and
    print its id.

    Nothing is uploaded or started while any problem is found; every one is listed. With
    --dry-run, show what the run would rent, take and cost (as `estimate` does) and stop there.
    """
    checked = _checked_request(
        images,
        model,
        run_id,
        {"epochs": epochs, "resolution": resolution, "trigger_word": trigger_word},
        set_ or [],
        trainer,
        webhook_url,
        webhook_secret,
        model_files=model_file or [],
    )
    if dry_run:
        _show_estimate(checked, as_json=False, top=DEFAULT_OFFERS_SHOWN)
        return
    run_async(
        _start_run(
            checked.settings, checked.run_id, checked.request, checked.folder, checked.uploads
        )
    )


class _CheckedRequest(NamedTuple):
    settings: Settings
    run_id: str
    request: TrainingRequest
    folder: Path | None
    uploads: list[Path]


def _checked_request(
    images: str,
    model: str,
    run_id: str | None,
    options: dict[str, Any],
    set_: list[str],
    trainer: Trainer | None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    model_files: list[str] | None = None,
) -> _CheckedRequest:
    """The request `train` would start, every input checked here; lists every problem and
    exits 2 when there is any."""
    from gpu_runner.trainers.builtin import family_refusal

    from .preflight import caption_notes, check_model, choose_trainer, dataset_problems

    settings = load_settings()
    run_id = run_id or new_run_id()
    try:
        TypeAdapter(RunId).validate_python(run_id)
    except ValidationError:
        fail(
            f"--run-id: {run_id!r} is not a valid run id (letters, digits, '.', '_', '-'; "
            "at most 128, starting with a letter or digit)",
            code=2,
        )
    if (webhook_url is None) != (webhook_secret is None):
        fail("--webhook-url and --webhook-secret go together: give both or neither", code=2)
    folder, bucket, prefix = _images_source(images, settings, run_id)
    uploads = _dataset_files(folder) if folder else []
    problems = dataset_problems(folder, uploads, settings) if folder else []
    checked_model = check_model(model, settings)
    if checked_model.problem:
        problems.append(checked_model.problem)
    model = checked_model.reference
    chosen = choose_trainer(trainer.value if trainer else None, settings)
    if chosen.problem:
        problems.append(chosen.problem)
    training: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    extra, set_problems = _training_settings(set_, given=set(training))
    notes: list[str] = []
    problems.extend(set_problems)
    fields: dict[str, Any] = {
        "images": {"bucket": bucket, "prefix": prefix},
        "model": model,
        "training": {**training, **extra},
        "trainer": chosen.trainer,
    }
    files, file_problems = _model_files(model_files or [])
    problems.extend(file_problems)
    if files:
        fields["model_files"] = files
    if webhook_url is not None:
        fields["webhook"] = {"url": webhook_url, "secret": webhook_secret}
    try:
        request = TrainingRequest.model_validate(fields)
    except ValidationError as e:
        problems.extend(_validation_lines(e, set_fields=set(extra)))
    else:
        found, notes = _request_problems(settings, request, checked_model.parsed, folder)
        problems.extend(found)
        parsed = checked_model.parsed
        if parsed is not None and parsed.family is not None:
            if request.trainer == "builtin" and (refusal := family_refusal(parsed.family)):
                problems.append(f"--trainer: {refusal}")
            if folder is not None:
                notes.extend(caption_notes(folder, uploads, parsed.family, parsed.variant))
    if problems:
        for line in problems:
            err.print(f"error: {line}", style="red", markup=False, highlight=False)
        raise typer.Exit(2)
    for note in [*notes, chosen.note]:
        if note:
            err.print(note, markup=False, highlight=False)
    return _CheckedRequest(settings, run_id, request, folder, uploads)


def _request_problems(
    settings: Settings,
    request: TrainingRequest,
    model: ModelReference | None,
    folder: Path | None,
) -> tuple[list[str], list[str]]:
    """What the worker would refuse only after the upload: the settings with the model
    family's defaults, and the inputs already in S3 (an s3:// dataset, an s3:// model). The
    problems, and notes on what S3 would not tell this machine (the worker checks it again)."""
    from worker.main import s3_client

    from .preflight import Unchecked, s3_images_problem, s3_model_problem, training_problems

    problems = training_problems(request.training, model)
    checks: list[Callable[[Any], str | None]] = []
    if folder is None:
        images = request.images
        checks.append(lambda s3: s3_images_problem(images.bucket, images.prefix, s3))
    if model is not None and model.kind == "s3":
        checks.append(lambda s3: s3_model_problem(model, s3))
    notes: list[str] = []
    s3 = s3_client(settings) if checks else None
    for check in checks:
        try:
            problem = check(s3)
        except Unchecked as e:
            notes.append(f"note: not checked here ({e}); the worker checks it")
        else:
            if problem is not None:
                problems.append(problem)
    return problems, notes


def _model_files(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--model-file ROLE=REF` pairs, and the problems with them (a role no family loads, a
    pair without '='). Local paths are sent absolute."""
    roles = get_args(ComponentRole)
    files: dict[str, str] = {}
    problems: list[str] = []
    for pair in pairs:
        role, sep, reference = pair.partition("=")
        role, reference = role.strip(), reference.strip()
        if not sep or not reference:
            problems.append(f"--model-file: {pair!r} is not ROLE=REF (e.g. clip_l=hf:…)")
        elif role not in roles:
            problems.append(f"--model-file: {role!r} is not a role; use one of {', '.join(roles)}")
        else:
            local = Path(reference).expanduser()
            files[role] = str(local.resolve()) if local.exists() else reference
    return files, problems


def _training_settings(pairs: list[str], given: set[str]) -> tuple[dict[str, str], list[str]]:
    """`--set key=value` pairs as TrainingConfig fields (pydantic converts and checks the
    values), and the problems with the pairs themselves."""
    fields = TrainingConfig.model_fields
    values: dict[str, str] = {}
    problems: list[str] = []
    for pair in pairs:
        key, separator, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not key:
            problems.append(f"--set: {pair!r} is not KEY=VALUE")
        elif key not in fields:
            problems.append(
                f"--set {key}: not a training setting (one of: {', '.join(sorted(fields))})"
            )
        elif key in given:
            problems.append(f"--set {key}: also given as --{key.replace('_', '-')}; give it once")
        else:
            values[key] = value.strip()
    return values, problems


def _images_source(images: str, settings: Settings, run_id: str) -> tuple[Path | None, str, str]:
    """(local folder or None, bucket, prefix) for the IMAGES argument."""
    if images.startswith("s3://"):
        bucket, _, prefix = images.removeprefix("s3://").partition("/")
        if not bucket:
            fail(f"IMAGES: {images!r} names no bucket (use s3://bucket/prefix)", code=2)
        return None, bucket, prefix
    folder = Path(images)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        fail(f"IMAGES: {images} {what}; give a folder of images or s3://bucket/prefix", code=2)
    return folder, settings.bucket, f"uploads/{run_id}/"


def _dataset_files(folder: Path) -> list[Path]:
    """The folder's images and captions; hidden files are skipped silently, others with a note."""
    from .preflight import CAPTION_SUFFIX, IMAGE_SUFFIXES

    files: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            err.print(f"note: skipping folder {path.name}/ (only top-level files are uploaded)")
        elif path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == CAPTION_SUFFIX:
            files.append(path)
        else:
            err.print(
                f"note: skipping {path.name} (not a .png/.jpg/.jpeg/.webp image or .txt caption)",
                markup=False,
            )
    return files


def _validation_lines(error: ValidationError, set_fields: set[str] | None = None) -> Iterator[str]:
    for e in error.errors():
        loc = tuple(e["loc"])
        if len(loc) == 2 and loc[0] == "training" and loc[1] in (set_fields or set()):
            where = f"--set {loc[1]}"
        else:
            where = _OPTION_FOR_FIELD.get(loc, ".".join(str(part) for part in loc))
        line = f"{where}: {e['msg']}"
        if "secret" not in where and isinstance(e.get("input"), str | int | float):
            line += f" (got {e['input']!r})"
        yield line


async def _start_run(
    settings: Settings,
    run_id: str,
    request: TrainingRequest,
    folder: Path | None,
    uploads: list[Path],
) -> None:
    from workflows.training import TrainingWorkflow

    client = await connect(settings)
    handle = training_handle(client, run_id)
    # Check first: uploading into an existing run's prefix would change its dataset.
    try:
        existing = await handle.describe()
    except RPCError as e:
        if e.status != RPCStatusCode.NOT_FOUND:
            fail(f"Temporal refused to describe run {run_id!r}: {e.message}")
    else:
        _already_exists(settings, run_id, existing.status)
        return
    if folder is not None:
        await asyncio.to_thread(_upload, settings, folder, uploads, request)
    try:
        await client.start_workflow(
            TrainingWorkflow.run,
            request,
            id=run_id,
            task_queue=settings.task_queue,
            # One run per run id, ever: a retried `train` never starts a second run.
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:
        _already_exists(settings, run_id, None)
        return
    out.print(f"started run [bold]{run_id}[/bold]", highlight=False)
    out.print(f"Temporal UI: {ui_link(settings, run_id)}", markup=False)
    out.print(f"follow it:   loratrain watch {run_id}", markup=False)


def _already_exists(
    settings: Settings, run_id: str, status: WorkflowExecutionStatus | None
) -> None:
    state = f" ({status.name.lower()})" if status else ""
    out.print(f"run {run_id} already exists{state}; not starting it again", markup=False)
    out.print(f"Temporal UI: {ui_link(settings, run_id)}", markup=False)


def _upload(settings: Settings, folder: Path, files: list[Path], request: TrainingRequest) -> None:
    from worker.main import s3_client

    s3 = s3_client(settings)
    bucket, prefix = request.images.bucket, request.images.prefix
    out.print(f"uploading {len(files)} files from {folder} to s3://{bucket}/{prefix}", markup=False)
    for path in files:
        try:
            s3.upload_file(str(path), bucket, prefix + path.name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                fail(f"bucket {bucket!r} does not exist at {settings.s3_endpoint_url or 'AWS S3'}")
            fail(f"S3 refused {path.name}: {e}")
        except BotoCoreError as e:
            fail(
                f"cannot reach S3 at {settings.s3_endpoint_url or 'AWS'} ({e}): "
                "is `loratrain dev` running?"
            )


DEFAULT_OFFERS_SHOWN = 5


@app.command()
def estimate(
    images: Annotated[
        str,
        typer.Argument(
            metavar="IMAGES",
            help="A local folder of images and .txt captions, or s3://bucket/prefix.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(help="civitai:<versionId>, an https URL, s3://bucket/key, or a local path."),
    ],
    epochs: Annotated[int | None, typer.Option()] = None,
    resolution: Annotated[int | None, typer.Option(help="Multiple of 64.")] = None,
    trainer: Annotated[Trainer | None, typer.Option(help="As for train.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Any training setting, as for train."),
    ] = None,
    model_file: Annotated[
        list[str] | None,
        typer.Option(
            "--model-file",
            metavar="ROLE=REF",
            help="A file the model's family loads beside it (clip_l, clip_g, t5xxl, ae), in any "
            "scheme --model takes; default: the family's public files (repeat it).",
        ),
    ] = None,
    offers: Annotated[int, typer.Option(min=1, max=50, help="How many offers to show.")] = (
        DEFAULT_OFFERS_SHOWN
    ),
    as_json: Annotated[bool, typer.Option("--json", help="The estimate as JSON.")] = False,
) -> None:
    """What a run would need, rent and cost: the GPUs that qualify, the best offers by expected
    cost, and the expected time and cost, with the assumptions. Uploads and rents nothing."""
    checked = _checked_request(
        images,
        model,
        None,
        {"epochs": epochs, "resolution": resolution},
        set_ or [],
        trainer,
        model_files=model_file or [],
    )
    _show_estimate(checked, as_json=as_json, top=offers)


def _show_estimate(checked: _CheckedRequest, *, as_json: bool, top: int) -> None:
    """Resolve the dataset and the model as the run would, ask the provider for offers, and
    print the estimate; one line and exit 1 when any of it cannot be done."""
    from temporalio.exceptions import ApplicationError

    from activities.estimate import (
        NoQualifyingOffer,
        estimate_run,
        local_dataset,
        resolve_model,
        s3_dataset,
    )
    from activities.providers.vast import VastApiError
    from worker.main import s3_client

    settings, request = checked.settings, checked.request
    s3 = s3_client(settings)
    if checked.folder is not None:
        dataset = local_dataset(str(checked.folder), checked.uploads)
    else:
        where = f"s3://{request.images.bucket}/{request.images.prefix}"
        try:
            dataset = s3_dataset(s3, request.images.bucket, request.images.prefix)
        except (BotoCoreError, ClientError) as e:
            fail(f"IMAGES: cannot list {where} here ({e}); the estimate needs the image count")
        if not dataset.images:
            fail(f"IMAGES: {where} holds no .png, .jpg, .jpeg or .webp images")
    try:
        model = asyncio.run(resolve_model(settings, s3, request.model, request.model_files))
    except ApplicationError as e:
        fail(f"--model: {e.message}")
    if model.family == "other":
        fail(
            f"--model: {model.filename} is based on {model.base_model!r}, which no family here "
            "trains (sd15, sd2, sdxl, flux, sd3)"
        )
    try:
        result = estimate_run(
            settings,
            dataset=dataset,
            model=model,
            trainer=request.trainer,
            training=request.training,
            request_gpu=request.gpu,
            top=top,
        )
    except NoQualifyingOffer as e:
        fail(str(e))
    except VastApiError as e:
        fail(f"cannot ask Vast for offers: {e}")
    except ValueError as e:  # the provider is not configured (LORA_VAST_API_KEY)
        fail(str(e))
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    _print_estimate(result)


def _print_estimate(result: Any) -> None:
    from rich import box
    from rich.table import Table

    from activities.estimate import format_duration

    ds, model, config = result.dataset, result.model, result.training
    size = f"{model.bytes / 1e9:.2f} GB" if model.bytes is not None else "size unknown"
    variant = f" {model.variant}" if model.variant else ""
    rows = [
        (
            "dataset",
            f"{ds.where}: {ds.images} images, {ds.captions} captions, {ds.bytes / 1e6:.1f} MB",
        ),
        ("model", f"{model.filename} ({model.base_model}, family {model.family}{variant}, {size})"),
        ("trainer", result.trainer),
        (
            "settings",
            f"{config.resolution} px, batch {config.batch_size}, {config.epochs} epochs x "
            f"{config.repeats} repeats, dim {config.network_dim}, alpha "
            f"{config.network_alpha:g}, {config.mixed_precision}",
        ),
        ("steps", result.steps_formula),
        ("GPUs that qualify", result.requirements.describe()),
    ]
    for name, value in rows:
        out.print(f"{name:<18} {value}", markup=False, highlight=False)
    table = Table(
        title=f"offers ({result.provider}), by expected cost",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = ("offer", "GPU", "VRAM", "$/h", "Mbps", "s/step", "setup", "training", "cost")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("offer", "GPU") else "right", no_wrap=True
        )
    notes = []
    for o in result.offers:
        table.add_row(
            o.offer,
            o.gpu_name,
            f"{o.vram_gb:.0f} GB" if o.vram_gb is not None else "?",
            f"{o.dollars_per_hour:.3f}",
            f"{o.download_mbps:.0f}" if o.download_mbps is not None else "-",
            f"{o.seconds_per_step:.2f}",
            format_duration(o.download_s + o.overhead_s),
            format_duration(o.training_s),
            f"${o.cost_usd:.2f}",
        )
        if o.note:
            notes.append(f"offer {o.offer}: {o.note}")
    out.print(table)
    for note in notes:
        out.print(note, markup=False, highlight=False)
    best = result.best
    out.print(
        f"expected: {format_duration(best.hours * 3600)}, ${best.cost_usd:.2f} on "
        f"{best.gpu_name} (offer {best.offer})",
        markup=False,
        highlight=False,
    )
    out.print("assumptions:", markup=False)
    for line in result.assumptions:
        out.print(f"  {line}", markup=False, highlight=False)


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the RunStatus as JSON.")] = False,
) -> None:
    """Show a run's status, progress, GPU, cost and result or error."""
    run_async(_status(load_settings(), run_id, as_json))


async def _status(settings: Settings, run_id: str, as_json: bool) -> None:
    client = await connect(settings)
    handle = training_handle(client, run_id)
    description = await describe_run(handle, settings)
    run_status = await query_status(handle, description, settings)
    waiting = await waiting_on(description, client.data_converter)
    info = description.raw_description.workflow_execution_info
    first_execution = info.first_run_id or description.run_id
    run_status.webhooks = await webhook_deliveries(client, run_id, first_execution)
    if as_json:
        typer.echo(status_json(run_status, waiting, indent=2))
        return
    _print_status(run_status, waiting)
    out.print(f"Temporal UI: {ui_link(settings, run_id)}", markup=False, style="dim")


def _print_status(st: RunStatus, waiting: Sequence[WaitingOn] = ()) -> None:
    """One `label  value` line each, never wrapped or cut: ids, URIs and commands copy whole."""
    rows: list[tuple[str, str]] = [("run", escape(st.run_id)), ("status", _status_text(st))]
    # An activity that keeps failing (Civitai down, S3 refusing) is why the status does not move.
    rows.extend(
        ("waiting on" if i == 0 else "", f"[yellow]{escape(w.describe())}[/]")
        for i, w in enumerate(waiting)
    )
    if st.attempt:
        rows.append(("GPU attempt", str(st.attempt)))
    if st.progress is not None:
        rows.append(("progress", _progress_text(st)))
    if st.gpu is not None:
        gpu = st.gpu
        price = f", ${gpu.dollars_per_hour:.3f}/h" if gpu.dollars_per_hour is not None else ""
        rows.append(
            ("GPU", escape(f"{gpu.gpu_name or '?'} ({gpu.provider} {gpu.instance_id}{price})"))
        )
    rows.append(("cost", f"${st.cost_usd:.2f}"))
    if st.webhooks is not None:
        style = "yellow" if st.webhooks.failing or st.webhooks.given_up else "default"
        rows.append(("webhooks", f"[{style}]{escape(describe_deliveries(st.webhooks))}[/]"))
    if st.gpu_not_released is not None:
        rows.append(("GPU left", f"[red]{escape(st.gpu_not_released)}[/]"))
    if st.waiting_for_relay is not None:
        rows.append(("relay", f"[yellow]{escape('down: ' + st.waiting_for_relay)}[/]"))
    if st.epochs:
        rows.extend(_saved_epoch_rows(st))
    elif st.epoch_losses:
        rows.append(("epoch losses", _epoch_losses_text(st)))
    elif st.best_checkpoint is not None:
        rows.append(("best epoch", str(st.best_checkpoint)))
    rows.extend(
        ("resumed" if i == 0 else "", escape(line.removeprefix("resumed ")))
        for i, line in enumerate(st.resumed)
    )
    if st.result is not None:
        r = st.result
        rows.append(("model", escape(f"{r.location.uri} ({r.bytes:,} bytes)")))
        rows.append(("sha256", r.sha256))
        rows.append(("download", escape(f"loratrain download {st.run_id}")))
    if st.error is not None:
        e = st.error
        stage = f" during {e.stage}" if e.stage else ""
        rows.append(("error", f"[red]{escape(f'{e.code}{stage}: {e.message}')}[/]"))
        rows.extend(("", f"[dim]{escape(line)}[/]") for line in e.log_tail[-10:])
        if _reached_gpu(st):  # a GPU ran: its runner uploads the whole log when the run ends
            rows.append(("full log", escape(f"loratrain logs {st.run_id}")))
    for i, change in enumerate(st.history):
        rows.append(("history" if i == 0 else "", f"{_local_time(change.at)}  {change.status}"))
    for label, value in rows:
        out.print(f"[bold]{label:<12}[/] {value}", highlight=False)


def _marked_epoch(st: RunStatus) -> tuple[int | None, str]:
    """The epoch whose LoRA is the run's model (`kept`), or before the upload the one of the
    lowest loss (`lowest`), known once training ended."""
    if st.result is not None:
        return st.result.epoch or st.best_checkpoint, "kept"
    return st.best_checkpoint, "lowest"


def _saved_epoch_rows(st: RunStatus) -> list[tuple[str, str]]:
    """One row per epoch, `3  loss 0.9139  attempt 1  2 samples (kept)`, saved ones with the
    attempt that trained them and their samples; how to fetch them after."""
    saved = {info.epoch: info for info in st.epochs}
    numbers = sorted(set(saved) | set(range(1, len(st.epoch_losses) + 1)))
    marked, mark = _marked_epoch(st)
    width = len(str(numbers[-1]))
    rows: list[tuple[str, str]] = []
    for epoch in numbers:
        info = saved.get(epoch)
        loss = info.loss if info is not None else None
        if loss is None and epoch <= len(st.epoch_losses):
            loss = st.epoch_losses[epoch - 1]
        parts = [f"{epoch:>{width}}", f"loss {loss:.4f}" if loss is not None else "loss ?"]
        if info is not None:
            parts += [f"attempt {info.attempt}", _count(len(info.samples), "sample")]
        else:
            parts.append("not saved")
        text = "  ".join(parts) + (f" ({mark})" if epoch == marked else "")
        rows.append(("epochs" if not rows else "", text))
    rows.append(
        ("epoch LoRAs", escape(f"loratrain download {st.run_id} --epoch N (or --all-epochs)"))
    )
    images = sum(len(info.samples) for info in st.epochs)
    if images:
        rows.append(("samples", escape(f"{images} images: loratrain samples {st.run_id}")))
    return rows


def _epoch_losses_text(st: RunStatus) -> str:
    """`1: 0.2100  2: 0.1800 (kept)  3: 0.1900`: the epoch whose LoRA is the run's model, or
    before the upload the one of the lowest loss."""
    marked, mark = _marked_epoch(st)
    return "  ".join(
        f"{epoch}: {loss:.4f}" + (f" ({mark})" if epoch == marked else "")
        for epoch, loss in enumerate(st.epoch_losses, 1)
    )


def _reached_gpu(st: RunStatus) -> bool:
    """Whether a GPU instance was ever created for the run (`attempt` is set before)."""
    return st.gpu is not None or any(c.status == RunStatusName.PENDING_GPU for c in st.history)


def _status_text(st: RunStatus) -> str:
    if st.execution_status:
        # Temporal ended it: the run's own last status is history, not the present.
        return f"[red]{st.execution_status}[/] (by Temporal, while {st.status.value})"
    return f"[{_STATUS_STYLE.get(st.status, 'cyan')}]{st.status.value}[/]"


def _local_time(at: datetime, seconds: bool = True) -> str:
    return f"{at.astimezone():%Y-%m-%d %H:%M{':%S' if seconds else ''}}"


def _progress_text(st: RunStatus, percent: bool = True) -> str:
    p = st.progress
    if p is None:
        return ""
    parts = [f"{p.percent:.0f}%"] if percent else []
    parts.append(f"step {p.step}/{p.total}")
    if p.epoch is not None:
        parts.append(f"epoch {p.epoch}/{p.total_epochs or '?'}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.it_per_s is not None:
        parts.append(f"{p.it_per_s:.2f} it/s")
    if p.eta_s is not None:
        parts.append(f"eta {timedelta(seconds=round(p.eta_s))}")
    return "  ".join(parts)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Cancel a run; its GPU is given back before the run ends."""
    run_async(_cancel(load_settings(), run_id))


async def _cancel(settings: Settings, run_id: str) -> None:
    client = await connect(settings)
    handle = training_handle(client, run_id)
    description = await describe_run(handle, settings)
    if description.status != WorkflowExecutionStatus.RUNNING:
        out.print(
            f"run {run_id} already ended ({_execution_status(description)}); nothing to cancel",
            markup=False,
        )
        return
    await handle.cancel()
    out.print(f"cancellation requested for {run_id}; follow it with `loratrain watch {run_id}`")


@app.command("list")
def list_runs(
    status_filter: Annotated[
        RunStatusName | None, typer.Option("--status", help="Only runs in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
) -> None:
    """List training runs with their status."""
    run_async(_list(load_settings(), status_filter, limit, as_json))


async def _list(
    settings: Settings, status_filter: RunStatusName | None, limit: int, as_json: bool
) -> None:
    client = await connect(settings)
    query = f"WorkflowType = '{WORKFLOW_TYPE}'"
    if status_filter is not None:
        query += f" AND {SEARCH_ATTRIBUTE} = '{status_filter.value}'"
    runs: list[dict[str, Any]] = []
    try:
        async for wf in client.list_workflows(query, limit=limit):
            state = wf.typed_search_attributes.get(_STATUS_KEY)
            runs.append(
                {
                    "run_id": wf.id,
                    "status": state,
                    # Set when Temporal ended the run (terminated, timed out) before a final status.
                    "execution_status": (
                        _execution_status(wf) if wf.status in _ENDED_FROM_OUTSIDE else None
                    ),
                    "started": wf.start_time,
                    "ended": wf.close_time,
                }
            )
    except RPCError as e:
        fail(f"Temporal refused to list runs: {e.message}")
    if as_json:
        for run in runs:
            typer.echo(json.dumps(run, default=lambda at: at.isoformat()))
        return
    if not runs:
        out.print("no runs" + (f" in status {status_filter.value}" if status_filter else ""))
        return
    rows = [("run", "status", "started", "ended")] + [
        (
            run["run_id"],
            _list_state(run["status"], run["execution_status"]),
            _local_time(run["started"], seconds=False),
            _local_time(run["ended"], seconds=False) if run["ended"] else "",
        )
        for run in runs
    ]
    # Plain padded columns, never cut: a table would shorten run ids to fit the terminal.
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for n, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        line = f"{line}  {row[3]}".rstrip()
        out.print(line, markup=False, highlight=False, style="bold" if n == 0 else None)


def _list_state(state: str | None, execution_status: str | None) -> str:
    if execution_status:
        return f"{execution_status} (while {state or '?'})"
    return state or "?"


@app.command()
def watch(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each new RunStatus as one JSON line.")
    ] = False,
) -> None:
    """Follow a run until it ends; exit code 0 only when it completed."""
    run_async(_watch(load_settings(), run_id, as_json))


async def _watch(settings: Settings, run_id: str, as_json: bool) -> None:
    client = await connect(settings)
    handle = training_handle(client, run_id)
    st = await query_status(handle, await describe_run(handle, settings), settings)
    if as_json:
        printed: set[tuple[int, str | None]] = set()
        latest = st
        # Every line carries what the run waits on as last seen; an ended run waits on nothing.
        waiting_now: list[WaitingOn] = []

        def print_json(st: RunStatus) -> None:
            nonlocal latest
            latest = st
            if (st.version, st.execution_status) not in printed:  # a quiet poll repeats one
                printed.add((st.version, st.execution_status))
                ended = st.status.terminal or st.execution_status
                typer.echo(status_json(st, [] if ended else waiting_now))

        def print_waiting(waiting: list[WaitingOn]) -> None:
            nonlocal waiting_now
            waiting_now = waiting
            typer.echo(status_json(latest, waiting))

        final = await _showing_waits(
            handle,
            client.data_converter,
            _follow(handle, settings, st, print_json),
            print_waiting,
        )
    else:
        final = await _watch_with_bar(handle, settings, st, client.data_converter)
        _print_status(final)
    if final.status != RunStatusName.COMPLETED or final.execution_status:
        raise typer.Exit(1)


async def _watch_with_bar(
    handle: WorkflowHandle[TrainingWorkflow, RunStatus],
    settings: Settings,
    st: RunStatus,
    converter: DataConverter | None = None,
) -> RunStatus:
    """Status lines and a progress bar until the run ends; with `converter`, also a line
    whenever an activity the run waits on fails again or goes through."""
    out.print(f"watching {st.run_id}  ({ui_link(settings, st.run_id)})", markup=False)
    shown: set[tuple[RunStatusName, datetime]] = set()
    saved: set[str] = set()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=out,
        transient=True,
    ) as bar:
        task = bar.add_task(st.status.value, total=100, detail="")

        def show(st: RunStatus) -> None:
            for change in st.history:
                if (change.status, change.at) not in shown:
                    shown.add((change.status, change.at))
                    when = f"{change.at.astimezone():%H:%M:%S}"
                    bar.console.print(f"{when}  {change.status}", highlight=False)
            for line in _new_epoch_lines(st, saved):
                when = f"{datetime.now().astimezone():%H:%M:%S}"
                bar.console.print(f"{when}  {line}", markup=False, highlight=False)
            bar.update(
                task,
                description=st.status.value,
                completed=st.progress.percent if st.progress else 0,
                detail=_progress_text(st, percent=False),  # the bar shows it
            )

        if converter is None:
            return await _follow(handle, settings, st, show)
        before: list[WaitingOn] = []

        def show_waiting(waiting: list[WaitingOn]) -> None:
            nonlocal before
            when = f"{datetime.now().astimezone():%H:%M:%S}"
            for w in waiting:
                bar.console.print(f"{when}  waiting on {w.describe()}", markup=False)
            going = {w.activity for w in waiting}
            for w in before:
                if w.activity not in going:
                    bar.console.print(f"{when}  no longer waiting on {w.waiting_for}", markup=False)
            before = waiting

        return await _showing_waits(
            handle, converter, _follow(handle, settings, st, show), show_waiting
        )


def _new_epoch_lines(st: RunStatus, shown: set[str]) -> list[str]:
    """`epoch 3/5 saved  loss 0.9139  2 samples` for each saved epoch (and each resume) not in
    `shown`, which they are added to."""
    total = st.progress.total_epochs if st.progress and st.progress.total_epochs else "?"
    lines = []
    for info in st.epochs:
        key = f"epoch {info.epoch} attempt {info.attempt}"
        if key not in shown:
            shown.add(key)
            loss = f"  loss {info.loss:.4f}" if info.loss is not None else ""
            lines.append(
                f"epoch {info.epoch}/{total} saved{loss}  {_count(len(info.samples), 'sample')}"
            )
    for line in st.resumed:
        if line not in shown:
            shown.add(line)
            lines.append(line)
    return lines


async def _showing_waits(
    handle: WorkflowHandle[TrainingWorkflow, RunStatus],
    converter: DataConverter,
    follow: Coroutine[Any, Any, RunStatus],
    show_waiting: Callable[[list[WaitingOn]], None],
) -> RunStatus:
    """`follow`'s status, while what the run waits on is shown whenever it changes: the run's
    status does not move while an activity retries, and a watcher must still see why."""
    poller = asyncio.create_task(watch_waiting(handle, converter, show_waiting))
    try:
        return await follow
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def _follow(
    handle: WorkflowHandle[TrainingWorkflow, RunStatus],
    settings: Settings,
    st: RunStatus,
    show: Callable[[RunStatus], None],
) -> RunStatus:
    """Show `st` and every change after it until the run ends; the final status."""
    from workflows.training import TrainingWorkflow

    while True:
        show(st)
        if st.status.terminal or st.execution_status:
            return st
        try:
            async with asyncio.timeout(UPDATE_POLL_S):
                st = await handle.execute_update(
                    TrainingWorkflow.wait_for_change, args=[st.version, WATCH_WAIT_S]
                )
        except (RPCError, RPCTimeoutOrCancelledError, WorkflowUpdateFailedError, TimeoutError):
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The SDK turns the cancel of this task (Ctrl-C) into an update error; a
                # timeout's own cancel is already taken back here.
                raise asyncio.CancelledError from None
            # No change for a while, the run closed between two polls (its last status still
            # answers), Temporal ended it, or the worker is gone (query_status fails in one line).
            st = await query_status(handle, await describe_run(handle, settings), settings)


# ------------------------------------------------------------------------------------------------
# The model, the saved epochs and their samples, and the log
# ------------------------------------------------------------------------------------------------


@app.command()
def download(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="A folder (ending in /, or existing) or a file for the model; a folder with "
            "--all-epochs.",
        ),
    ] = "outputs/",
    epoch: Annotated[
        int | None,
        typer.Option(
            "--epoch",
            min=1,
            metavar="N",
            help="The LoRA of saved epoch N instead of the run's model (`loratrain status` "
            "lists the saved epochs).",
        ),
    ] = None,
    all_epochs: Annotated[
        bool,
        typer.Option("--all-epochs", help="The LoRA of every saved epoch, into the -o folder."),
    ] = False,
) -> None:
    """Download a completed run's model, or saved epochs' LoRAs; check each file's size and
    sha256, and print where it is.

    A saved epoch is named `<run>-<output name>-eNNNN.safetensors` in the folder.
    """
    if epoch is not None and all_epochs:
        fail("--epoch and --all-epochs: give one of them", code=2)
    if all_epochs and Path(output).exists() and not Path(output).is_dir():
        fail(f"--output: {output} is a file; --all-epochs downloads into a folder", code=2)
    into_folder = all_epochs or output.endswith(("/", os.sep)) or Path(output).is_dir()
    run_async(
        _download(load_settings(), run_id, Path(output), into_folder, epoch=epoch, every=all_epochs)
    )


async def _download(
    settings: Settings,
    run_id: str,
    output: Path,
    into_folder: bool,
    epoch: int | None = None,
    every: bool = False,
) -> None:
    client = await connect(settings)
    handle = training_handle(client, run_id)
    description = await describe_run(handle, settings)
    st = await query_status(handle, description, settings)
    if epoch is None and not every:
        target = await download_model(settings, st, output, into_folder)
        out.print(str(target), markup=False, highlight=False)
        return
    chosen = st.epochs if every else [_saved_epoch(st, epoch or 0)]
    if not chosen:
        fail(f"run {run_id} has no saved epochs {_not_yet(st)}")
    name = await _model_name(client, run_id, _first_execution(description))
    for info in chosen:
        target = output / f"{name}-e{info.epoch:04d}.safetensors" if into_folder else output
        path = await download_epoch_file(
            settings, info, info.lora, target, f"the LoRA of epoch {info.epoch} of run {run_id}"
        )
        out.print(str(path), markup=False, highlight=False)


def _saved_epoch(st: RunStatus, epoch: int) -> SavedEpochInfo:
    """The run's saved epoch `epoch`, or one line naming the epochs it saved and exit 1."""
    for info in st.epochs:
        if info.epoch == epoch:
            return info
    saved = (
        f"the saved epochs are {_epoch_ranges([e.epoch for e in st.epochs])}"
        if st.epochs
        else "it saved none"
    )
    yet = "" if st.status.terminal or st.execution_status else f" yet ({st.status.value})"
    fail(f"run {st.run_id} has no saved epoch {epoch}{yet}: {saved}")


def _epoch_ranges(epochs: Sequence[int]) -> str:
    """`1-3, 5`: the epochs, consecutive ones as a range."""
    ranges: list[list[int]] = []
    for epoch in sorted(epochs):
        if ranges and epoch == ranges[-1][-1] + 1:
            ranges[-1].append(epoch)
        else:
            ranges.append([epoch])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in ranges)


def _not_yet(st: RunStatus) -> str:
    """Why a run has nothing saved: `yet (training)`, or how it ended."""
    if st.execution_status:
        return f"({st.execution_status} while {st.status.value})"
    if st.status.terminal:
        return f"({st.status.value})"
    return f"yet ({st.status.value}); each epoch is saved as it ends"


def _first_execution(description: WorkflowExecutionDescription) -> str:
    return description.raw_description.workflow_execution_info.first_run_id or description.run_id


async def _model_name(client: Client, run_id: str, first_execution: str) -> str:
    """`<run>-<output name>`, the name of the run's model once downloaded, read from the
    request the run started with; `<run>` alone when that cannot be read."""
    handle = client.get_workflow_handle(run_id, run_id=first_execution)
    try:
        async for event in handle.fetch_history_events(page_size=1):
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            (request,) = await client.data_converter.decode(payloads, [TrainingRequest])
            if isinstance(request, TrainingRequest):
                return f"{run_id}-{request.training.output_name}"
            break
    except (RPCError, ValueError, TypeError):  # a request from before these fields, or none
        pass
    return run_id


async def download_epoch_file(
    settings: Settings,
    info: SavedEpochInfo,
    file: EpochFile,
    target: Path,
    what: str,
    http: httpx.AsyncClient | None = None,
) -> Path:
    """Download one file of a saved epoch (its LoRA, a sample) to `target`, checked against the
    size and sha256 the run recorded; the absolute path."""
    bucket = info.bucket or settings.bucket
    return await _download_verified(
        settings, bucket, file.key, file.bytes, file.sha256, target, what, http=http
    )


@app.command()
def samples(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="The folder for them (default: outputs/<RUN>-samples/)."
        ),
    ] = None,
) -> None:
    """Download the sample images of every saved epoch, one folder per epoch, check each, and
    print their paths, epoch by epoch.

    A run without samples (none saved yet, or samples turned off) says so and exits 0.
    """
    folder = Path(output) if output is not None else Path("outputs") / f"{run_id}-samples"
    if folder.exists() and not folder.is_dir():
        fail(f"--output: {folder} is a file; samples go into a folder", code=2)
    run_async(_samples(load_settings(), run_id, folder))


async def _samples(settings: Settings, run_id: str, folder: Path) -> None:
    client = await connect(settings)
    handle = training_handle(client, run_id)
    st = await query_status(handle, await describe_run(handle, settings), settings)
    await download_samples(settings, st, folder, show=True)


async def download_samples(
    settings: Settings, st: RunStatus, folder: Path, show: bool = False
) -> list[Path]:
    """Every saved epoch's samples under `folder/epoch-NNNN/`, each checked; their absolute
    paths, epoch by epoch. With `show`, each path is printed as it arrives, and a run without
    samples says why on stderr."""
    with_samples = [info for info in st.epochs if info.samples]
    if not with_samples:
        if show:
            err.print(_why_no_samples(st), markup=False, highlight=False)
        return []
    paths: list[Path] = []
    async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S) as http:
        for info in with_samples:
            for n, file in enumerate(info.samples, 1):
                target = folder / samples_folder(info.epoch) / file.key.rsplit("/", 1)[-1]
                what = f"sample {n} of epoch {info.epoch} of run {st.run_id}"
                paths.append(await download_epoch_file(settings, info, file, target, what, http))
                if show:
                    out.print(str(paths[-1]), markup=False, highlight=False)
    if show:
        err.print(
            f"{_count(len(paths), 'sample image')} of {_count(len(with_samples), 'epoch')} in "
            f"{paths[0].parent.parent}",
            markup=False,
            highlight=False,
        )
    return paths


def samples_folder(epoch: int) -> str:
    """`epoch-0003`: the folder of one epoch's samples in `samples`' output."""
    return f"epoch-{epoch:04d}"


def _why_no_samples(st: RunStatus) -> str:
    if not st.epochs:
        return f"run {st.run_id} has no sample images: it has no saved epochs {_not_yet(st)}"
    epochs = _count(len(st.epochs), "saved epoch")
    if st.status.terminal or st.execution_status:
        return f"run {st.run_id} has no sample images: samples were off for it ({epochs})"
    return (
        f"run {st.run_id} has no sample images yet ({epochs} so far): its samples are off, or "
        "come every n-th epoch and with the last"
    )


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


async def download_model(
    settings: Settings, st: RunStatus, output: Path, into_folder: bool
) -> Path:
    """Download the run's verified model into `output` (a folder, or the file itself) and check
    its sha256; the absolute path of the file."""
    run_id = st.run_id
    if st.result is None:
        state = st.execution_status or st.status.value
        fail(f"run {run_id} has no model to download ({state}); `loratrain status {run_id}`")
    result = st.result
    bucket, key = result.location.bucket, result.location.key
    target = output / f"{run_id}-{key.rsplit('/', 1)[-1]}" if into_folder else output
    return await _download_verified(
        settings,
        bucket,
        key,
        result.bytes,
        result.sha256,
        target,
        f"the model of run {run_id}",
        url=st.download_url,
    )


async def _download_verified(
    settings: Settings,
    bucket: str,
    key: str,
    size: int,
    sha256: str,
    target: Path,
    what: str,
    url: str | None = None,
    http: httpx.AsyncClient | None = None,
) -> Path:
    """Download s3://bucket/key to `target` and check its size and sha256 against what the run
    verified; `url` (a link the run signed) is tried first. One line and exit 1, keeping
    nothing, when any of that fails. The absolute path of the file."""
    uri = f"s3://{bucket}/{key}"
    try:
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {target}: {e.strerror or e}")
    try:
        sha: str | None = None
        if url is not None:
            # The run's link names S3 as it was then: a restarted stack may listen elsewhere.
            with contextlib.suppress(httpx.TransportError):
                sha = await _fetch(url, target, size, http)
        if sha is None:  # no link, or it expired (it lives a day): sign a fresh one here
            sha = await _fetch(_presign_download(settings, bucket, key), target, size, http)
    except httpx.HTTPStatusError as e:
        fail(f"could not download {what}: S3 answered {e.response.status_code} for {uri}")
    except (httpx.HTTPError, OSError) as e:
        target.with_name(target.name + ".part").unlink(missing_ok=True)
        fail(f"could not download {what}: {type(e).__name__}: {e}")
    except (BotoCoreError, ClientError) as e:
        fail(f"cannot sign a download of {uri} here ({e}); check the LORA_S3_ settings")
    if sha is None:
        fail(f"S3 refused the download of {uri}: the link has expired or is wrong")
    return await asyncio.to_thread(_keep_if_verified, target, uri, sha, sha256)


def _keep_if_verified(target: Path, uri: str, sha256: str, verified: str) -> Path:
    if sha256 != verified:
        target.unlink(missing_ok=True)
        fail(
            f"the download of {uri} has sha256 {sha256}, not the verified {verified}; nothing "
            "was kept, try again"
        )
    return target.resolve()


def _presign_download(settings: Settings, bucket: str, key: str) -> str:
    from worker.main import s3_client

    return str(
        s3_client(settings).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
        )
    )


async def _fetch(
    url: str, target: Path, size: int, http: httpx.AsyncClient | None = None
) -> str | None:
    """Stream `url` to `target` (through a .part file); its sha256, or None on 403."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S))
        response = await stack.enter_async_context(http.stream("GET", url))
        if response.status_code == 403:
            return None
        response.raise_for_status()
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with partial.open("wb") as f:
            async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                digest.update(chunk)
                f.write(chunk)
    if partial.stat().st_size != size:
        partial.unlink()
        raise OSError(f"got {partial.stat().st_size} bytes of {size}")
    partial.replace(target)
    return digest.hexdigest()


@app.command()
def logs(run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Print the run's full log (runner and trainer output), one section per GPU attempt."""
    run_async(_logs(load_settings(), run_id))


async def _logs(settings: Settings, run_id: str) -> None:
    from activities.storage import run_prefix

    client = await connect(settings)
    description = await describe_run(training_handle(client, run_id), settings)
    execution = description.raw_description.workflow_execution_info.first_run_id
    # Runs from before per-execution keys kept their logs under runs/<run>/logs/.
    prefixes = [f"{run_prefix(run_id, execution)}/logs/", f"{run_prefix(run_id)}/logs/"]
    sections = await asyncio.to_thread(_read_logs, settings, prefixes)
    if not sections:
        handle = training_handle(client, run_id)
        st = await query_status(handle, description, settings)
        if not _reached_gpu(st):
            fail(_why_no_gpu_log(st, await waiting_on(description, client.data_converter)))
        fail(
            f"no log for run {run_id} yet: the GPU uploads it when training ends or fails "
            f"(look in s3://{settings.bucket}/{prefixes[0]})"
        )
    for key, text in sections:
        if len(sections) > 1:
            err.print(f"== {key} ==", style="bold", markup=False)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _why_no_gpu_log(st: RunStatus, waiting: Sequence[WaitingOn]) -> str:
    """For a run that never had a GPU (so no runner wrote a log): what became of it instead."""
    if st.execution_status:
        return (
            f"run {st.run_id} never reached a GPU, so it has no GPU log: Temporal ended it "
            f"({st.execution_status}) while {st.status.value}"
        )
    if st.status.terminal:
        cause = ""
        if st.error is not None:
            stage = f" during {st.error.stage}" if st.error.stage else ""
            cause = f"{stage}: {st.error.code}: {st.error.message}"
        return (
            f"run {st.run_id} never reached a GPU, so it has no GPU log: {st.status.value}{cause}"
        )
    why = "; waiting on " + "; ".join(w.describe() for w in waiting) if waiting else ""
    return f"run {st.run_id} has no GPU yet ({st.status.value}), so no GPU log yet{why}"


def _read_logs(settings: Settings, prefixes: list[str]) -> list[tuple[str, str]]:
    """(key, text) of each attempt's log under the first prefix that has any, oldest first."""
    from worker.main import s3_client

    s3 = s3_client(settings)
    for prefix in prefixes:
        try:
            listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix=prefix)
            keys = sorted(
                (o["Key"] for o in listing.get("Contents", [])),
                key=lambda k: (
                    int(k.rsplit("-", 1)[-1].split(".")[0])
                    if k.rsplit("-", 1)[-1].split(".")[0].isdigit()
                    else 0
                ),
            )
            if keys:
                return [
                    (
                        key,
                        s3.get_object(Bucket=settings.bucket, Key=key)["Body"]
                        .read()
                        .decode("utf-8", errors="replace"),
                    )
                    for key in keys
                ]
        except ClientError as e:
            fail(f"S3 refused to read the logs under s3://{settings.bucket}/{prefix}: {e}")
        except BotoCoreError as e:
            fail(f"cannot reach S3 at {settings.s3_endpoint_url or 'AWS'} ({e})")
    return []


if __name__ == "__main__":
    main()
