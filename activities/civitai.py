"""Resolve a model reference (civitai:<versionId>, https URL, s3://bucket/key, local path)."""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import activity

from gpu_runner.protocol import BaseModelFamily


class ResolveModelInput(BaseModel):
    run_id: str
    model: str
    civitai_api_key: str | None = Field(default=None, repr=False)


class ResolvedModel(BaseModel):
    url: str = Field(repr=False)
    filename: str
    sha256: str | None = None
    bytes: int | None = None
    base_model: str
    family: BaseModelFamily
    needs_civitai_key: bool = False


class ModelActivities:
    def __init__(self, s3_client, settings) -> None:  # type: ignore[no-untyped-def]
        self.s3 = s3_client
        self.settings = settings

    @activity.defn
    async def resolve_model(self, input: ResolveModelInput) -> ResolvedModel:
        raise NotImplementedError
