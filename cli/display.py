"""How a run reads in a terminal: `status`'s rows, `watch`'s lines and progress bar."""

from __future__ import annotations

from datetime import datetime, timedelta

from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from client import LoraClient
from client.deliveries import describe as describe_deliveries
from client.runs import reached_gpu
from client.waiting import signature
from workflows.models import RunStatus, RunStatusName, WaitingOn

from .console import out

STATUS_STYLE = {
    RunStatusName.COMPLETED: "green",
    RunStatusName.FAILED: "red",
    RunStatusName.STALLED: "red",
    RunStatusName.CANCELLED: "yellow",
}


def print_status(st: RunStatus) -> None:
    """One `label  value` line each, never wrapped or cut: ids, URIs and commands copy whole."""
    rows: list[tuple[str, str]] = [("run", escape(st.run_id)), ("status", status_text(st))]
    # An activity that keeps failing (Civitai down, S3 refusing) is why the status does not move.
    rows.extend(
        ("waiting on" if i == 0 else "", f"[yellow]{escape(w.describe())}[/]")
        for i, w in enumerate(st.waiting_on)
    )
    if st.attempt:
        rows.append(("GPU attempt", str(st.attempt)))
    if st.progress is not None:
        rows.append(("progress", progress_text(st)))
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
        rows.extend(saved_epoch_rows(st))
    elif st.epoch_losses:
        rows.append(("epoch losses", epoch_losses_text(st)))
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
        if reached_gpu(st):  # a GPU ran: its runner uploads the whole log when the run ends
            rows.append(("full log", escape(f"loratrain logs {st.run_id}")))
    for i, change in enumerate(st.history):
        rows.append(("history" if i == 0 else "", f"{local_time(change.at)}  {change.status}"))
    for label, value in rows:
        out.print(f"[bold]{label:<12}[/] {value}", highlight=False)


def marked_epoch(st: RunStatus) -> tuple[int | None, str]:
    """The epoch whose LoRA is the run's model (`kept`), or before the upload the one of the
    lowest loss (`lowest`), known once training ended."""
    if st.result is not None:
        return st.result.epoch or st.best_checkpoint, "kept"
    return st.best_checkpoint, "lowest"


def saved_epoch_rows(st: RunStatus) -> list[tuple[str, str]]:
    """One row per epoch, `3  loss 0.9139  attempt 1  2 samples (kept)`, saved ones with the
    attempt that trained them and their samples; how to fetch them after."""
    saved = {info.epoch: info for info in st.epochs}
    numbers = sorted(set(saved) | set(range(1, len(st.epoch_losses) + 1)))
    marked, mark = marked_epoch(st)
    width = len(str(numbers[-1]))
    rows: list[tuple[str, str]] = []
    for epoch in numbers:
        info = saved.get(epoch)
        loss = info.loss if info is not None else None
        if loss is None and epoch <= len(st.epoch_losses):
            loss = st.epoch_losses[epoch - 1]
        parts = [f"{epoch:>{width}}", f"loss {loss:.4f}" if loss is not None else "loss ?"]
        if info is not None:
            parts += [f"attempt {info.attempt}", count(len(info.samples), "sample")]
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


def epoch_losses_text(st: RunStatus) -> str:
    """`1: 0.2100  2: 0.1800 (kept)  3: 0.1900`: the epoch whose LoRA is the run's model, or
    before the upload the one of the lowest loss."""
    marked, mark = marked_epoch(st)
    return "  ".join(
        f"{epoch}: {loss:.4f}" + (f" ({mark})" if epoch == marked else "")
        for epoch, loss in enumerate(st.epoch_losses, 1)
    )


def status_text(st: RunStatus) -> str:
    if st.execution_status:
        # Temporal ended it: the run's own last status is history, not the present.
        return f"[red]{st.execution_status}[/] (by Temporal, while {st.status.value})"
    return f"[{STATUS_STYLE.get(st.status, 'cyan')}]{st.status.value}[/]"


def local_time(at: datetime, seconds: bool = True) -> str:
    return f"{at.astimezone():%Y-%m-%d %H:%M{':%S' if seconds else ''}}"


def progress_text(st: RunStatus, percent: bool = True) -> str:
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


def count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def new_epoch_lines(st: RunStatus, shown: set[str]) -> list[str]:
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
                f"epoch {info.epoch}/{total} saved{loss}  {count(len(info.samples), 'sample')}"
            )
    for line in st.resumed:
        if line not in shown:
            shown.add(line)
            lines.append(line)
    return lines


async def watch_with_bar(client: LoraClient, run_id: str, waiting: bool = True) -> RunStatus:
    """Status lines and a progress bar until the run ends; its final status. With `waiting`,
    also a line whenever an activity the run waits on fails again or goes through."""
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
        task: TaskID | None = None
        before: list[WaitingOn] = []
        final: RunStatus | None = None
        async for st in client.watch(run_id, waiting=waiting):
            final = st
            if task is None:
                bar.console.print(
                    f"watching {st.run_id}  ({client.ui_url(st.run_id)})", markup=False
                )
                task = bar.add_task(st.status.value, total=100, detail="")
            for change in st.history:
                if (change.status, change.at) not in shown:
                    shown.add((change.status, change.at))
                    when = f"{change.at.astimezone():%H:%M:%S}"
                    bar.console.print(f"{when}  {change.status}", highlight=False)
            now = f"{datetime.now().astimezone():%H:%M:%S}"
            for line in new_epoch_lines(st, saved):
                bar.console.print(f"{now}  {line}", markup=False, highlight=False)
            ended = st.status.terminal or st.execution_status is not None
            if signature(st.waiting_on) != signature(before) and not ended:
                for w in st.waiting_on:
                    bar.console.print(f"{now}  waiting on {w.describe()}", markup=False)
                going = {w.activity for w in st.waiting_on}
                for w in before:
                    if w.activity not in going:
                        bar.console.print(
                            f"{now}  no longer waiting on {w.waiting_for}", markup=False
                        )
                before = st.waiting_on
            bar.update(
                task,
                description=st.status.value,
                completed=st.progress.percent if st.progress else 0,
                detail=progress_text(st, percent=False),  # the bar shows it
            )
    assert final is not None  # watch yields at least the current status
    return final
