"""What can go wrong when talking to runs, as exceptions a caller can tell apart and act on.

Every one is a `LoraClientError`; its message is one line that says what was wrong."""

from __future__ import annotations

from common.converter import CodecKeyError

__all__ = [
    "BucketNotFound",
    "ChecksumMismatch",
    "CodecKeyError",
    "DownloadFailed",
    "EpochNotSaved",
    "InvalidRunId",
    "LoraClientError",
    "ModelNotReady",
    "NamespaceNotFound",
    "NoLogYet",
    "RunAlreadyExists",
    "RunNotFound",
    "S3Unreachable",
    "StatusQueryFailed",
    "StorageError",
    "TemporalRefused",
    "TemporalUnreachable",
    "WorkerNotAnswering",
]


class LoraClientError(Exception):
    """Base of every error the client raises on purpose."""


class TemporalUnreachable(LoraClientError):
    """Temporal did not answer at `address` (not running, wrong address, or too slow)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"cannot reach Temporal at {address}")
        self.address = address


class TemporalRefused(LoraClientError):
    """Temporal answered, with an error (permissions, a malformed query, an overloaded server)."""


class NamespaceNotFound(LoraClientError):
    """The settings' Temporal namespace does not exist on that server."""


class RunNotFound(LoraClientError):
    """No run has this id in the namespace."""

    def __init__(self, run_id: str, namespace: str) -> None:
        super().__init__(f"no run {run_id!r} in namespace {namespace!r}")
        self.run_id = run_id
        self.namespace = namespace


class RunAlreadyExists(LoraClientError):
    """A run with this id was started before (run ids are never reused); nothing was started
    or uploaded. `execution_status` is Temporal's word for it (`running`, `completed`, ...)."""

    def __init__(self, run_id: str, execution_status: str | None) -> None:
        state = f" ({execution_status})" if execution_status else ""
        super().__init__(f"run {run_id} already exists{state}")
        self.run_id = run_id
        self.execution_status = execution_status


class InvalidRunId(LoraClientError, ValueError):
    """The run id cannot name a run (letters, digits, '.', '_', '-'; at most 128)."""


class WorkerNotAnswering(LoraClientError):
    """The run did not answer its status query in time: no worker polls its task queue."""

    def __init__(self, waited: str, run_id: str, task_queue: str) -> None:
        super().__init__(f"{waited}: is a worker for task queue {task_queue!r} running?")
        # What happened, without the question: callers add where to look for workers.
        self.waited = waited
        self.run_id = run_id
        self.task_queue = task_queue


class StatusQueryFailed(LoraClientError):
    """The run's worker answered its status query with an error."""


class ModelNotReady(LoraClientError):
    """The run has no model to download (yet, or ever: it failed, stalled or was cancelled)."""

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(f"run {run_id} has no model to download ({state})")
        self.run_id = run_id
        self.state = state


class EpochNotSaved(LoraClientError):
    """The run saved no such epoch (the message lists the ones it saved)."""


class StorageError(LoraClientError):
    """S3 refused a request (credentials, permissions, a missing object)."""


class BucketNotFound(StorageError):
    """The bucket the request names does not exist at the S3 endpoint."""


class S3Unreachable(StorageError):
    """S3 did not answer at the settings' endpoint."""


class DownloadFailed(LoraClientError):
    """A file could not be downloaded or written; nothing was kept."""


class ChecksumMismatch(DownloadFailed):
    """A downloaded file's sha256 is not the one the run verified; nothing was kept."""


class NoLogYet(LoraClientError):
    """The run has no GPU log (yet): the message says why (no GPU reached, or not uploaded)."""
