"""`LoraClient`: start, follow, cancel and list training runs, and fetch what they made.

The one way the CLI, the demo, the benchmarks and Python backends talk to runs. It speaks to
Temporal with the project's data converter (so payloads stay encrypted) and to S3 with the same
settings as the worker.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import TypeAdapter, ValidationError
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from common.s3 import s3_client
from common.settings import SEARCH_ATTRIBUTE, Settings
from common.temporal import connect_client
from gpu_runner.protocol import EpochFile, RunId
from workflows.models import RunStatus, RunStatusName, SavedEpochInfo, TrainingRequest, WaitingOn

from .deliveries import webhook_deliveries
from .downloads import HTTP_TIMEOUT_S, download_verified
from .errors import (
    EpochNotSaved,
    InvalidRunId,
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
from .uploads import dataset_files, upload_files
from .waiting import WAITING_POLL_S, signature, waiting_on

if TYPE_CHECKING:
    from workflows.training import TrainingWorkflow

WORKFLOW_TYPE = "TrainingWorkflow"
CONNECT_TIMEOUT_S = 10.0
# `watch` long-polls for changes; after this long without one it asks the status again, which
# tells a quiet run from a dead worker (the update alone would wait for a worker forever).
UPDATE_POLL_S = 60.0
# The run answers each long poll after this long even without a change, so no update outlives the
# watcher that asked (the server holds at most 10 in flight per run).
WATCH_WAIT_S = UPDATE_POLL_S - 10
# Executions Temporal ended from outside: the run never reached a final status of its own, and a
# query only replays the last one it had ("training 13 %").
ENDED_FROM_OUTSIDE = frozenset(
    {WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.TIMED_OUT}
)
STATUS_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE)
STATUS_NAMES = frozenset(s.value for s in RunStatusName)


def new_run_id() -> str:
    """`run-<utc time>-<6 hex>`: sortable, and unique enough for one user's runs."""
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def execution_status(execution: WorkflowExecution) -> str:
    """Temporal's word for an execution: `running`, `completed`, `terminated`, ..."""
    return execution.status.name.lower() if execution.status else "unknown"


def ui_url(settings: Settings, run_id: str) -> str:
    """The run's page in the Temporal UI the settings name."""
    namespace = quote(settings.temporal_namespace, safe="")
    base = settings.temporal_ui_url.rstrip("/")
    return f"{base}/namespaces/{namespace}/workflows/{quote(run_id, safe='')}"


def samples_folder(epoch: int) -> str:
    """`epoch-0003`: the folder of one epoch's samples under a `samples` destination."""
    return f"epoch-{epoch:04d}"


@dataclass(frozen=True)
class RunSummary:
    """One run as `list` shows it, from Temporal's visibility store (no worker needed)."""

    run_id: str
    status: str | None  # the run's last status (`training`, `completed`, ...), if it set one
    # Set when Temporal ended the run (terminated, timed out) before a final status of its own.
    execution_status: str | None
    started: datetime
    ended: datetime | None


@dataclass(frozen=True)
class CancelOutcome:
    """What `cancel` did: `requested` is False when the run had already ended."""

    requested: bool
    execution_status: str


@dataclass(frozen=True)
class RunLog:
    """One GPU attempt's log, as its runner uploaded it."""

    key: str
    text: str


class LoraClient:
    """Training runs on one Temporal namespace and task queue, and their files in S3.

    >>> client = await LoraClient.connect(Settings())
    >>> run_id = await client.start(request)
    >>> async for status in client.watch(run_id):
    ...     print(status.status, status.progress)
    """

    def __init__(self, temporal: Client, settings: Settings) -> None:
        """Wrap a connected Temporal client; it must carry the project's data converter
        (`common.temporal.connect_client`), or the run's payloads cannot be read."""
        self._temporal = temporal
        self._settings = settings

    @classmethod
    async def connect(
        cls, settings: Settings | None = None, timeout_s: float = CONNECT_TIMEOUT_S
    ) -> LoraClient:
        """Connect to the Temporal the settings name (default: `Settings()`, from `LORA_`
        variables and the embedded stack's dev.env).

        >>> client = await LoraClient.connect()

        Raises TemporalUnreachable, or CodecKeyError when LORA_CODEC_KEY is missing or malformed.
        """
        settings = settings or Settings()
        try:
            temporal = await asyncio.wait_for(connect_client(settings), timeout_s)
        except (RuntimeError, RPCError, TimeoutError):
            raise TemporalUnreachable(settings.temporal_address) from None
        return cls(temporal, settings)

    @property
    def temporal(self) -> Client:
        """The Temporal client underneath, for what this API does not cover."""
        return self._temporal

    @property
    def settings(self) -> Settings:
        return self._settings

    def ui_url(self, run_id: str) -> str:
        """The run's page in the Temporal UI.

        >>> client.ui_url("run-1")  # 'http://127.0.0.1:8233/namespaces/default/workflows/run-1'
        """
        return ui_url(self._settings, run_id)

    # --------------------------------------------------------------------------------------------
    # Starting and following runs
    # --------------------------------------------------------------------------------------------

    async def start(
        self,
        request: TrainingRequest,
        run_id: str | None = None,
        upload_folder: Path | None = None,
        *,
        files: Sequence[Path] | None = None,
        on_upload: Callable[[int, str], None] | None = None,
    ) -> str:
        """Start a run of `request` and return its id (default: `new_run_id()`).

        With `upload_folder`, its images and captions (`files`, default: `dataset_files`) are
        uploaded first to `request.images`; `on_upload(count, "s3://bucket/prefix")` is called
        before. Nothing is uploaded or started when the id is taken: ids are never reused.

        >>> run_id = await client.start(request, upload_folder=Path("./cat"))

        Raises RunAlreadyExists, InvalidRunId, BucketNotFound, StorageError, TemporalRefused.
        """
        from workflows.training import TrainingWorkflow

        run_id = run_id or new_run_id()
        try:
            TypeAdapter(RunId).validate_python(run_id)
        except ValidationError:
            raise InvalidRunId(
                f"{run_id!r} is not a valid run id (letters, digits, '.', '_', '-'; at most 128, "
                "starting with a letter or digit)"
            ) from None
        handle = self._handle(run_id)
        # Check first: uploading into an existing run's prefix would change its dataset.
        try:
            existing = await handle.describe()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise TemporalRefused(
                    f"Temporal refused to describe run {run_id!r}: {e.message}"
                ) from None
        else:
            raise RunAlreadyExists(run_id, execution_status(existing))
        if upload_folder is not None:
            chosen = list(files) if files is not None else dataset_files(upload_folder).files
            bucket, prefix = request.images.bucket, request.images.prefix
            if on_upload is not None:
                on_upload(len(chosen), f"s3://{bucket}/{prefix}")
            await asyncio.to_thread(upload_files, self._settings, chosen, bucket, prefix)
        try:
            await self._temporal.start_workflow(
                TrainingWorkflow.run,
                request,
                id=run_id,
                task_queue=self._settings.task_queue,
                # One run per run id, ever: a retried start never starts a second run.
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            raise RunAlreadyExists(run_id, None) from None
        return run_id

    async def status(self, run_id: str, *, webhooks: bool = True) -> RunStatus:
        """The run's status now: its `waiting_on` says which activity retries (and why), and
        `webhooks` (when asked for) where its user webhooks stand.

        >>> status = await client.status("run-20261205-044138-6295a7")
        >>> status.status, status.progress.percent if status.progress else None

        Raises RunNotFound, WorkerNotAnswering (no worker replays the run), TemporalRefused.
        """
        handle = self._handle(run_id)
        description = await self._describe(run_id)
        st = await self._query(handle, description)
        update: dict[str, Any] = {
            "waiting_on": await waiting_on(description, self._temporal.data_converter)
        }
        if webhooks:
            update["webhooks"] = await webhook_deliveries(
                self._temporal, run_id, first_execution_of(description)
            )
        return st.model_copy(update=update)

    async def watch(
        self, run_id: str, *, waiting: bool = True, waiting_poll_s: float = WAITING_POLL_S
    ) -> AsyncIterator[RunStatus]:
        """The run's status now, then each change until it ends (the last one yielded is
        terminal, or has `execution_status` set when Temporal ended it). Built on the
        workflow's `wait_for_change` update; with `waiting`, a status is also yielded whenever
        what the run waits on (`waiting_on`: an activity retrying) changes.

        >>> async for status in client.watch(run_id):
        ...     print(status.status, status.progress)

        Raises RunNotFound, WorkerNotAnswering (the worker went away), TemporalRefused.
        """
        handle = self._handle(run_id)
        description = await self._describe(run_id)
        st = await self._query(handle, description)
        converter = self._temporal.data_converter
        current: builtins.list[WaitingOn] = (
            await waiting_on(description, converter) if waiting else []
        )
        yielded: tuple[Any, ...] | None = None
        next_status: asyncio.Task[RunStatus] | None = None
        next_waiting: asyncio.Task[builtins.list[WaitingOn]] | None = None
        try:
            while True:
                ended = st.status.terminal or st.execution_status is not None
                # An ended run waits on nothing, whatever was retrying before.
                shown = st.model_copy(update={"waiting_on": [] if ended else current})
                key = (st.version, st.execution_status, signature(shown.waiting_on))
                if key != yielded:  # a quiet long poll answers the same status again
                    yielded = key
                    yield shown
                if ended:
                    return
                if next_status is None:
                    next_status = asyncio.create_task(self._next_change(handle, st))
                if waiting and next_waiting is None:
                    next_waiting = asyncio.create_task(
                        self._next_waiting(handle, current, waiting_poll_s)
                    )
                pending = {task for task in (next_status, next_waiting) if task is not None}
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if next_status is not None and next_status in done:
                    st, next_status = next_status.result(), None
                if next_waiting is not None and next_waiting in done:
                    current, next_waiting = next_waiting.result(), None
        finally:
            for task in (next_status, next_waiting):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def wait(self, run_id: str) -> RunStatus:
        """Wait until the run has closed (its GPU given back, whatever ended it); its final
        status.

        >>> final = await client.wait(run_id)

        Raises RunNotFound, WorkerNotAnswering, TemporalRefused.
        """
        handle = self._handle(run_id)
        await self._describe(run_id)  # a run that is not there is said so, not waited for
        try:
            return await handle.result()
        except WorkflowFailureError:
            # Cancelled or terminated: the final status is the run's own, or Temporal's word.
            return await self._query(handle, await self._describe(run_id))

    async def first_execution(self, run_id: str) -> str:
        """The id of the run's first execution: what its S3 keys (`runs/<run>/<execution>/`),
        GPU labels and webhook ids are named by.

        >>> execution = await client.first_execution(run_id)

        Raises RunNotFound, TemporalRefused.
        """
        return first_execution_of(await self._describe(run_id))

    async def cancel(self, run_id: str) -> CancelOutcome:
        """Ask the run to cancel: it gives its GPU back, then ends `cancelled`. A run that has
        already ended is left as it is (`requested` False).

        >>> outcome = await client.cancel(run_id)

        Raises RunNotFound, TemporalRefused.
        """
        handle = self._handle(run_id)
        description = await self._describe(run_id)
        if description.status != WorkflowExecutionStatus.RUNNING:
            return CancelOutcome(requested=False, execution_status=execution_status(description))
        await handle.cancel()
        return CancelOutcome(requested=True, execution_status=execution_status(description))

    # --------------------------------------------------------------------------------------------
    # What runs made: the model, saved epochs, samples, logs
    # --------------------------------------------------------------------------------------------

    async def download(
        self,
        run_id: str,
        dest: Path,
        epoch: int | None = None,
        *,
        into_folder: bool | None = None,
    ) -> Path:
        """Download the run's model (the epoch it kept), or saved epoch `epoch`'s LoRA, to
        `dest`, checked against the size and sha256 the run recorded; the file's absolute path.

        `dest` is a folder when `into_folder` says so (default: when it is an existing
        folder): the model is then `<run>-<file name>` in it, an epoch's LoRA
        `<run>-<output name>-eNNNN.safetensors`.

        >>> path = await client.download(run_id, Path("outputs"), epoch=3)

        Raises ModelNotReady, EpochNotSaved, ChecksumMismatch, DownloadFailed, RunNotFound.
        """
        folder = await asyncio.to_thread(dest.is_dir) if into_folder is None else into_folder
        handle = self._handle(run_id)
        description = await self._describe(run_id)
        st = await self._query(handle, description)
        if epoch is None:
            return await self._download_model(st, dest, folder)
        info = saved_epoch(st, epoch)
        name = await self._model_name(run_id, first_execution_of(description))
        target = dest / f"{name}-e{info.epoch:04d}.safetensors" if folder else dest
        return await self._download_epoch_file(
            info, info.lora, target, f"the LoRA of epoch {info.epoch} of run {run_id}"
        )

    async def download_epochs(self, run_id: str, folder: Path) -> builtins.list[Path]:
        """Download every saved epoch's LoRA into `folder` (as `download` names them), each
        checked; their absolute paths, epoch by epoch.

        >>> paths = await client.download_epochs(run_id, Path("outputs"))

        Raises EpochNotSaved (none saved), ChecksumMismatch, DownloadFailed, RunNotFound.
        """
        handle = self._handle(run_id)
        description = await self._describe(run_id)
        st = await self._query(handle, description)
        if not st.epochs:
            raise EpochNotSaved(f"run {run_id} has no saved epochs {not_yet(st)}")
        name = await self._model_name(run_id, first_execution_of(description))
        paths = []
        for info in st.epochs:
            target = folder / f"{name}-e{info.epoch:04d}.safetensors"
            what = f"the LoRA of epoch {info.epoch} of run {run_id}"
            paths.append(await self._download_epoch_file(info, info.lora, target, what))
        return paths

    async def samples(
        self, run_id: str, dest: Path, on_file: Callable[[Path], None] | None = None
    ) -> builtins.list[Path]:
        """Download every saved epoch's sample images into `dest/epoch-NNNN/`, each checked;
        their absolute paths, epoch by epoch (`on_file` is called with each as it arrives).
        Empty when the run has none (none saved yet, or samples off).

        >>> paths = await client.samples(run_id, Path("outputs") / f"{run_id}-samples")

        Raises ChecksumMismatch, DownloadFailed, RunNotFound, WorkerNotAnswering.
        """
        handle = self._handle(run_id)
        st = await self._query(handle, await self._describe(run_id))
        paths: builtins.list[Path] = []
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
            for info in st.epochs:
                for n, file in enumerate(info.samples, 1):
                    target = dest / samples_folder(info.epoch) / file.key.rsplit("/", 1)[-1]
                    what = f"sample {n} of epoch {info.epoch} of run {run_id}"
                    paths.append(await self._download_epoch_file(info, file, target, what, http))
                    if on_file is not None:
                        on_file(paths[-1])
        return paths

    async def logs(self, run_id: str) -> builtins.list[RunLog]:
        """The run's GPU logs (runner and trainer output), one per GPU attempt, oldest first.

        >>> for log in await client.logs(run_id):
        ...     print(log.text)

        Raises NoLogYet (the message says why: no GPU reached, or not uploaded yet),
        StorageError, S3Unreachable, RunNotFound.
        """
        from activities.storage import run_prefix

        description = await self._describe(run_id)
        execution = description.raw_description.workflow_execution_info.first_run_id
        # Runs from before per-execution keys kept their logs under runs/<run>/logs/.
        prefixes = [f"{run_prefix(run_id, execution)}/logs/", f"{run_prefix(run_id)}/logs/"]
        found = await asyncio.to_thread(self._read_logs, prefixes)
        if found:
            return found
        st = await self._query(self._handle(run_id), description)
        if not reached_gpu(st):
            waiting = await waiting_on(description, self._temporal.data_converter)
            raise NoLogYet(why_no_gpu_log(st, waiting))
        raise NoLogYet(
            f"no log for run {run_id} yet: the GPU uploads it when training ends or fails "
            f"(look in s3://{self._settings.bucket}/{prefixes[0]})"
        )

    # --------------------------------------------------------------------------------------------
    # Internals
    # --------------------------------------------------------------------------------------------

    def _handle(self, run_id: str) -> WorkflowHandle[TrainingWorkflow, RunStatus]:
        from workflows.training import TrainingWorkflow

        return self._temporal.get_workflow_handle_for(TrainingWorkflow.run, run_id)

    async def _describe(self, run_id: str) -> WorkflowExecutionDescription:
        namespace = self._settings.temporal_namespace
        try:
            return await self._handle(run_id).describe(
                rpc_timeout=timedelta(seconds=CONNECT_TIMEOUT_S)
            )
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                if "namespace" in e.message.lower():
                    raise NamespaceNotFound(
                        f"namespace {namespace!r} does not exist: {e.message}"
                    ) from None
                raise RunNotFound(run_id, namespace) from None
            raise TemporalRefused(
                f"Temporal refused to describe run {run_id!r}: {e.message}"
            ) from None

    async def _query(
        self,
        handle: WorkflowHandle[TrainingWorkflow, RunStatus],
        description: WorkflowExecutionDescription,
    ) -> RunStatus:
        """The run's status; a run that Temporal terminated or timed out says so in
        `execution_status`, whatever its last status was."""
        from workflows.training import TrainingWorkflow

        timeout_s = self._settings.query_timeout_s
        ended_from_outside = description.status in ENDED_FROM_OUTSIDE
        try:
            status = await handle.query(
                TrainingWorkflow.status, rpc_timeout=timedelta(seconds=timeout_s)
            )
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            if description.status == WorkflowExecutionStatus.COMPLETED:
                # A completed run returns its final status; reading it needs no worker.
                return await handle.result()
            state = description.typed_search_attributes.get(STATUS_KEY)
            if ended_from_outside:
                # No worker to replay it: what Temporal itself knows is enough to say how it ended.
                last = RunStatusName(state) if state in STATUS_NAMES else RunStatusName.PENDING
                status = RunStatus(run_id=handle.id, status=last)
            elif isinstance(e, RPCError):
                # Timeouts come back worded in several ways; the caller needs one answer, always.
                known = f"{state}, " if state else ""
                raise WorkerNotAnswering(
                    f"run {handle.id!r} ({known}Temporal: {execution_status(description)}) did "
                    f"not answer its status query within {timeout_s:g} s",
                    handle.id,
                    description.task_queue,
                ) from None
            else:
                raise StatusQueryFailed(
                    f"run {handle.id!r} could not answer its status query: {e}"
                ) from None
        if ended_from_outside and not status.status.terminal:
            return status.model_copy(update={"execution_status": execution_status(description)})
        return status

    async def _next_change(
        self, handle: WorkflowHandle[TrainingWorkflow, RunStatus], st: RunStatus
    ) -> RunStatus:
        """The run's status after `st`: the next change, or the same status after a quiet
        while (asked again, which tells a quiet run from a closed one or a dead worker)."""
        from workflows.training import TrainingWorkflow

        try:
            async with asyncio.timeout(UPDATE_POLL_S):
                return await handle.execute_update(
                    TrainingWorkflow.wait_for_change, args=[st.version, WATCH_WAIT_S]
                )
        except (RPCError, RPCTimeoutOrCancelledError, WorkflowUpdateFailedError, TimeoutError):
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The SDK turns the cancel of this task into an update error; a timeout's own
                # cancel is already taken back here.
                raise asyncio.CancelledError from None
            # No change for a while, the run closed between two polls (its last status still
            # answers), Temporal ended it, or the worker is gone (the query says which).
            return await self._query(handle, await self._describe(handle.id))

    async def _next_waiting(
        self,
        handle: WorkflowHandle[TrainingWorkflow, RunStatus],
        shown: Sequence[WaitingOn],
        interval_s: float,
    ) -> builtins.list[WaitingOn]:
        """What the run waits on, once it differs from `shown` (asked every `interval_s`)."""
        converter = self._temporal.data_converter
        while True:
            await asyncio.sleep(interval_s)
            # A look that fails (Temporal slow or away) is taken again next time; the status
            # long poll reports a Temporal that stays away.
            with contextlib.suppress(RPCError, RPCTimeoutOrCancelledError):
                description = await handle.describe(rpc_timeout=timedelta(seconds=10))
                found = await waiting_on(description, converter)
                if signature(found) != signature(shown):
                    return found

    async def _model_name(self, run_id: str, first_run: str) -> str:
        """`<run>-<output name>`, the name of the run's model once downloaded, read from the
        request the run started with; `<run>` alone when that cannot be read."""
        handle = self._temporal.get_workflow_handle(run_id, run_id=first_run)
        try:
            async for event in handle.fetch_history_events(page_size=1):
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                decoded = await self._temporal.data_converter.decode(payloads, [TrainingRequest])
                if decoded and isinstance(decoded[0], TrainingRequest):
                    return f"{run_id}-{decoded[0].training.output_name}"
                break
        except (RPCError, ValueError, TypeError):  # a request from before these fields, or none
            pass
        return run_id

    async def _download_model(self, st: RunStatus, dest: Path, into_folder: bool) -> Path:
        if st.result is None:
            raise ModelNotReady(st.run_id, st.execution_status or st.status.value)
        result = st.result
        bucket, key = result.location.bucket, result.location.key
        target = dest / f"{st.run_id}-{key.rsplit('/', 1)[-1]}" if into_folder else dest
        return await download_verified(
            self._settings,
            bucket,
            key,
            result.bytes,
            result.sha256,
            target,
            f"the model of run {st.run_id}",
            url=st.download_url,
        )

    async def _download_epoch_file(
        self,
        info: SavedEpochInfo,
        file: EpochFile,
        target: Path,
        what: str,
        http: httpx.AsyncClient | None = None,
    ) -> Path:
        bucket = info.bucket or self._settings.bucket
        return await download_verified(
            self._settings, bucket, file.key, file.bytes, file.sha256, target, what, http=http
        )

    def _read_logs(self, prefixes: Sequence[str]) -> builtins.list[RunLog]:
        """Each attempt's log under the first prefix that has any, oldest first (blocking)."""
        s3 = s3_client(self._settings)
        bucket = self._settings.bucket
        for prefix in prefixes:
            try:
                listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
                keys = sorted((o["Key"] for o in listing.get("Contents", [])), key=attempt_of)
                if keys:
                    return [
                        RunLog(
                            key,
                            s3.get_object(Bucket=bucket, Key=key)["Body"]
                            .read()
                            .decode("utf-8", errors="replace"),
                        )
                        for key in keys
                    ]
            except ClientError as e:
                raise StorageError(
                    f"S3 refused to read the logs under s3://{bucket}/{prefix}: {e}"
                ) from None
            except BotoCoreError as e:
                raise S3Unreachable(
                    f"cannot reach S3 at {self._settings.s3_endpoint_url or 'AWS'} ({e})"
                ) from None
        return []

    async def list(
        self, status: RunStatusName | None = None, limit: int = 50
    ) -> builtins.list[RunSummary]:
        """Training runs, newest first, with their status (from Temporal alone: no worker
        needed); only those in `status` when given.

        >>> for run in await client.list(RunStatusName.TRAINING):
        ...     print(run.run_id, run.started)

        Raises TemporalRefused.
        """
        query = f"WorkflowType = '{WORKFLOW_TYPE}'"
        if status is not None:
            query += f" AND {SEARCH_ATTRIBUTE} = '{status.value}'"
        runs: builtins.list[RunSummary] = []
        try:
            async for wf in self._temporal.list_workflows(query, limit=limit):
                runs.append(
                    RunSummary(
                        run_id=wf.id,
                        status=wf.typed_search_attributes.get(STATUS_KEY),
                        execution_status=(
                            execution_status(wf) if wf.status in ENDED_FROM_OUTSIDE else None
                        ),
                        started=wf.start_time,
                        ended=wf.close_time,
                    )
                )
        except RPCError as e:
            raise TemporalRefused(f"Temporal refused to list runs: {e.message}") from None
        return runs


# ------------------------------------------------------------------------------------------------
# Reading a RunStatus
# ------------------------------------------------------------------------------------------------


def first_execution_of(description: WorkflowExecutionDescription) -> str:
    """The run id of the run's first execution: what its S3 keys and children are named by."""
    return description.raw_description.workflow_execution_info.first_run_id or description.run_id


def attempt_of(key: str) -> int:
    """The attempt number of a log key (`.../attempt-2.log`), 0 when it has none."""
    tail = key.rsplit("-", 1)[-1].split(".")[0]
    return int(tail) if tail.isdigit() else 0


def saved_epoch(st: RunStatus, epoch: int) -> SavedEpochInfo:
    """The run's saved epoch `epoch`; EpochNotSaved naming the epochs it saved otherwise."""
    for info in st.epochs:
        if info.epoch == epoch:
            return info
    saved = (
        f"the saved epochs are {epoch_ranges([e.epoch for e in st.epochs])}"
        if st.epochs
        else "it saved none"
    )
    yet = "" if st.status.terminal or st.execution_status else f" yet ({st.status.value})"
    raise EpochNotSaved(f"run {st.run_id} has no saved epoch {epoch}{yet}: {saved}")


def epoch_ranges(epochs: Sequence[int]) -> str:
    """`1-3, 5`: the epochs, consecutive ones as a range."""
    ranges: builtins.list[builtins.list[int]] = []
    for epoch in sorted(epochs):
        if ranges and epoch == ranges[-1][-1] + 1:
            ranges[-1].append(epoch)
        else:
            ranges.append([epoch])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in ranges)


def not_yet(st: RunStatus) -> str:
    """Why a run has nothing saved: `yet (training)`, or how it ended."""
    if st.execution_status:
        return f"({st.execution_status} while {st.status.value})"
    if st.status.terminal:
        return f"({st.status.value})"
    return f"yet ({st.status.value}); each epoch is saved as it ends"


def reached_gpu(st: RunStatus) -> bool:
    """Whether a GPU instance was ever created for the run (`attempt` is set before)."""
    return st.gpu is not None or any(c.status == RunStatusName.PENDING_GPU for c in st.history)


def why_no_gpu_log(st: RunStatus, waiting: Sequence[WaitingOn]) -> str:
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
