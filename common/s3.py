"""The S3 client every process builds from the settings (worker, relay, client, CLI)."""

from __future__ import annotations

from typing import Any

from .settings import Settings


def s3_client(settings: Settings, endpoint_url: str | None = None) -> Any:
    """The S3 client; `endpoint_url` overrides the settings' own (for presigning)."""
    # Imported here: a CLI command that only asks Temporal a question skips boto3's start-up.
    import boto3
    from botocore.config import Config

    secret = settings.s3_secret_access_key
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(
            connect_timeout=settings.http_timeout_s,
            read_timeout=settings.http_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",
        ),
    )
