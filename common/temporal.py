"""The Temporal client every process connects with: the project's data converter included."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.service import TLSConfig

from .converter import data_converter
from .settings import Settings, read_pem


async def connect_client(settings: Settings, connect_timeout: timedelta | None = None) -> Client:
    """A Temporal client with the project's data converter (pydantic + encryption), over TLS
    and with the API key or client certificate where the settings give them.

    Raises ValueError, naming the setting and the file, when a TLS file cannot be read.
    """
    api_key = settings.temporal_api_key
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=api_key.get_secret_value() if api_key else None,
        tls=tls_config(settings),
        connect_timeout=connect_timeout,
        data_converter=data_converter(settings),
    )


def tls_config(settings: Settings) -> TLSConfig | bool:
    """The TLS settings as the SDK takes them; False (plain gRPC) when none is set."""
    tls_on = settings.temporal_tls or any(
        value is not None
        for value in (
            settings.temporal_api_key,
            settings.temporal_tls_cert_path,
            settings.temporal_tls_key_path,
            settings.temporal_tls_ca_path,
            settings.temporal_tls_server_name,
        )
    )
    if not tls_on:
        return False
    return TLSConfig(
        server_root_ca_cert=_pem("LORA_TEMPORAL_TLS_CA_PATH", settings.temporal_tls_ca_path),
        domain=settings.temporal_tls_server_name,
        client_cert=_pem("LORA_TEMPORAL_TLS_CERT_PATH", settings.temporal_tls_cert_path),
        client_private_key=_pem("LORA_TEMPORAL_TLS_KEY_PATH", settings.temporal_tls_key_path),
    )


def _pem(variable: str, path: Path | None) -> bytes | None:
    # Settings check these files when they are loaded; settings built otherwise (model_copy)
    # or a file gone since meet the same one line here.
    if path is None:
        return None
    try:
        return read_pem(path)
    except ValueError as e:
        raise ValueError(f"{variable}: {e}") from None
