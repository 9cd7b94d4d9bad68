"""S3: validate the dataset, stream the images zip, write the job spec, verify the upload."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.threads import submit
from common.settings import Settings
from gpu_runner.protocol import (
    EPOCH_LORA,
    EPOCH_STATE,
    EpochFile,
    EpochManifest,
    EpochUploads,
    ImagesSource,
    JobSpec,
    KeepPolicy,
    ModelComponent,
    ModelSource,
    RemoteFile,
    ResumeSource,
    RunnerLimits,
    SampleSettings,
    TrainerName,
    TrainingConfig,
    UploadTarget,
    derive_run_secret,
    describe_invalid,
)
from gpu_runner.trainers.base import kept_epoch
from gpu_runner.trainers.builtin import family_refusal
from gpu_runner.trainers.sd_scripts import blocks_to_swap_problem
from workflows.models import OutputLocation, S3Location, S3Prefix, SavedEpochInfo

from .civitai import ResolvedModel

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Stable ApplicationError types the workflow can match on.
INVALID_DATASET = "InvalidDataset"
INVALID_REQUEST = "InvalidRequest"
INVALID_TRAINING_CONFIG = "InvalidTrainingConfig"
INVALID_JOB_SPEC = "InvalidJobSpec"
UPLOAD_MISSING = "UploadMissing"
UPLOAD_MISMATCH = "UploadMismatch"
UPLOAD_UNREADABLE = "UploadUnreadable"
_ACCESS_ERRORS = frozenset(
    {
        "403",
        "AccessDenied",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "PermanentRedirect",
        "301",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
    }
)

MAX_CAPTION_BYTES = 64 * 1024
MAX_LOG_BYTES = 16 * 1024 * 1024  # the runner uploads only the end of a longer log
# A .tar.gz of TensorBoard scalars: a few MB for a long run; a larger one is not uploaded.
MAX_TENSORBOARD_BYTES = 64 * 1024 * 1024
# The zip's multipart parts: this size, or larger where the zip would need more than S3's
# 10,000 parts. Each part in memory is one of these.
ZIP_PART_BYTES = 8 * 1024 * 1024
_MAX_PARTS = 10_000
# A zip entry's bytes beyond its name and data (local header, data descriptor and central
# directory record, with zip64 fields), and the archive's end records: a bound, not exact.
_ZIP_ENTRY_OVERHEAD = 160
_ZIP_END_OVERHEAD = 200
# Parts uploading at once while the next fills: one request at a time leaves the zip waiting
# on each part's round trip.
_PARTS_IN_FLIGHT = 2
READ_CHUNK_BYTES = 1024 * 1024
# Every entry gets this timestamp so the same dataset always gives the same zip bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# S3 copies above 5 GiB must be multipart; the zip of a 5 GiB dataset can be a little larger.
_COPY_CONFIG = TransferConfig(
    multipart_threshold=5 * 1024**3, multipart_chunksize=512 * 1024**2, use_threads=False
)
_CHECK_THREADS = 8  # concurrent GETs while decoding images
# Files read (and checked) ahead of the one being zipped, in bytes: bounds memory; one file
# larger than this is still read, alone.
_READ_AHEAD_BYTES = 8 * 1024 * 1024
_MAGIC_BYTES = 16
_MESSAGE_PROBLEMS = 200  # problems spelled out in the error message; details hold up to 1,000
_DETAIL_PROBLEMS = 1000

_IMAGE_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WebP"}
_CAPTION_SUFFIX = ".txt"
_KNOWN_UNSUPPORTED = {
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".jxl": "JPEG XL",
    ".svg": "SVG",
    ".psd": "PSD",
}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class DatasetInput(BaseModel):
    run_id: str
    images: S3Prefix
    # The run's first execution id: a reused run id never finds the previous run's zip.
    execution: str = ""


class DatasetSummary(BaseModel):
    image_count: int
    caption_count: int
    total_bytes: int


class ImagesZip(BaseModel):
    location: S3Location
    sha256: str
    bytes: int
    image_count: int


class JobSpecInput(BaseModel):
    run_id: str
    images_zip: ImagesZip
    model: ResolvedModel
    training: TrainingConfig
    trainer: TrainerName
    output: OutputLocation
    civitai_api_key: str | None = Field(
        default=None, repr=False, description="None: the worker's own key, if it has one."
    )
    limits: RunnerLimits = RunnerLimits()
    attempt: int = Field(default=1, ge=1, description="Which GPU attempt the job is for.")
    execution: str = ""
    # The runner's events go to a URL, and are signed with a secret, that name the execution:
    # runs started before this was set keep the run-id-only URL their earlier GPUs used.
    events_name_execution: bool = False
    # None: the worker's settings. The workflow sizes them to the run's deadlines.
    job_url_ttl_s: int | None = Field(default=None, gt=0)
    upload_url_ttl_s: int | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    # Every epoch uploaded as it ends, with these samples (runs from before: only the model).
    save_epochs: bool = False
    samples: SampleSettings = SampleSettings(enabled=False)
    keep: KeepPolicy = "lowest_loss"
    # Resume from the last complete epoch that an earlier attempt saved, when there is one.
    resume: bool = False


def events_url(relay_public_url: str, run_id: str, execution: str | None) -> str:
    """Where the runner posts its events: the relay verifies them with the secret of exactly
    this run (and, with `execution`, of exactly this run of the id)."""
    base = f"{relay_public_url.rstrip('/')}/v1/runs/{run_id}"
    return f"{base}/executions/{execution}/events" if execution else f"{base}/events"


class JobSpecRef(BaseModel):
    location: S3Location
    job_url: str = Field(repr=False)
    output: S3Location
    # The epoch the job resumes from (None: from the start), and every complete epoch found.
    resumed_from: int | None = None
    saved_epochs: list[SavedEpochInfo] = Field(default_factory=list)


class RunKeyInput(BaseModel):
    run_id: str
    execution: str = ""


class VerifyUploadInput(BaseModel):
    run_id: str
    output: S3Location
    bytes: int
    sha256: str


class VerifiedUpload(BaseModel):
    location: S3Location
    bytes: int
    sha256: str
    download_url: str = Field(repr=False)


@dataclass(frozen=True)
class _DatasetFile:
    bucket: str
    key: str
    name: str  # relative to the prefix; the entry name in the zip
    size: int
    etag: str


@dataclass(frozen=True)
class _Dataset:
    where: str  # s3://bucket/folder/, for messages
    files: list[_DatasetFile]  # images and captions, sorted by name
    summary: DatasetSummary


class StorageActivities:
    """Activities over one boto3 S3 client (sync: they run on the worker's thread pool)."""

    def __init__(
        self, s3_client: S3Client, settings: Settings, presign_client: S3Client | None = None
    ) -> None:
        self.s3 = s3_client
        self.settings = settings
        # Signs for the address GPUs and users reach (LORA_S3_PUBLIC_ENDPOINT_URL) when that
        # differs from the worker's own; signing is local, so it never calls that address.
        self.presigner = presign_client or s3_client

    @activity.defn
    def validate_images(self, input: DatasetInput) -> DatasetSummary:
        """Check every object under the prefix; one non-retryable error lists every problem."""
        return self._scan(input.images).summary

    @activity.defn
    def build_images_zip(self, input: DatasetInput) -> ImagesZip:
        """Validate, then stream the dataset into `runs/<run_id>/images.zip` in bounded memory.

        The listing is checked first (names, sizes, counts); each file's contents are checked as
        it is read for the zip, so the dataset is read once. Any problem aborts the upload and
        fails the activity with every problem listed, as `validate_images` does.

        Idempotent: a zip finished by an earlier attempt (it carries the sha256 in its metadata)
        is returned as it is.
        """
        location = S3Location(
            bucket=self.settings.bucket,
            key=f"{run_prefix(input.run_id, input.execution)}/images.zip",
        )
        finished = self._finished_zip(location)
        if finished is not None:
            return finished
        dataset = self._scan(input.images, read_contents=False)
        self._abort_stale_uploads(location)
        upload = _MultipartUpload(self.s3, location, _zip_part_bytes(dataset))
        if not self._stream_zip(dataset, upload):
            self._stamp_zip(location, upload, dataset.summary.image_count)
        return ImagesZip(
            location=location,
            sha256=upload.sha256.hexdigest(),
            bytes=upload.bytes,
            image_count=dataset.summary.image_count,
        )

    @activity.defn
    def write_job_spec(self, input: JobSpecInput) -> JobSpecRef:
        """Write `runs/<run_id>/<execution>/job-<attempt>.json` (it holds secrets: never logged)
        and presign it for as long as the GPU may take to boot.

        Settings that do not work with the model's family, or any other field the job refuses,
        fail the run at once: retrying cannot change them."""
        try:
            return self._write_job_spec(input)
        except ValidationError as e:
            raise ApplicationError(
                f"the job for the GPU is not valid: {describe_invalid(e)}",
                type=INVALID_JOB_SPEC,
                non_retryable=True,
            ) from None

    def _write_job_spec(self, input: JobSpecInput) -> JobSpecRef:
        prefix = run_prefix(input.run_id, input.execution)
        model = input.model
        if input.trainer == "builtin" and (refusal := family_refusal(model.family)):
            raise ApplicationError(refusal, type=INVALID_TRAINING_CONFIG, non_retryable=True)
        training = _training_for(input.training, model)
        output = S3Location(
            bucket=input.output.bucket or self.settings.bucket,
            key=input.output.key or f"{prefix}/model/{training.output_name}.safetensors",
        )
        log = run_log_location(self.settings.bucket, prefix, input.attempt)
        tensorboard = run_tensorboard_location(self.settings.bucket, prefix, input.attempt)
        upload_ttl_s = input.upload_url_ttl_s or self.settings.upload_url_ttl_s
        bound_to = input.execution if input.events_name_execution else None
        # The key only travels to boxes that need it to download the model.
        civitai_api_key = None
        if model.needs_civitai_key_anywhere:
            civitai_api_key = input.civitai_api_key
            if civitai_api_key is None and self.settings.civitai_api_key is not None:
                civitai_api_key = self.settings.civitai_api_key.get_secret_value()
        saved: list[SavedEpochInfo] = []
        epochs: dict[str, Any] = {}
        if input.save_epochs and bound_to is not None:
            events = events_url(self.settings.relay_public_url, input.run_id, bound_to)
            epochs = {
                "epoch_uploads": EpochUploads(url=events.removesuffix("/events") + "/uploads"),
                "samples": input.samples,
                "keep": input.keep,
            }
            if input.resume:
                complete = self._complete_epochs(input.run_id, input.execution)
                saved = [info for info, _ in complete]
                epochs["resume"] = self._resume_source(complete, input.keep, upload_ttl_s)
        spec = JobSpec(
            run_id=input.run_id,
            attempt=input.attempt,
            images=ImagesSource(
                url=self._presign(
                    "get_object", input.images_zip.location, self.settings.download_url_ttl_s
                ),
                sha256=input.images_zip.sha256,
                bytes=input.images_zip.bytes,
                image_count=input.images_zip.image_count,
            ),
            model=ModelSource(
                url=model.url,
                filename=model.filename,
                sha256=model.sha256,
                bytes=model.bytes,
                base_model=model.base_model,
                family=model.family,
                needs_civitai_key=model.needs_civitai_key,
                needs_hf_token=model.needs_hf_token,
                variant=model.variant,
                v_parameterization=model.v_parameterization,
                components=[ModelComponent(**c.model_dump()) for c in model.components],
            ),
            civitai_api_key=civitai_api_key,
            # The worker's token (never in workflow history) goes only to GPUs that need it.
            hf_token=(
                self.settings.hf_token.get_secret_value()
                if self.settings.hf_token is not None and model.needs_hf_token_anywhere
                else None
            ),
            training=training,
            trainer=input.trainer,
            events_url=events_url(self.settings.relay_public_url, input.run_id, bound_to),
            webhook_secret=derive_run_secret(
                self.settings.require_master_secret(), input.run_id, bound_to
            ),
            upload=self._upload_target(output, self.settings.max_model_bytes, upload_ttl_s),
            log_upload=self._upload_target(log, MAX_LOG_BYTES, upload_ttl_s),
            tensorboard_upload=self._upload_target(
                tensorboard, MAX_TENSORBOARD_BYTES, upload_ttl_s
            ),
            limits=input.limits,
            **epochs,
        )
        location = _job_location(self.settings.bucket, prefix, input)
        self.s3.put_object(
            Bucket=location.bucket,
            Key=location.key,
            Body=spec.model_dump_json().encode("utf-8"),
            ContentType="application/json",
        )
        return JobSpecRef(
            location=location,
            job_url=self._presign(
                "get_object", location, input.job_url_ttl_s or self.settings.job_url_ttl_s
            ),
            output=output,
            resumed_from=spec.resume.epoch if spec.resume else None,
            saved_epochs=saved,
        )

    def _complete_epochs(
        self, run_id: str, execution: str
    ) -> list[tuple[SavedEpochInfo, EpochManifest]]:
        """The run's complete epochs, in order: those whose manifest is up and whose every file
        is there at the size the manifest says. A folder without a manifest (a host that died
        while uploading) is skipped, and so is one whose manifest names a missing file."""
        folder = f"{run_prefix(run_id, execution)}/epochs/"
        bucket = self.settings.bucket
        listed = list(self._list(bucket, folder, folder))
        sizes = {item["Key"]: item["Size"] for item in listed}
        found: dict[int, tuple[EpochManifest, SavedEpochInfo]] = {}
        for key in sorted(sizes):
            if not key.endswith("/manifest.json"):
                continue
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            try:
                manifest = EpochManifest.model_validate_json(body)
            except ValidationError:
                log.warning("ignoring %s: not a valid epoch manifest", key)
                continue
            missing = [name for name, f in manifest.files.items() if sizes.get(f.key) != f.bytes]
            if missing or EPOCH_LORA not in manifest.files or manifest.run_id != run_id:
                log.warning("ignoring %s: incomplete (%s)", key, ", ".join(missing) or "no LoRA")
                continue
            files = manifest.files
            found[manifest.epoch] = (
                manifest,
                SavedEpochInfo(
                    epoch=manifest.epoch,
                    loss=manifest.loss,
                    step=manifest.step,
                    attempt=manifest.attempt,
                    bucket=bucket,
                    lora=files[EPOCH_LORA],
                    samples=[f for name, f in sorted(files.items()) if name.startswith("samples/")],
                    state=files.get(EPOCH_STATE),
                    manifest_key=key,
                ),
            )
        return [(found[epoch][1], found[epoch][0]) for epoch in sorted(found)]

    def _resume_source(
        self,
        complete: list[tuple[SavedEpochInfo, EpochManifest]],
        keep: KeepPolicy,
        ttl_s: int,
    ) -> ResumeSource | None:
        """The last saved epoch with a training state and every earlier loss, with the LoRAs
        the replacement may keep without training them."""
        resumable = [
            (info, manifest)
            for info, manifest in complete
            if info.state is not None and len(manifest.epoch_losses) == info.epoch
        ]
        if not resumable:
            return None
        last, manifest = resumable[-1]
        assert last.state is not None
        by_epoch = {info.epoch: info for info, _ in complete}
        losses = manifest.epoch_losses
        best = kept_epoch(losses, "lowest_loss")
        keepable = {last.epoch} | ({best} if keep == "lowest_loss" and best in by_epoch else set())
        return ResumeSource(
            epoch=last.epoch,
            step=last.step,
            attempt=last.attempt,
            epoch_losses=losses,
            state=self._remote(last.state, ttl_s),
            loras={e: self._remote(by_epoch[e].lora, ttl_s) for e in sorted(keepable)},
        )

    def _remote(self, file: EpochFile, ttl_s: int) -> RemoteFile:
        location = S3Location(bucket=self.settings.bucket, key=file.key)
        return RemoteFile(
            url=self._presign("get_object", location, ttl_s),
            key=file.key,
            bytes=file.bytes,
            sha256=file.sha256,
        )

    def _upload_target(self, location: S3Location, max_bytes: int, ttl_s: int) -> UploadTarget:
        """A presigned PUT of `location` for the runner."""
        return UploadTarget(
            url=self._presign("put_object", location, ttl_s),
            bucket=location.bucket,
            key=location.key,
            max_bytes=max_bytes,
        )

    @activity.defn
    def delete_job_specs(self, input: RunKeyInput) -> int:
        """Delete the run's job specs (Civitai key, run secret) and its saved epochs' training
        states once the run is closed; how many. The epochs' LoRAs, samples and manifests stay.

        Idempotent: nothing left to delete is success.
        """
        prefix = run_prefix(input.run_id, input.execution) + "/"

        def closed_with_the_run(key: str) -> bool:
            name = key[len(prefix) :]
            job = name.startswith("job") and name.endswith(".json") and "/" not in name
            state = name.startswith("epochs/") and name.endswith(f"/{EPOCH_STATE}")
            return job or state

        keys = [
            item["Key"]
            for item in self._list(self.settings.bucket, prefix, prefix)
            if closed_with_the_run(item["Key"])
        ]
        for key in keys:
            self.s3.delete_object(Bucket=self.settings.bucket, Key=key)
        return len(keys)

    @activity.defn
    def verify_upload(self, input: VerifyUploadInput) -> VerifiedUpload:
        """Check that the uploaded model exists with the size and sha256 the runner reported."""
        where = input.output.uri
        try:
            head = self.s3.head_object(Bucket=input.output.bucket, Key=input.output.key)
        except ClientError as e:
            if _error_code(e) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}:
                raise ApplicationError(
                    f"the trained model is missing: nothing at {where}",
                    type=UPLOAD_MISSING,
                    non_retryable=True,
                ) from None
            if _error_code(e) in _ACCESS_ERRORS:
                # Retrying cannot fix credentials, permissions or a wrong region.
                raise ApplicationError(
                    f"cannot read the trained model at {where}: {_error_code(e)} "
                    "(check the worker's S3 credentials, bucket policy and region)",
                    type=UPLOAD_UNREADABLE,
                    non_retryable=True,
                ) from None
            raise
        size = head["ContentLength"]
        if size != input.bytes:
            raise ApplicationError(
                f"the model at {where} is {size} bytes, but the runner reported {input.bytes}",
                type=UPLOAD_MISMATCH,
                non_retryable=True,
            )
        body = self.s3.get_object(
            Bucket=input.output.bucket, Key=input.output.key, IfMatch=head["ETag"]
        )["Body"]
        digest = hashlib.sha256()
        done = 0
        try:
            for chunk in body.iter_chunks(READ_CHUNK_BYTES):
                digest.update(chunk)
                done += len(chunk)
                _heartbeat(done)
        finally:
            body.close()
        sha256 = digest.hexdigest()
        if sha256 != input.sha256.lower():
            raise ApplicationError(
                f"the model at {where} has sha256 {sha256}, but the runner reported {input.sha256}",
                type=UPLOAD_MISMATCH,
                non_retryable=True,
            )
        return VerifiedUpload(
            location=input.output,
            bytes=size,
            sha256=sha256,
            download_url=self._presign(
                "get_object", input.output, self.settings.download_url_ttl_s
            ),
        )

    # ----------------------------------------------------------------------------------------
    # Dataset checks
    # ----------------------------------------------------------------------------------------

    def _scan(self, images: S3Prefix, *, read_contents: bool = True) -> _Dataset:
        """List and check the dataset; raise one InvalidDataset error naming every problem.
        Without `read_contents`, files are read only when the listing already shows a problem
        (the zip checks contents as it reads them)."""
        folder = _folder(images.prefix)
        where = f"s3://{images.bucket}/{folder}"
        limits = self.settings
        problems: list[tuple[str, str]] = []  # (file name, what is wrong with it)
        files: list[_DatasetFile] = []
        image_files: list[_DatasetFile] = []
        caption_files: list[_DatasetFile] = []
        for obj in self._list(images.bucket, folder, where):
            key = obj["Key"]
            if key.endswith("/"):  # a "directory marker" some tools create
                continue
            if _is_os_clutter(key[len(folder) :]):
                continue
            item = _DatasetFile(
                bucket=images.bucket,
                key=key,
                name=key[len(folder) :],
                size=obj["Size"],
                etag=obj["ETag"],
            )
            suffix = _suffix(item.name)
            if not _safe_name(item.name):
                problems.append(
                    (
                        item.name,
                        "unsafe file name (empty, '.' or '..' parts, backslashes or "
                        "control characters); rename it",
                    )
                )
            elif suffix in _IMAGE_TYPES:
                if item.size == 0:
                    problems.append((item.name, "the file is empty"))
                elif item.size > limits.max_image_bytes:
                    problems.append(
                        (
                            item.name,
                            f"{_human(item.size)} is over the limit of "
                            f"{_human(limits.max_image_bytes)} per image; resize it",
                        )
                    )
                image_files.append(item)
            elif suffix == _CAPTION_SUFFIX:
                if item.size > MAX_CAPTION_BYTES:
                    problems.append(
                        (
                            item.name,
                            f"caption is {_human(item.size)}, over the limit of "
                            f"{_human(MAX_CAPTION_BYTES)}",
                        )
                    )
                caption_files.append(item)
            else:
                problems.append((item.name, _unsupported(suffix)))
            files.append(item)

        image_count = len(image_files)
        total_bytes = sum(f.size for f in image_files) + sum(f.size for f in caption_files)
        dataset_problems: list[str] = []
        if image_count == 0:
            dataset_problems.append(f"no images under {where}")
        if image_count > limits.max_images:
            dataset_problems.append(
                f"{image_count} images under {where}, more than the limit of "
                f"{limits.max_images}; remove some or split the dataset"
            )
        if total_bytes > limits.max_dataset_bytes:
            dataset_problems.append(
                f"the images and captions add up to {_human(total_bytes)}, more than the limit "
                f"of {_human(limits.max_dataset_bytes)}"
            )
        # Reading every file of a dataset that is rejected for its size anyway would be wasted;
        # one rejected for some files is read to name every problem in one error.
        if (
            (read_contents or problems)
            and image_count <= limits.max_images
            and total_bytes <= limits.max_dataset_bytes
        ):
            reported = {name for name, _ in problems}
            readable = [f for f in image_files + caption_files if f.name not in reported]
            for item, _data, problem in self._read_checked(readable):
                if problem is not None:
                    problems.append((item.name, problem))

        if problems or dataset_problems:
            _reject(where, sorted(problems), dataset_problems)
        return _Dataset(
            where=where,
            files=sorted(files, key=lambda f: f.name),
            summary=DatasetSummary(
                image_count=image_count,
                caption_count=len(caption_files),
                total_bytes=total_bytes,
            ),
        )

    def _list(self, bucket: str, folder: str, where: str) -> Iterable[dict[str, Any]]:
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=folder):
                yield from page.get("Contents", [])  # type: ignore[misc]
                _heartbeat()
        except ClientError as e:
            if _error_code(e) == "NoSuchBucket":
                raise ApplicationError(
                    f"bucket {bucket} does not exist (images expected under {where})",
                    [f"bucket {bucket} does not exist"],
                    type=INVALID_DATASET,
                    non_retryable=True,
                ) from None
            raise

    def _read_checked(
        self, files: list[_DatasetFile]
    ) -> Iterator[tuple[_DatasetFile, bytes, str | None]]:
        """Each file's bytes and what is wrong with them (None: nothing), in the given order.

        A few GETs (and image decodes) run at a time ahead of the file being handed out, up to
        `_READ_AHEAD_BYTES`: a file the trainer cannot read must fail the run before a GPU is
        rented, and the zip gets the very bytes that were checked (IfMatch: the object is
        still the one listed)."""

        def read(item: _DatasetFile) -> tuple[bytes, str | None]:
            data = self.s3.get_object(Bucket=item.bucket, Key=item.key, IfMatch=item.etag)[
                "Body"
            ].read()
            return data, _content_problem(item.name, data)

        with ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="dataset-read") as pool:
            ahead: deque[tuple[_DatasetFile, Future[tuple[bytes, str | None]]]] = deque()
            ahead_bytes = 0
            pending = iter(files)
            try:
                while True:
                    for item in pending:
                        ahead.append((item, submit(pool, read, item)))
                        ahead_bytes += item.size
                        if ahead_bytes >= _READ_AHEAD_BYTES:
                            break
                    if not ahead:
                        return
                    item, future = ahead.popleft()
                    data, problem = future.result()
                    ahead_bytes -= item.size
                    _heartbeat()  # decoding a large image takes a while; the SDK throttles these
                    yield item, data, problem
            finally:
                for _, future in ahead:
                    future.cancel()

    # ----------------------------------------------------------------------------------------
    # Zip
    # ----------------------------------------------------------------------------------------

    def _finished_zip(self, location: S3Location) -> ImagesZip | None:
        try:
            head = self.s3.head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as e:
            if _error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        metadata = head.get("Metadata", {})
        sha256 = metadata.get("sha256", "")
        count = metadata.get("image-count", "")
        if not (re.fullmatch(r"[0-9a-f]{64}", sha256) and count.isdigit()):
            return None  # left by an attempt that died before it finished: build it again
        return ImagesZip(
            location=location, sha256=sha256, bytes=head["ContentLength"], image_count=int(count)
        )

    def _abort_stale_uploads(self, location: S3Location) -> None:
        """Abort multipart uploads to this key left by attempts that died mid-way."""
        listing = self.s3.list_multipart_uploads(Bucket=location.bucket, Prefix=location.key)
        for upload in listing.get("Uploads", []):
            if upload.get("Key") == location.key:
                self.s3.abort_multipart_upload(
                    Bucket=location.bucket, Key=location.key, UploadId=upload["UploadId"]
                )

    def _stream_zip(self, dataset: _Dataset, upload: _MultipartUpload) -> bool:
        """S3 objects -> checked -> zip entries -> `upload`, completed; True when the zip went
        up in one request with its metadata (only a zip with it counts as finished), False
        when the caller must add it. Raises InvalidDataset, with every problem, if any file
        fails its check; the upload is aborted on any error."""
        problems: list[tuple[str, str]] = []
        try:
            # zipfile writes to a stream that cannot seek with data descriptors, so each entry
            # passes straight through; only the files read ahead and the parts' buffers are
            # held in memory.
            archive = zipfile.ZipFile(upload, mode="w", compression=zipfile.ZIP_STORED)
            for item, data, problem in self._read_checked(dataset.files):
                if problem is not None:
                    problems.append((item.name, problem))
                if problems:
                    continue  # this zip is lost: read on only to name every problem
                info = zipfile.ZipInfo(item.name, date_time=ZIP_DATE_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3  # unix, whatever system built it
                info.external_attr = 0o644 << 16
                info.file_size = len(data)
                with archive.open(info, mode="w") as entry:
                    entry.write(data)
                _heartbeat(upload.bytes)
            if problems:
                _reject(dataset.where, sorted(problems), [])
            archive.close()
            metadata = _zip_metadata(upload.sha256.hexdigest(), dataset.summary.image_count)
            return upload.complete(metadata)
        except BaseException:
            upload.abort()
            raise

    def _stamp_zip(self, location: S3Location, upload: _MultipartUpload, image_count: int) -> None:
        """Give a multipart zip its metadata (fixed before the sha256 was known): a copy onto
        itself. Only a zip with this metadata counts as finished."""
        size = upload.bytes
        self.s3.copy(
            {"Bucket": location.bucket, "Key": location.key},
            location.bucket,
            location.key,
            ExtraArgs={
                "Metadata": _zip_metadata(upload.sha256.hexdigest(), image_count),
                "MetadataDirective": "REPLACE",
                "ContentType": "application/zip",
            },
            Config=_COPY_CONFIG,
            Callback=lambda _copied: _heartbeat(size),  # a 5 GB copy takes a while
        )

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    def _presign(self, method: str, location: S3Location, ttl_s: int) -> str:
        return self.presigner.generate_presigned_url(
            method, Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=ttl_s
        )


class _MultipartUpload:
    """A write-only file object that uploads what it is given as multipart parts of
    `part_bytes` each (the last may be smaller); what never fills a part goes up as one object.
    The multipart upload is created with the first part. Up to `_PARTS_IN_FLIGHT` parts upload
    in the background while the next one fills: reading the dataset does not wait for S3 to
    take a part. Writes are copied into one buffer per part, and a buffer is reused once its
    part is up: the zip's memory is these few buffers, touched once."""

    def __init__(self, s3: S3Client, location: S3Location, part_bytes: int) -> None:
        self._s3 = s3
        self._location = location
        self._part_bytes = part_bytes
        self._filling: bytearray | None = None  # the part being written, `_filled` bytes so far
        self._filled = 0
        self._parts: list[dict[str, Any]] = []
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self._upload_id: str | None = None
        self._sender = ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix="zip-part")
        self._in_flight: deque[tuple[Future[dict[str, Any]], bytearray]] = deque()

    def write(self, data: bytes, /) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        rest = memoryview(data)
        while rest:
            if self._filling is None:
                self._filling, self._filled = self._free_buffer(), 0
            piece = rest[: self._part_bytes - self._filled]
            self._filling[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
            rest = rest[len(piece) :]
            if self._filled == self._part_bytes:
                self._upload_filling()
        return len(data)

    def flush(self) -> None:
        """Parts go out when full; zipfile calls this, there is nothing to do early."""

    def close(self) -> None:
        """`complete` or `abort` ends the upload, not zipfile."""

    def complete(self, metadata: dict[str, str]) -> bool:
        """Finish the object; True when it went up in one request, carrying `metadata` (a
        multipart object has none: the caller adds it)."""
        if self._upload_id is None:
            self._s3.put_object(
                Bucket=self._location.bucket,
                Key=self._location.key,
                Body=self._take_filling(),  # type: ignore[arg-type]  # a bytearray: see _send_part
                ContentType="application/zip",
                Metadata=metadata,
            )
            self._sender.shutdown()
            return True
        if self._filled:
            self._upload_filling()
        while self._in_flight:
            self._settle_oldest()
        self._s3.complete_multipart_upload(
            Bucket=self._location.bucket,
            Key=self._location.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
        )
        self._sender.shutdown()
        return False

    def abort(self) -> None:
        # Parts still uploading would land after the abort; the error that led here matters
        # more than theirs.
        for in_flight, _buffer in self._in_flight:
            with contextlib.suppress(Exception):
                in_flight.result()
        self._sender.shutdown()
        if self._upload_id is None:
            return
        try:
            self._s3.abort_multipart_upload(
                Bucket=self._location.bucket, Key=self._location.key, UploadId=self._upload_id
            )
        except Exception:
            # The original error matters more; a lifecycle rule cleans up what is left.
            log.warning("could not abort the multipart upload of %s", self._location.uri)

    def _free_buffer(self) -> bytearray:
        """A part's buffer: a new one until `_PARTS_IN_FLIGHT` parts are uploading, then the
        oldest one's, once that part is up."""
        if len(self._in_flight) < _PARTS_IN_FLIGHT:
            return bytearray(self._part_bytes)
        return self._settle_oldest()

    def _take_filling(self) -> bytearray:
        """The part being written, cut to what was written (in place: a smaller last part)."""
        part = self._filling if self._filling is not None else bytearray()
        del part[self._filled :]
        self._filling, self._filled = None, 0
        return part

    def _upload_filling(self) -> None:
        """Send the part being written, in the background."""
        if self._upload_id is None:
            self._upload_id = self._s3.create_multipart_upload(
                Bucket=self._location.bucket, Key=self._location.key, ContentType="application/zip"
            )["UploadId"]
        number = len(self._parts) + len(self._in_flight) + 1
        part = self._take_filling()
        sent = submit(self._sender, self._send_part, self._upload_id, number, part)
        self._in_flight.append((sent, part))
        _heartbeat(self.bytes)

    def _send_part(self, upload_id: str, number: int, part: bytearray) -> dict[str, Any]:
        answer = self._s3.upload_part(
            Bucket=self._location.bucket,
            Key=self._location.key,
            UploadId=upload_id,
            PartNumber=number,
            Body=part,  # type: ignore[arg-type]  # botocore takes a bytearray
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _settle_oldest(self) -> bytearray:
        """Wait for the oldest part in flight (its error, if any, is raised here); its buffer,
        free again."""
        sent, part = self._in_flight.popleft()
        self._parts.append(sent.result())
        return part


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def _zip_part_bytes(dataset: _Dataset) -> int:
    """`ZIP_PART_BYTES`, or the size that keeps the dataset's zip within S3's part limit."""
    zip_bytes = _ZIP_END_OVERHEAD + sum(
        f.size + _ZIP_ENTRY_OVERHEAD + 2 * len(f.name.encode()) for f in dataset.files
    )
    return max(ZIP_PART_BYTES, -(-zip_bytes // _MAX_PARTS))


def _zip_metadata(sha256: str, image_count: int) -> dict[str, str]:
    return {"sha256": sha256, "image-count": str(image_count)}


def _heartbeat(bytes_done: int | None = None) -> None:
    """Report progress (zip or hash bytes so far) when running as an activity."""
    if activity.in_activity():
        activity.heartbeat(*([] if bytes_done is None else [bytes_done]))


def run_prefix(run_id: str, execution: str = "") -> str:
    """`runs/<run_id>/<execution>`: each run's keys apart, even when a run id is reused."""
    if execution and not _RUN_ID.fullmatch(execution):
        raise ApplicationError(
            f"execution id {execution!r} is not valid", type=INVALID_REQUEST, non_retryable=True
        )
    return f"{_run_prefix(run_id)}/{execution}" if execution else _run_prefix(run_id)


def _training_for(training: TrainingConfig, model: ResolvedModel) -> TrainingConfig:
    """The run's settings with the model family's defaults filled in; a combination that does
    not hold (network_alpha above network_dim, say) is named field by field."""
    problems = training.family_problems(model.family)
    if swap := blocks_to_swap_problem(model.family, model.variant, training.blocks_to_swap):
        problems.append(swap)
    if problems:
        raise ApplicationError(
            f"the training settings do not work with {model.filename} ({model.base_model}): "
            + "; ".join(problems),
            problems,
            type=INVALID_TRAINING_CONFIG,
            non_retryable=True,
        )
    return training.for_family(model.family)


def _job_location(bucket: str, prefix: str, input: JobSpecInput) -> S3Location:
    # Runs from before per-execution keys wrote one job.json per run.
    name = f"job-{input.attempt}.json" if input.execution else "job.json"
    return S3Location(bucket=bucket, key=f"{prefix}/{name}")


def _run_prefix(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id):
        raise ApplicationError(
            f"run id {run_id!r} is not valid: use letters, digits, '_', '.' and '-' "
            "(at most 128, starting with a letter or digit)",
            type=INVALID_REQUEST,
            non_retryable=True,
        )
    return f"runs/{run_id}"


def epoch_prefix(run_id: str, execution: str, epoch: int) -> str:
    """`<run prefix>/epochs/<epoch, 4 digits>`: one saved epoch's LoRA, samples, training state
    and manifest (written last; an epoch without one never counts)."""
    return f"{run_prefix(run_id, execution)}/epochs/{epoch:04d}"


def run_log_location(bucket: str, prefix: str, attempt: int) -> S3Location:
    """Where a GPU attempt's runner uploads the run's log: `<run prefix>/logs/attempt-<n>.log`
    (`loratrain logs` reads every attempt's)."""
    return S3Location(bucket=bucket, key=f"{prefix}/logs/attempt-{attempt}.log")


def run_tensorboard_location(bucket: str, prefix: str, attempt: int) -> S3Location:
    """Where a GPU attempt's runner uploads its trainer's TensorBoard logs, a .tar.gz:
    `<run prefix>/tensorboard/attempt-<n>.tar.gz`, beside `logs/` rather than in it
    (`loratrain logs` prints every file there as text)."""
    return S3Location(bucket=bucket, key=f"{prefix}/tensorboard/attempt-{attempt}.tar.gz")


def _folder(prefix: str) -> str:
    """The prefix as a folder: 'images' covers images/a.png, not images2/a.png."""
    folder = prefix.lstrip("/")
    if folder and not folder.endswith("/"):
        folder += "/"
    return folder


def _suffix(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return not (
        "\\" in name
        or any(part in {"", ".", ".."} for part in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )


def _unsupported(suffix: str) -> str:
    if suffix in _KNOWN_UNSUPPORTED:
        return f"{_KNOWN_UNSUPPORTED[suffix]} is not a supported image type (use PNG, JPEG or WebP)"
    what = f"{suffix} files are" if suffix else "files without an extension are"
    return f"{what} not allowed (only .png, .jpg, .jpeg, .webp images and .txt captions)"


def _sniff(head: bytes) -> str | None:
    """The image type the first bytes announce, if any we know."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:6] in {b"GIF87a", b"GIF89a"}:
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in {b"II*\x00", b"MM\x00*"}:
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return None


def _content_problem(name: str, data: bytes) -> str | None:
    """What is wrong with a dataset file's bytes (a caption or an image), or None."""
    if _suffix(name) == _CAPTION_SUFFIX:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"caption is not UTF-8 text (byte {e.start}); save it as UTF-8"
        return None
    return image_problem(name, data)


def image_problem(name: str, data: bytes) -> str | None:
    """What is wrong with an image file for training, or None: its type by its first bytes must
    be the one its extension names, and it must decode (Pillow, as the trainers read it)."""
    named = _IMAGE_TYPES[_suffix(name)]
    problem = _image_problem(named, _sniff(data[:_MAGIC_BYTES]))
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # checksums and structure, to the end of the file
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (256, 256))  # JPEG: decode at a smaller scale, still every byte
            image.load()
    except Image.DecompressionBombError:
        return "the image has too many pixels to be decoded safely; resize it"
    except (OSError, SyntaxError, ValueError) as e:
        reason = "not recognised" if isinstance(e, UnidentifiedImageError) else str(e)
        return f"the {named} image cannot be decoded ({reason}); open and save it again"
    return None


def _image_problem(named: str, actual: str | None) -> str | None:
    if actual == named:
        return None
    if actual is None:
        return f"not a {named} image (its first bytes are not a {named} signature)"
    if actual in _IMAGE_TYPES.values():
        return f"the file is a {actual} image but its name says {named}; fix the extension"
    return (
        f"the file is a {actual} image, not {named}; {actual} is not supported "
        "(use PNG, JPEG or WebP)"
    )


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _reject(where: str, problems: list[tuple[str, str]], dataset_problems: list[str]) -> None:
    lines = [f"{name}: {problem}" for name, problem in problems] + dataset_problems
    if len(lines) == 1:
        message = lines[0]
    else:
        shown = "\n".join(f"- {line}" for line in lines[:_MESSAGE_PROBLEMS])
        more = len(lines) - _MESSAGE_PROBLEMS
        message = f"{len(lines)} problems with the images under {where}:\n{shown}" + (
            f"\n- ... and {more} more" if more > 0 else ""
        )
    raise ApplicationError(
        message, lines[:_DETAIL_PROBLEMS], type=INVALID_DATASET, non_retryable=True
    )


_OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _is_os_clutter(name: str) -> bool:
    """Files that file managers leave beside images (macOS, Windows): skipped, not errors."""
    parts = name.split("/")
    return parts[-1] in _OS_CLUTTER or parts[-1].startswith("._") or "__MACOSX" in parts[:-1]
