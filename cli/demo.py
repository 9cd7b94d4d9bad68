"""`loratrain demo`: the main job end to end on this machine, offline.

A tiny SD 1.x-shaped base model and a dozen captioned images are made once and kept under
`<state dir>/demo/`. The demo uses the running `loratrain dev` when there is one, or starts the
embedded stack for its own lifetime (building the model meanwhile). It then uploads the images
and starts a real run (local GPU provider, builtin trainer), shows it live as `watch` does,
downloads the LoRA into ./outputs/ as `download` does and every epoch's sample images beside it
as `samples` does, and says what it trained. Ctrl-C cancels the run (its trainer stopped, status
`cancelled`) and stops what the demo started.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import typer

from client import LoraClient, LoraClientError, RunNotFound, new_run_id
from client.runs import samples_folder, ui_url
from common.settings import Settings
from devstack.stack import ChildExited, DevStack, DevStackError, StartInterrupted
from gpu_runner.demo_assets import TINY_MODEL_FILENAME, demo_training_config, write_demo_dataset
from gpu_runner.protocol import SampleSettings
from workflows.models import RunStatus, RunStatusName, S3Prefix, TrainingRequest

from .console import err, fail, out
from .display import print_status, watch_with_bar
from .runs import client_message, connect, dataset_files_noted

DEMO_DIR = "demo"
OUTPUTS = Path("outputs")
# Two captions rendered with each epoch's LoRA in 4 steps at 64 px: the demo shows samples and
# its run takes about as long as without them, which the default 20 steps would not.
DEMO_SAMPLES = SampleSettings(count=2, steps=4)
# Building the model imports torch and diffusers: tens of seconds on a busy laptop.
MODEL_BUILD_TIMEOUT_S = 600.0
# After the cancel, how long the run may take to give its GPU (stop the trainer) back.
CANCEL_WAIT_S = 120.0
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo keeps its base model and images (made once, then reused)."""

    model: Path
    images: Path
    build_log: Path

    @classmethod
    def under(cls, state_dir: Path) -> DemoAssets:
        folder = state_dir / DEMO_DIR
        return cls(folder / TINY_MODEL_FILENAME, folder / "images", folder / "model-build.log")


@dataclass
class Timings:
    """Wall seconds of each part, in the order they ran, for the closing line."""

    parts: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.parts[name] = time.monotonic() - began

    def line(self) -> str:
        total = time.monotonic() - self.started
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.parts.items())
        return f"{total:.0f} s in all ({parts})"


def run_demo(settings: Settings) -> None:
    """The `loratrain demo` command; exits 0 only when the run completed and the LoRA is here."""
    if importlib.util.find_spec("torch") is None:
        fail(
            "the demo trains with torch, which is not installed here: "
            "pip install -e '.[dev,train]' (the `train` extra)"
        )
    timings = Timings()
    assets = DemoAssets.under(settings.state_dir)
    write_demo_dataset(assets.images)
    owned = None if DevStack(settings).running_stack() is not None else DevStack(settings)
    interrupted = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        if owned is not None:
            owned.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    build_started = time.monotonic()
    build = _start_model_build(assets)
    supervisor: threading.Thread | None = None
    try:
        if owned is None:
            out.print(f"using the running `loratrain dev` (state in {settings.state_dir})")
        else:
            supervisor = _start_stack(owned, timings)
            settings = owned.settings
        if build is not None:
            _wait_for_build(build, assets, interrupted)
            # It ran alongside the stack's start: its own time, not the wait for it.
            timings.parts["model build"] = time.monotonic() - build_started
        if interrupted.is_set():
            out.print("interrupted before the run started")
            raise typer.Exit(EXIT_INTERRUPTED)
        try:
            final, lora, samples = asyncio.run(_run(settings, assets, timings))
        except LoraClientError as e:
            fail(client_message(e))
        _print_summary(settings, final, lora, samples)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)  # asyncio.run put the default handlers back
        if build is not None and build.poll() is None:
            _stop_build(build)
        if owned is not None and supervisor is not None:  # a stack that failed to start is down
            out.print("stopping the embedded stack…", style="dim")
            with timings.part("stack stop"):
                owned.request_stop()
                supervisor.join()
                owned.stop()
    out.print(f"took {timings.line()}", markup=False)
    if lora is None:
        raise typer.Exit(1)


def _start_stack(stack: DevStack, timings: Timings) -> threading.Thread:
    """Start the embedded stack and keep its children alive (as `dev` does) in a thread. A
    start that fails has stopped whatever it started."""
    out.print(f"starting the embedded stack (state in {stack.state_dir})…", style="dim")
    try:
        with timings.part("stack start"):
            stack.start(
                report=lambda line: err.print(line, style="yellow", markup=False, highlight=False)
            )
    except StartInterrupted:
        out.print("interrupted while the stack started; it is stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ChildExited as e:
        fail(f"{e}; last lines: {' | '.join(e.child.log_tail(5))}")
    except DevStackError as e:
        fail(str(e))
    out.print(
        f"embedded stack up: Temporal UI {stack.settings.temporal_ui_url}, "
        f"logs in {stack.logs_dir}",
        markup=False,
    )
    supervisor = threading.Thread(
        target=stack.supervise,
        args=(lambda line: err.print(line, style="yellow", markup=False, highlight=False),),
        name="stack-supervisor",
        daemon=True,
    )
    supervisor.start()
    return supervisor


# ------------------------------------------------------------------------------------------------
# The tiny model: built once, in a process of its own (torch stays out of this one)
# ------------------------------------------------------------------------------------------------


def _start_model_build(assets: DemoAssets) -> subprocess.Popen[bytes] | None:
    """Start building the tiny model unless it is already there; it runs alongside the stack."""
    if assets.model.is_file():
        out.print(f"tiny base model: {assets.model} (built earlier)", markup=False)
        return None
    out.print("building the tiny base model (once)…", style="dim")
    assets.build_log.parent.mkdir(parents=True, exist_ok=True)
    with assets.build_log.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_runner.demo_assets", "--model", str(assets.model)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own group: Ctrl-C reaches the demo only, which stops the build itself.
            start_new_session=True,
        )


def _wait_for_build(
    build: subprocess.Popen[bytes], assets: DemoAssets, interrupted: threading.Event
) -> None:
    deadline = time.monotonic() + MODEL_BUILD_TIMEOUT_S
    while build.poll() is None:
        if interrupted.wait(0.2):
            return
        if time.monotonic() > deadline:
            _stop_build(build)
            fail(
                f"building the tiny model took over {MODEL_BUILD_TIMEOUT_S:.0f} s; "
                f"see {assets.build_log}"
            )
    if build.returncode != 0 or not assets.model.is_file():
        tail = assets.build_log.read_text(errors="replace").strip().splitlines()[-1:]
        fail(
            f"building the tiny model failed (exit code {build.returncode}): "
            f"{tail[0] if tail else 'no output'}; see {assets.build_log}"
        )
    out.print(f"tiny base model: {assets.model}", markup=False)


def _stop_build(build: subprocess.Popen[bytes]) -> None:
    # The model is written under a temporary name and renamed: a stopped build leaves no model.
    with contextlib.suppress(ProcessLookupError):
        build.kill()
    build.wait()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


async def _run(
    settings: Settings, assets: DemoAssets, timings: Timings
) -> tuple[RunStatus, Path | None, list[Path]]:
    """Start the run, follow it, download its LoRA and every epoch's samples; on Ctrl-C, cancel
    it and wait until its GPU is given back. The final status and, when it completed, the LoRA's
    path and the samples' paths."""
    client = await connect(settings)
    run_id = new_run_id()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    work = asyncio.create_task(_start_and_follow(client, assets, run_id, timings))
    stop = asyncio.create_task(interrupted.wait())
    await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        await _cancel(client, run_id)
        raise typer.Exit(EXIT_INTERRUPTED)
    stop.cancel()
    final = work.result()
    if final.status != RunStatusName.COMPLETED or final.execution_status:
        return final, None, []
    with timings.part("download"):
        lora = await client.download(run_id, OUTPUTS, into_folder=True)
        # Beside the LoRA, as `loratrain samples` puts them.
        samples = await client.samples(run_id, OUTPUTS / f"{run_id}-samples")
    return final, lora, samples


async def _start_and_follow(
    client: LoraClient, assets: DemoAssets, run_id: str, timings: Timings
) -> RunStatus:
    request = TrainingRequest(
        images=S3Prefix(bucket=client.settings.bucket, prefix=f"uploads/{run_id}/"),
        model=str(assets.model.resolve()),
        training=demo_training_config(),
        trainer="builtin",
        samples=DEMO_SAMPLES,
    )

    def uploading(files: int, where: str) -> None:
        out.print(f"uploading {files} files from {assets.images} to {where}", markup=False)

    with timings.part("upload"):
        files = dataset_files_noted(assets.images)
        await client.start(request, run_id, assets.images, files=files, on_upload=uploading)
    out.print(f"started run [bold]{run_id}[/bold]", highlight=False)
    out.print(f"Temporal UI: {client.ui_url(run_id)}", markup=False)
    out.print(f"follow it:   loratrain watch {run_id}", markup=False)
    with timings.part("run"):
        return await watch_with_bar(client, run_id, waiting=False)


async def _cancel(client: LoraClient, run_id: str) -> None:
    """Cancel the run if it started, and wait until it ended and gave its GPU back."""
    try:
        outcome = await client.cancel(run_id)
    except RunNotFound:
        out.print("interrupted before the run started")
        return
    if outcome.requested:
        out.print(f"interrupted: cancelling run {run_id}…", markup=False)
    try:
        async with asyncio.timeout(CANCEL_WAIT_S):
            st = await client.wait(run_id)
    except TimeoutError:
        fail(
            f"run {run_id} did not end within {CANCEL_WAIT_S:.0f} s of the cancel; "
            f"follow it with `loratrain status {run_id}`"
        )
    print_status(st)
    out.print(f"Temporal UI: {client.ui_url(run_id)}", markup=False)


def _print_summary(
    settings: Settings, st: RunStatus, lora: Path | None, samples: list[Path]
) -> None:
    if lora is None:
        print_status(st)
        out.print(f"Temporal UI: {ui_url(settings, st.run_id)}", markup=False)
        return
    losses = "   ".join(f"{epoch}: {loss:.4f}" for epoch, loss in enumerate(st.epoch_losses, 1))
    rows = [
        ("trained", _training_time(st)),
        ("loss per epoch", losses),
        ("kept epoch", f"{st.best_checkpoint} (the lowest loss)"),
        ("LoRA", f"{lora} ({lora.stat().st_size:,} bytes)"),
        *_sample_rows(st, samples),
        ("Temporal UI", ui_url(settings, st.run_id)),
    ]
    out.print(f"run {st.run_id} [green]completed[/]", highlight=False)
    for label, value in rows:
        out.print(f"  {label:<15} {value}", markup=False, highlight=False)


def _sample_rows(st: RunStatus, samples: list[Path]) -> list[tuple[str, str]]:
    """Where the samples are: the folder of them all, and the kept epoch's, one a line."""
    if not samples:
        return []
    folder = samples[0].parent.parent
    kept = st.result.epoch if st.result and st.result.epoch else st.best_checkpoint
    epochs = sum(1 for info in st.epochs if info.samples)
    rows = [("samples", f"{len(samples)} images of {epochs} epochs in {folder}/")]
    of_kept = [path for path in samples if path.parent.name == samples_folder(kept or 0)]
    rows.extend(
        (f"epoch {kept} samples" if i == 0 else "", str(path)) for i, path in enumerate(of_kept)
    )
    return rows


def _training_time(st: RunStatus) -> str:
    """Steps and epochs, and the time from `training` to `completed` in the run's history."""
    entered = {change.status: change.at for change in st.history}
    began, ended = entered.get(RunStatusName.TRAINING), entered.get(RunStatusName.COMPLETED)
    took = f" in {(ended - began).total_seconds():.0f} s" if began and ended else ""
    steps = f"{st.progress.total} steps" if st.progress else "?"
    return f"{steps}, {len(st.epoch_losses)} epochs{took}"
