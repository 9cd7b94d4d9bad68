"""`loratrain`: run the embedded stack, the services, and start and follow training runs."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import quote

import typer
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from gpu_runner.protocol import RunId
from workflows.models import RunStatus, RunStatusName, TrainingRequest

from .converter import CodecKeyError
from .devstack import (
    ChildExited,
    DevStack,
    DevStackError,
    StartInterrupted,
)
from .settings import DEV_ENV_NAME, SEARCH_ATTRIBUTE, Settings

if TYPE_CHECKING:
    from workflows.training import TrainingWorkflow

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
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_SUFFIX = ".txt"
QUERY_TIMEOUT = timedelta(seconds=10)
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
        return await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            if "namespace" in e.message.lower():
                fail(f"namespace {settings.temporal_namespace!r} does not exist: {e.message}")
            fail(f"no run {handle.id!r} in namespace {settings.temporal_namespace!r}")
        fail(f"Temporal refused to describe run {handle.id!r}: {e.message}")


async def query_status(
    handle: WorkflowHandle[TrainingWorkflow, RunStatus], description: WorkflowExecutionDescription
) -> RunStatus:
    from workflows.training import TrainingWorkflow

    try:
        return await handle.query(TrainingWorkflow.status, rpc_timeout=QUERY_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
        if description.status == WorkflowExecutionStatus.COMPLETED:
            # A completed run returns its final status; reading it needs no worker.
            return await handle.result()
        state = description.typed_search_attributes.get(_STATUS_KEY)
        known = f"{state}, " if state else ""
        fail(
            f"run {handle.id!r} ({known}Temporal: {_execution_status(description)}) did not answer "
            f"its status query within {QUERY_TIMEOUT.seconds} s ({e}): is a worker for task queue "
            f"{description.task_queue!r} running (`loratrain worker` or `loratrain dev`)?"
        )


def _execution_status(execution: WorkflowExecution) -> str:
    return execution.status.name.lower() if execution.status else "unknown"


def run_async(main: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(130) from None


# ------------------------------------------------------------------------------------------------
# Services
# ------------------------------------------------------------------------------------------------


@app.command()
def dev() -> None:
    """Run the embedded stack in the foreground: Temporal, its UI, local S3, relay, worker.

    A part that crashes is restarted; Ctrl-C stops everything.
    """
    settings = load_settings()
    stack = DevStack(settings)

    def request_stop(signum: int, frame: object) -> None:
        stack.request_stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    out.print("starting the embedded stack…", style="dim")
    try:
        stack.start()
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
    trainer: Annotated[Trainer, typer.Option()] = Trainer.sd_scripts,
) -> None:
    """Start a training run and print its id and Temporal UI link."""
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
    folder, bucket, prefix = _images_source(images, settings, run_id)
    uploads = _dataset_files(folder) if folder else []
    fields: dict[str, Any] = {
        "images": {"bucket": bucket, "prefix": prefix},
        "model": model,
        "training": {
            k: v
            for k, v in {
                "epochs": epochs,
                "resolution": resolution,
                "trigger_word": trigger_word,
            }.items()
            if v is not None
        },
        "trainer": trainer.value,
    }
    if (webhook_url is None) != (webhook_secret is None):
        fail("--webhook-url and --webhook-secret go together: give both or neither", code=2)
    if webhook_url is not None:
        fields["webhook"] = {"url": webhook_url, "secret": webhook_secret}
    try:
        request = TrainingRequest.model_validate(fields)
    except ValidationError as e:
        for line in _validation_lines(e):
            err.print(f"error: {line}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    run_async(_start_run(settings, run_id, request, folder, uploads))


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
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        fail(f"IMAGES: {folder} holds no .png, .jpg, .jpeg or .webp images", code=2)
    return files


def _validation_lines(error: ValidationError) -> Iterator[str]:
    for e in error.errors():
        loc = tuple(e["loc"])
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
    run_status = await query_status(handle, description)
    if as_json:
        typer.echo(run_status.model_dump_json(indent=2))
        return
    out.print(_status_table(run_status))
    out.print(f"Temporal UI: {ui_link(settings, run_id)}", markup=False, style="dim")


def _status_table(st: RunStatus) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run", st.run_id)
    table.add_row("status", f"[{_STATUS_STYLE.get(st.status, 'cyan')}]{st.status.value}[/]")
    if st.attempt:
        table.add_row("GPU attempt", str(st.attempt))
    if st.progress is not None:
        table.add_row("progress", _progress_text(st))
    if st.gpu is not None:
        gpu = st.gpu
        price = f", ${gpu.dollars_per_hour:.3f}/h" if gpu.dollars_per_hour is not None else ""
        table.add_row("GPU", f"{gpu.gpu_name or '?'} ({gpu.provider} {gpu.instance_id}{price})")
    table.add_row("cost", f"${st.cost_usd:.2f}")
    if st.best_checkpoint is not None:
        table.add_row("best epoch", str(st.best_checkpoint))
    if st.result is not None:
        r = st.result
        table.add_row("model", f"{r.location.uri} ({r.bytes:,} bytes, sha256 {r.sha256[:12]}…)")
    if st.error is not None:
        e = st.error
        stage = f" during {e.stage}" if e.stage else ""
        table.add_row("error", f"[red]{e.code}{stage}: {_escape(e.message)}[/]")
        for line in e.log_tail[-10:]:
            table.add_row("", f"[dim]{_escape(line)}[/]")
    for i, change in enumerate(st.history):
        table.add_row("history" if i == 0 else "", f"{_local_time(change.at)}  {change.status}")
    return table


def _local_time(at: datetime, seconds: bool = True) -> str:
    return f"{at.astimezone():%Y-%m-%d %H:%M{':%S' if seconds else ''}}"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _progress_text(st: RunStatus) -> str:
    p = st.progress
    if p is None:
        return ""
    parts = [f"{p.percent:.0f}%", f"step {p.step}/{p.total}"]
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
) -> None:
    """List training runs with their status."""
    run_async(_list(load_settings(), status_filter, limit))


async def _list(settings: Settings, status_filter: RunStatusName | None, limit: int) -> None:
    client = await connect(settings)
    query = f"WorkflowType = '{WORKFLOW_TYPE}'"
    if status_filter is not None:
        query += f" AND {SEARCH_ATTRIBUTE} = '{status_filter.value}'"
    table = Table(box=None, padding=(0, 2))
    for column in ("run", "status", "started", "ended"):
        table.add_column(column, no_wrap=True)
    try:
        async for wf in client.list_workflows(query, limit=limit):
            state = wf.typed_search_attributes.get(_STATUS_KEY) or "?"
            style = _STATUS_STYLE.get(RunStatusName(state), "cyan") if state in _NAMES else "dim"
            if wf.status != WorkflowExecutionStatus.RUNNING and state not in _TERMINAL_NAMES:
                # Ended without reaching a final status (terminated, timed out): say how.
                state += f" ({_execution_status(wf)})"
            table.add_row(
                wf.id,
                f"[{style}]{state}[/]",
                _local_time(wf.start_time, seconds=False),
                _local_time(wf.close_time, seconds=False) if wf.close_time else "",
            )
    except RPCError as e:
        fail(f"Temporal refused to list runs: {e.message}")
    if table.row_count == 0:
        out.print("no runs" + (f" in status {status_filter.value}" if status_filter else ""))
        return
    out.print(table)


@app.command()
def watch(run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Follow a run until it ends; exit code 0 only when it completed."""
    run_async(_watch(load_settings(), run_id))


async def _watch(settings: Settings, run_id: str) -> None:
    from workflows.training import TrainingWorkflow

    client = await connect(settings)
    handle = training_handle(client, run_id)
    description = await describe_run(handle, settings)
    st = await query_status(handle, description)
    out.print(f"watching {run_id}  ({ui_link(settings, run_id)})", markup=False)
    shown: set[tuple[RunStatusName, datetime]] = set()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=out,
        transient=True,
    ) as bar:
        task = bar.add_task(st.status.value, total=100, detail="")
        while True:
            for change in st.history:
                if (change.status, change.at) not in shown:
                    shown.add((change.status, change.at))
                    when = f"{change.at.astimezone():%H:%M:%S}"
                    bar.console.print(f"{when}  {change.status}", highlight=False)
            bar.update(
                task,
                description=st.status.value,
                completed=st.progress.percent if st.progress else 0,
                detail=_progress_text(st),
            )
            if st.status.terminal:
                break
            try:
                st = await handle.execute_update(TrainingWorkflow.wait_for_change, st.version)
            except (RPCError, WorkflowUpdateFailedError) as e:
                # The run closed between two polls: its last status still answers queries.
                st = await query_status(handle, await describe_run(handle, settings))
                if not st.status.terminal:
                    fail(f"lost track of run {run_id} ({e}); try `loratrain watch {run_id}` again")
    out.print(_status_table(st))
    if st.status != RunStatusName.COMPLETED:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
