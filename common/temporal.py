"""The Temporal client every process connects with: the project's data converter included."""

from __future__ import annotations

from temporalio.client import Client

from .converter import data_converter
from .settings import Settings


async def connect_client(settings: Settings) -> Client:
    """A Temporal client with the project's data converter (pydantic + encryption)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
