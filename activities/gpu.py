"""Allocate, watch and deallocate GPU instances through a provider."""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import activity

from workflows.models import GpuRequirements

from .providers.base import GpuProvider, Instance


class AllocateGpuInput(BaseModel):
    run_id: str
    attempt: int
    job_url: str = Field(repr=False)
    requirements: GpuRequirements


class InstanceRef(BaseModel):
    run_id: str
    provider: str
    instance_id: str


class GpuActivities:
    def __init__(self, provider: GpuProvider, settings) -> None:  # type: ignore[no-untyped-def]
        self.provider = provider
        self.settings = settings

    @activity.defn
    def allocate_gpu(self, input: AllocateGpuInput) -> Instance:
        raise NotImplementedError

    @activity.defn
    def get_gpu_instance(self, input: InstanceRef) -> Instance | None:
        raise NotImplementedError

    @activity.defn
    def deallocate_gpu(self, input: InstanceRef) -> bool:
        raise NotImplementedError
