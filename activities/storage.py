"""S3: validate the dataset, stream the images zip, write the job spec, verify the upload."""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import activity

from gpu_runner.protocol import RunnerLimits, TrainerName, TrainingConfig
from workflows.models import OutputLocation, S3Location, S3Prefix

from .civitai import ResolvedModel


class DatasetInput(BaseModel):
    run_id: str
    images: S3Prefix


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
    civitai_api_key: str | None = Field(default=None, repr=False)
    limits: RunnerLimits = RunnerLimits()


class JobSpecRef(BaseModel):
    location: S3Location
    job_url: str = Field(repr=False)
    output: S3Location


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


class StorageActivities:
    """Activities over one boto3 S3 client (sync: they run on the worker's thread pool)."""

    def __init__(self, s3_client, settings) -> None:  # type: ignore[no-untyped-def]
        self.s3 = s3_client
        self.settings = settings

    @activity.defn
    def validate_images(self, input: DatasetInput) -> DatasetSummary:
        raise NotImplementedError

    @activity.defn
    def build_images_zip(self, input: DatasetInput) -> ImagesZip:
        raise NotImplementedError

    @activity.defn
    def write_job_spec(self, input: JobSpecInput) -> JobSpecRef:
        raise NotImplementedError

    @activity.defn
    def verify_upload(self, input: VerifyUploadInput) -> VerifiedUpload:
        raise NotImplementedError
