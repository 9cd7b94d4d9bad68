"""`loratrain`: run the embedded stack, the services, and start and follow training runs.

Every command that talks to runs goes through `client.LoraClient`; this module turns its
answers and errors into lines and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn, get_args

import typer
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import TypeAdapter, ValidationError

from client import (
    CodecKeyError,
    LoraClientError,
    RunAlreadyExists,
    new_run_id,
)
from client.runs import not_yet
from common.settings import Settings
from gpu_runner.protocol import ComponentRole, RunId, TrainingConfig
from workflows.models import RunStatus, RunStatusName, TrainingRequest

from .console import err, fail, out
from .display import count, local_time, print_status, watch_with_bar
from .runs import client_message, connect, dataset_files_noted

# Imported where used: the stack (boto3) and the dataset checks (Pillow) cost every command that
# only asks Temporal a question a second of start-up.
if TYPE_CHECKING:
    from activities.civitai import ModelReference
    from devstack.stack import ChildExited, DevStack

app = typer.Typer(
    help="Train LoRA adapters on rented GPUs, durably, with Temporal.",
    no_args_is_help=True,
    # Locals can hold secrets (codec key, webhook secrets): never print them in a traceback.
    pretty_exceptions_show_locals=False,
)


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


def run_async(main: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(130) from None
    except LoraClientError as e:
        fail(client_message(e))


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
    from devstack.stack import ChildExited, DevStack, DevStackError, StartInterrupted

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
    from relay.app import run_relay

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
    uploads = dataset_files_noted(folder) if folder else []
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
    from common.s3 import s3_client

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
    client = await connect(settings)

    def uploading(files: int, where: str) -> None:
        out.print(f"uploading {files} files from {folder} to {where}", markup=False)

    try:
        await client.start(request, run_id, folder, files=uploads, on_upload=uploading)
    except RunAlreadyExists as e:
        out.print(f"{e}; not starting it again", markup=False)
        out.print(f"Temporal UI: {client.ui_url(run_id)}", markup=False)
        return
    out.print(f"started run [bold]{run_id}[/bold]", highlight=False)
    out.print(f"Temporal UI: {client.ui_url(run_id)}", markup=False)
    out.print(f"follow it:   loratrain watch {run_id}", markup=False)


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
    from common.s3 import s3_client

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
            samples=request.samples,
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
    run_status = await client.status(run_id)
    if as_json:
        typer.echo(run_status.model_dump_json(indent=2))
        return
    print_status(run_status)
    out.print(f"Temporal UI: {client.ui_url(run_id)}", markup=False, style="dim")


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Cancel a run; its GPU is given back before the run ends."""
    run_async(_cancel(load_settings(), run_id))


async def _cancel(settings: Settings, run_id: str) -> None:
    client = await connect(settings)
    outcome = await client.cancel(run_id)
    if not outcome.requested:
        out.print(
            f"run {run_id} already ended ({outcome.execution_status}); nothing to cancel",
            markup=False,
        )
        return
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
    runs = await client.list(status_filter, limit)
    if as_json:
        for run in runs:
            fields = {
                "run_id": run.run_id,
                "status": run.status,
                "execution_status": run.execution_status,
                "started": run.started,
                "ended": run.ended,
            }
            typer.echo(json.dumps(fields, default=lambda at: at.isoformat()))
        return
    if not runs:
        out.print("no runs" + (f" in status {status_filter.value}" if status_filter else ""))
        return
    rows = [("run", "status", "started", "ended")] + [
        (
            run.run_id,
            _list_state(run.status, run.execution_status),
            local_time(run.started, seconds=False),
            local_time(run.ended, seconds=False) if run.ended else "",
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
    final: RunStatus | None = None
    if as_json:
        # Each line is a whole RunStatus: a new status, or a change in what the run waits on.
        async for final in client.watch(run_id):
            typer.echo(final.model_dump_json())
    else:
        final = await watch_with_bar(client, run_id)
        print_status(final)
    if final is None or final.status != RunStatusName.COMPLETED or final.execution_status:
        raise typer.Exit(1)


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
    if every:
        paths = await client.download_epochs(run_id, output)
    else:
        paths = [await client.download(run_id, output, epoch, into_folder=into_folder)]
    for path in paths:
        out.print(str(path), markup=False, highlight=False)


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

    def show(path: Path) -> None:
        out.print(str(path), markup=False, highlight=False)

    paths = await client.samples(run_id, folder, on_file=show)
    if not paths:
        st = await client.status(run_id, webhooks=False)
        err.print(_why_no_samples(st), markup=False, highlight=False)
        return
    epochs = len({path.parent for path in paths})
    err.print(
        f"{count(len(paths), 'sample image')} of {count(epochs, 'epoch')} in "
        f"{paths[0].parent.parent}",
        markup=False,
        highlight=False,
    )


def _why_no_samples(st: RunStatus) -> str:
    if not st.epochs:
        return f"run {st.run_id} has no sample images: it has no saved epochs {not_yet(st)}"
    epochs = count(len(st.epochs), "saved epoch")
    if st.status.terminal or st.execution_status:
        return f"run {st.run_id} has no sample images: samples were off for it ({epochs})"
    return (
        f"run {st.run_id} has no sample images yet ({epochs} so far): its samples are off, or "
        "come every n-th epoch and with the last"
    )


@app.command()
def logs(run_id: Annotated[str, typer.Argument(metavar="RUN")]) -> None:
    """Print the run's full log (runner and trainer output), one section per GPU attempt."""
    run_async(_logs(load_settings(), run_id))


async def _logs(settings: Settings, run_id: str) -> None:
    client = await connect(settings)
    sections = await client.logs(run_id)
    for log in sections:
        if len(sections) > 1:
            err.print(f"== {log.key} ==", style="bold", markup=False)
        sys.stdout.write(log.text if log.text.endswith("\n") else log.text + "\n")


if __name__ == "__main__":
    main()
