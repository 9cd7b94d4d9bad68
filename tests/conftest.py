"""Session fixtures for the real local servers: Temporal (dev + time-skipping) and S3 (SeaweedFS).

Every test runs with LORA_STATE_DIR pointing at a temporary directory, so no test reads (or
writes) the state of the user's own `loratrain dev`.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import SecretStr
from temporalio.testing import WorkflowEnvironment

from common.settings import STATE_DIR_VARIABLE, Settings
from devstack.stack import local_s3_server

from .workflow_support import (
    SHORT_DEADLINES,
    SLEEPING_RUNNER,
    dev_server,
    local_model,
    make_request,
    put_dataset,
    time_skipping_server,
)

# Fixed test-only keys, so histories recorded by the integration tests replay in later runs.
TEST_CODEC_KEY = "bG9yYXRyYWluLXRlc3QtY29kZWMta2V5LTMyLWJ5dGU="
TEST_MASTER_SECRET = "test-master-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def isolated_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """LORA_STATE_DIR for the whole session (subprocesses inherit it): never the user's own."""
    state = tmp_path_factory.mktemp("user-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STATE_DIR_VARIABLE, str(state))
        yield state


# The local S3 server's one identity; it checks every signature against these.
S3_ACCESS_KEY_ID = "test-access-key"
S3_SECRET_ACCESS_KEY = "test-secret-key"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SeaweedFS (`weed mini`) over real HTTP, every port it opens free and loopback-only.

    Its log is `s3.log` next to its data in the session's temporary directory.
    """
    data = tmp_path_factory.mktemp("local-s3") / "data"
    with local_s3_server(
        data,
        access_key_id=S3_ACCESS_KEY_ID,
        secret_access_key=S3_SECRET_ACCESS_KEY,
        bucket="loratrain-test",
        log_path=data.parent / "s3.log",
        # Its data is thrown away: no need to wait for a graceful stop.
        stop_grace_s=0,
    ) as url:
        yield url


@pytest.fixture(scope="session")
def base_settings(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id=S3_ACCESS_KEY_ID,
        s3_secret_access_key=SecretStr(S3_SECRET_ACCESS_KEY),
        bucket="loratrain-test",
        codec_key=SecretStr(TEST_CODEC_KEY),
        webhook_master_secret=SecretStr(TEST_MASTER_SECRET),
        civitai_api_key=None,
        state_dir=tmp_path_factory.mktemp("state"),
        # The tests' webhook receivers listen on loopback over http, as in the embedded stack.
        webhook_allow_http=True,
        webhook_allow_private_addresses=True,
        # Workflow tests signal runs directly, with no relay; tests with a relay turn it on.
        relay_health_check=False,
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


# One time-skipping server per test module: its clock is shared by everything on it, and a
# run some test leaves with work pending stops it skipping; that must not hang other modules.
@pytest.fixture(scope="module")
async def time_skipping_env(base_settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_server(base_settings) as env:
        yield env


@pytest.fixture(scope="session")
async def dev_env(base_settings: Settings) -> AsyncIterator[WorkflowEnvironment]:
    async with dev_server(base_settings) as env:
        yield env


@pytest.fixture
def run_settings(settings: Settings) -> Settings:
    """Settings whose local GPUs run a sleeping stand-in: the test plays the runner's events."""
    return settings.model_copy(update={"local_runner_command": SLEEPING_RUNNER})


@pytest.fixture
def request_factory(s3: Any, run_settings: Settings, tmp_path: Path) -> Callable[..., Any]:
    """Requests for a small dataset in the test's bucket and a local model, with short
    deadlines unless overridden."""
    images = put_dataset(s3, run_settings.bucket, "uploads/cats/")
    model = local_model(tmp_path)

    def make(**overrides: Any) -> Any:
        overrides.setdefault("deadlines", SHORT_DEADLINES)
        return make_request(images, model, **overrides)

    return make
