"""The Python client of loratrain: start, follow, cancel and list training runs, and download
what they made. The CLI, the demo and the benchmarks use it; so can any Python backend.

    from client import LoraClient
    from common.settings import Settings

    client = await LoraClient.connect(Settings())
    run_id = await client.start(request)
    async for status in client.watch(run_id):
        print(status.status, status.progress)
"""

from .errors import (
    BucketNotFound,
    ChecksumMismatch,
    CodecKeyError,
    DownloadFailed,
    EpochNotSaved,
    InvalidRunId,
    LoraClientError,
    ModelNotReady,
    NamespaceNotFound,
    NoLogYet,
    RunAlreadyExists,
    RunNotFound,
    S3Unreachable,
    StatusQueryFailed,
    StorageError,
    TemporalRefused,
    TemporalUnreachable,
    WorkerNotAnswering,
)
from .runs import CancelOutcome, LoraClient, RunLog, RunSummary, new_run_id
from .uploads import DatasetFiles, dataset_files

__all__ = [
    "BucketNotFound",
    "CancelOutcome",
    "ChecksumMismatch",
    "CodecKeyError",
    "DatasetFiles",
    "DownloadFailed",
    "EpochNotSaved",
    "InvalidRunId",
    "LoraClient",
    "LoraClientError",
    "ModelNotReady",
    "NamespaceNotFound",
    "NoLogYet",
    "RunAlreadyExists",
    "RunLog",
    "RunNotFound",
    "RunSummary",
    "S3Unreachable",
    "StatusQueryFailed",
    "StorageError",
    "TemporalRefused",
    "TemporalUnreachable",
    "WorkerNotAnswering",
    "dataset_files",
    "new_run_id",
]
