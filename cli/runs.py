"""What the commands share to talk to runs: the client, its errors as lines, a local dataset."""

from __future__ import annotations

from pathlib import Path

from client import (
    CodecKeyError,
    LoraClient,
    LoraClientError,
    ModelNotReady,
    S3Unreachable,
    TemporalUnreachable,
    WorkerNotAnswering,
    dataset_files,
)
from common.settings import DEV_ENV_NAME, Settings

from .console import err, fail


async def connect(settings: Settings) -> LoraClient:
    """The project's client, or a plain message and exit 1 when Temporal does not answer."""
    try:
        return await LoraClient.connect(settings)
    except CodecKeyError as e:
        fail(
            f"{e}: start `loratrain dev` once (it writes one to "
            f"{settings.state_dir / DEV_ENV_NAME}), or set it"
        )


def client_message(e: LoraClientError) -> str:
    """The client's one line, with where to look among this project's own commands."""
    if isinstance(e, TemporalUnreachable | S3Unreachable):
        return f"{e}: is `loratrain dev` running?"
    if isinstance(e, WorkerNotAnswering):
        return (
            f"{e.waited}: is a worker for task queue {e.task_queue!r} running "
            "(`loratrain worker` or `loratrain dev`)?"
        )
    if isinstance(e, ModelNotReady):
        return f"{e}; `loratrain status {e.run_id}`"
    return str(e)


def dataset_files_noted(folder: Path) -> list[Path]:
    """The folder's images and captions; hidden files are skipped silently, others with a note."""
    found = dataset_files(folder)
    for path in found.skipped:
        if path.is_dir():
            err.print(f"note: skipping folder {path.name}/ (only top-level files are uploaded)")
        else:
            err.print(
                f"note: skipping {path.name} (not a .png/.jpg/.jpeg/.webp image or .txt caption)",
                markup=False,
            )
    return found.files
