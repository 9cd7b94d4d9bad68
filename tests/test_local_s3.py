"""The local S3 server (SeaweedFS) behaves like real S3 where moto did not: it checks presigned
URLs' signatures and expiry and the checksums it is given, and keeps its data across restarts."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from botocore.exceptions import ClientError

from common.s3 import s3_client
from common.settings import Settings
from devstack.stack import free_local_s3_ports, local_s3_server

from .conftest import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, s3_client_for


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
def signer(settings: Settings) -> Any:
    """The client the worker presigns with (SigV4), as StorageActivities uses it."""
    return s3_client(settings)


@pytest.fixture
def stored(s3: Any, settings: Settings) -> str:
    s3.put_object(Bucket=settings.bucket, Key="runs/r1/model.safetensors", Body=b"weights")
    return "runs/r1/model.safetensors"


def test_a_presigned_get_works_as_signed(
    s3: Any, signer: Any, settings: Settings, stored: str
) -> None:
    url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": stored}, ExpiresIn=60
    )
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"weights"


def test_a_tampered_presigned_url_is_refused(
    s3: Any, signer: Any, settings: Settings, stored: str
) -> None:
    s3.put_object(Bucket=settings.bucket, Key="runs/r2/model.safetensors", Body=b"other run")
    url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": stored}, ExpiresIn=60
    )

    another_key = url.replace("runs/r1/", "runs/r2/")
    longer = with_query(url, **{"X-Amz-Expires": "604800"})
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    forged = with_query(url, **{"X-Amz-Signature": signature[::-1]})

    for tampered in (another_key, longer, forged):
        answer = httpx.get(tampered, timeout=10)
        assert answer.status_code == 403, tampered
        assert b"SignatureDoesNotMatch" in answer.content
        assert b"other run" not in answer.content


def test_expired_presigned_urls_are_refused(
    s3: Any, signer: Any, settings: Settings, stored: str
) -> None:
    """A GET and a PUT signed for one second, used after two: refused, and nothing uploaded."""
    get = signer.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": stored}, ExpiresIn=1
    )
    put = signer.generate_presigned_url(
        "put_object", Params={"Bucket": settings.bucket, "Key": "late.bin"}, ExpiresIn=1
    )
    time.sleep(2.1)

    answer = httpx.get(get, timeout=10)
    assert answer.status_code == 403
    assert b"Request has expired" in answer.content
    assert httpx.put(put, content=b"too late", timeout=10).status_code == 403
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=settings.bucket, Key="late.bin")
    assert missing.value.response["Error"]["Code"] == "404"


def test_a_wrong_checksum_is_refused(s3: Any, settings: Settings) -> None:
    with pytest.raises(ClientError) as refused:
        s3.put_object(
            Bucket=settings.bucket,
            Key="model.safetensors",
            Body=b"what was sent",
            ChecksumSHA256=sha256_b64(b"what was meant"),
        )
    assert refused.value.response["Error"]["Code"] == "BadDigest"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=settings.bucket, Key="model.safetensors")

    s3.put_object(
        Bucket=settings.bucket,
        Key="model.safetensors",
        Body=b"what was sent",
        ChecksumSHA256=sha256_b64(b"what was sent"),
    )
    head = s3.head_object(Bucket=settings.bucket, Key="model.safetensors", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha256_b64(b"what was sent")


def test_a_wrong_secret_is_refused(settings: Settings) -> None:
    from pydantic import SecretStr

    wrong = s3_client_for(settings.model_copy(update={"s3_secret_access_key": SecretStr("nope")}))
    with pytest.raises(ClientError) as refused:
        wrong.list_objects_v2(Bucket=settings.bucket)
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


@pytest.mark.parametrize("stop_grace_s", [10.0, 0.0], ids=["stopped", "killed"])
def test_data_survives_a_restart_of_the_server(tmp_path: Path, stop_grace_s: float) -> None:
    """Stopped (SIGTERM) or killed (SIGKILL, as when it crashes): what it stored is there after."""
    data_dir = tmp_path / "s3"
    ports = free_local_s3_ports()
    options: dict[str, Any] = {
        "access_key_id": S3_ACCESS_KEY_ID,
        "secret_access_key": S3_SECRET_ACCESS_KEY,
        "bucket": "kept",
        "ports": ports,
        "stop_grace_s": stop_grace_s,
    }
    settings = Settings(
        s3_access_key_id=S3_ACCESS_KEY_ID,
        s3_secret_access_key=S3_SECRET_ACCESS_KEY,  # type: ignore[arg-type]
        state_dir=tmp_path,
    )

    with local_s3_server(data_dir, **options) as url:
        s3 = s3_client_for(settings.model_copy(update={"s3_endpoint_url": url}))
        s3.put_object(Bucket="kept", Key="runs/r1/model.safetensors", Body=b"trained weights")

    with local_s3_server(data_dir, **options) as url:
        s3 = s3_client_for(settings.model_copy(update={"s3_endpoint_url": url}))
        body = s3.get_object(Bucket="kept", Key="runs/r1/model.safetensors")["Body"].read()
    assert body == b"trained weights"
