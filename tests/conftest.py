"""Session fixtures for the real local servers: Temporal (dev + time-skipping) and S3 (moto)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from pydantic import SecretStr
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from worker.converter import data_converter
from worker.settings import SEARCH_ATTRIBUTE, Settings

# Fixed test-only keys, so histories recorded by the integration tests replay in later runs.
TEST_CODEC_KEY = "bG9yYXRyYWluLXRlc3QtY29kZWMta2V5LTMyLWJ5dGU="
TEST_MASTER_SECRET = "test-master-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP on a free loopback port."""
    port = free_port()
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def base_settings(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id="test",
        s3_secret_access_key=SecretStr("test"),
        bucket="loratrain-test",
        codec_key=SecretStr(TEST_CODEC_KEY),
        webhook_master_secret=SecretStr(TEST_MASTER_SECRET),
        civitai_api_key=None,
        state_dir=tmp_path_factory.mktemp("state"),
    )


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path) -> Settings:
    """Per-test settings: own bucket, own task queue, own state dir."""
    bucket = f"lt-{uuid.uuid4().hex[:12]}"
    s3 = s3_client_for(base_settings)
    s3.create_bucket(Bucket=bucket)
    return base_settings.model_copy(
        update={
            "bucket": bucket,
            "task_queue": f"tq-{uuid.uuid4()}",
            "state_dir": tmp_path / "state",
        }
    )


def s3_client_for(settings: Settings):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=(
            settings.s3_secret_access_key.get_secret_value()
            if settings.s3_secret_access_key
            else None
        ),
    )


@pytest.fixture
def s3(settings: Settings):  # type: ignore[no-untyped-def]
    return s3_client_for(settings)


@pytest.fixture(scope="session")
async def time_skipping_env(base_settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=shutil.which("temporal-test-server")
        or str(Path(sys.executable).parent / "temporal-test-server"),
        data_converter=data_converter(base_settings),
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={SEARCH_ATTRIBUTE: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env(base_settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=shutil.which("temporal")
        or str(Path(sys.executable).parent / "temporal"),
        search_attributes=[SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE)],
        data_converter=data_converter(base_settings),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.enableUpdateWorkflowExecution=true",
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()
