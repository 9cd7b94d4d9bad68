"""resolve_model against a fake Civitai over real HTTP, the local S3 server (SeaweedFS) and real
files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.civitai import ModelActivities, ResolvedModel, ResolveModelInput
from common.settings import Settings
from tests.fake_civitai import FakeCivitai, FakeFile, FakeVersion, checkpoint_bytes, model_bytes
from tests.http_support import serve_asgi

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KEY = "civitai-test-key"
Civitai = tuple[FakeCivitai, str]


@pytest.fixture
def civitai() -> Iterator[Civitai]:
    fake = FakeCivitai(api_key=KEY)
    with serve_asgi(fake.app) as base_url:
        yield fake, base_url


@pytest.fixture
def models(settings: Settings, s3: S3Client, civitai: Civitai) -> ModelActivities:
    _, base_url = civitai
    configured = settings.model_copy(
        update={"civitai_base_url": base_url, "civitai_api_key": SecretStr(KEY)}
    )
    return ModelActivities(s3, configured)


async def resolve(models: ModelActivities, model: str, key: str | None = None) -> ResolvedModel:
    return await models.resolve_model(
        ResolveModelInput(run_id="run-1", model=model, civitai_api_key=key)
    )


async def resolve_error(
    models: ModelActivities, model: str, key: str | None = None
) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await resolve(models, model, key)
    return caught.value


# -- Civitai --------------------------------------------------------------------------------------


async def test_civitai_sd15_version_resolves_to_its_primary_file(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, base_url = civitai
    file = fake.file(1001)

    resolved = await resolve(models, "civitai:1001")

    assert resolved.family == "sd15"
    assert resolved.base_model == "SD 1.5"
    assert resolved.filename == "fakeRealistic_v10.safetensors"
    assert resolved.sha256 == hashlib.sha256(file.content).hexdigest()
    assert resolved.bytes == len(file.content)  # exact, from the storage host; not sizeKB
    assert resolved.url == f"{base_url}/api/download/models/1001"
    assert resolved.needs_civitai_key
    # The metadata call carried the worker's key; the storage host never saw it.
    version_call = next(r for r in fake.requests if r[1] == "/api/v1/model-versions/1001")
    assert version_call[2]["authorization"] == f"Bearer {KEY}"
    file_calls = [r for r in fake.requests if r[1].startswith("/files/")]
    assert file_calls and all("authorization" not in r[2] for r in file_calls)


async def test_civitai_sdxl_picks_the_primary_safetensor_and_the_url_downloads_it(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    primary = fake.file(2002)

    resolved = await resolve(models, "civitai:2002")

    assert resolved.family == "sdxl"
    assert resolved.base_model == "SDXL 1.0"
    assert resolved.filename == "fakeXL_v10.safetensors"
    assert resolved.sha256 == primary.sha256
    # What the runner will do: GET with the key, follow the redirect, check the hash.
    async with httpx.AsyncClient(follow_redirects=True) as client:
        response = await client.get(resolved.url, headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == resolved.sha256


async def test_civitai_without_a_primary_model_file_prefers_safetensor(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    version = FakeVersion(
        id=5005,
        base_model="Pony",
        files=[
            FakeFile(name="notes.zip", content=b"zip", type="Training Data", primary=True),
            FakeFile(name="pony.ckpt", content=model_bytes("ckpt", 500), format="PickleTensor"),
            FakeFile(name="pony.safetensors", content=checkpoint_bytes("sdxl", label="st")),
        ],
    )
    fake.add_version(version)

    resolved = await resolve(models, "civitai:5005")

    assert resolved.filename == "pony.safetensors"
    assert resolved.family == "sdxl"
    assert resolved.sha256 == version.files[2].sha256
    assert resolved.url.endswith(
        "/api/download/models/5005?type=Model&format=SafeTensor&size=pruned&fp=fp16"
    )


async def test_unknown_civitai_version_is_model_not_found(models: ModelActivities) -> None:
    error = await resolve_error(models, "civitai:999999")

    assert error.type == "ModelNotFound"
    assert error.non_retryable
    assert error.message == "Civitai has no model version 999999"


async def test_wrong_civitai_key_is_unauthorized_before_any_gpu_is_rented(
    models: ModelActivities,
) -> None:
    error = await resolve_error(models, "civitai:1001", key="not-the-key")

    assert error.type == "CivitaiUnauthorized"
    assert error.non_retryable
    assert "Civitai refused the API key for Civitai model version 1001" in error.message
    assert "not-the-key" not in error.message


async def test_missing_civitai_key_says_how_to_provide_one(models: ModelActivities) -> None:
    models.settings = models.settings.model_copy(update={"civitai_api_key": None})

    error = await resolve_error(models, "civitai:1001")

    assert error.type == "CivitaiUnauthorized"
    assert "LORA_CIVITAI_API_KEY" in error.message


async def test_early_access_version_is_unauthorized_with_a_clear_message(
    models: ModelActivities,
) -> None:
    error = await resolve_error(models, "civitai:4004")

    assert error.type == "CivitaiUnauthorized"
    assert "early access" in error.message


async def test_flux_is_supported_with_its_components(models: ModelActivities) -> None:
    resolved = await resolve(models, "civitai:3003")

    assert (resolved.family, resolved.variant) == ("flux", "dev")
    assert [c.role for c in resolved.components] == ["clip_l", "t5xxl", "ae"]


async def test_base_model_built_on_an_untrained_architecture_is_refused(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    fake.add_version(
        FakeVersion(
            id=3113,
            base_model="AuraFlow",
            files=[FakeFile(name="aura.safetensors", content=checkpoint_bytes("auraflow"))],
        )
    )

    error = await resolve_error(models, "civitai:3113")

    assert error.type == "UnsupportedModel"
    assert error.non_retryable
    assert error.message.startswith(
        "civitai:3113 is an AuraFlow model, which loratrain does not train; supported: SD 1.x"
    )
    # Refused from Civitai's answer alone: no download was asked for.
    assert not [r for r in fake.requests if r[1].startswith("/api/download/")]


async def test_civitai_other_base_model_takes_the_family_from_the_header(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    fake.add_version(
        FakeVersion(
            id=3223,
            base_model="Other",
            files=[FakeFile(name="merge.safetensors", content=checkpoint_bytes("sdxl"))],
        )
    )

    resolved = await resolve(models, "civitai:3223")

    assert (resolved.family, resolved.base_model) == ("sdxl", "SDXL 1.0")


async def test_lora_version_is_not_a_base_model(models: ModelActivities, civitai: Civitai) -> None:
    fake, _ = civitai
    fake.add_version(
        FakeVersion(
            id=6006,
            base_model="SD 1.5",
            model_type="LORA",
            files=[FakeFile(name="style.safetensors", content=b"x" * 100)],
        )
    )

    error = await resolve_error(models, "civitai:6006")

    assert error.type == "UnsupportedModel"
    assert "is a LORA, not a checkpoint" in error.message


async def test_version_without_checkpoint_file_is_model_not_found(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    fake.add_version(
        FakeVersion(
            id=7007,
            base_model="SD 1.5",
            files=[FakeFile(name="diffusers.zip", content=b"PK", format="Diffusers")],
        )
    )

    error = await resolve_error(models, "civitai:7007")

    assert error.type == "ModelNotFound"
    assert "no .safetensors or .ckpt model file" in error.message
    assert "diffusers.zip" in error.message


@pytest.mark.parametrize(
    "reference", ["civitai:", "civitai:abc", "civitai:12x", "civitai:-5", "ftp://x/y.ckpt", "model"]
)
async def test_malformed_reference_is_rejected(models: ModelActivities, reference: str) -> None:
    error = await resolve_error(models, reference)

    assert error.type == "InvalidModelReference"
    assert error.non_retryable


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_civitai_outage_is_retryable(
    models: ModelActivities, civitai: Civitai, status: int
) -> None:
    fake, _ = civitai
    fake.fail_next("version", status, headers={"retry-after": "7"})

    error = await resolve_error(models, "civitai:1001")

    assert error.type == "CivitaiUnavailable"
    assert not error.non_retryable
    assert f"HTTP {status}" in error.message
    # The next attempt (what Temporal's retry does) succeeds.
    assert (await resolve(models, "civitai:1001")).family == "sd15"


async def test_civitai_download_outage_is_retryable(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, _ = civitai
    fake.fail_next("download", 502)

    error = await resolve_error(models, "civitai:1001")

    assert error.type == "CivitaiUnavailable"
    assert not error.non_retryable


async def test_civitai_unreachable_is_retryable(models: ModelActivities) -> None:
    models.settings = models.settings.model_copy(update={"civitai_base_url": "http://127.0.0.1:9"})

    error = await resolve_error(models, "civitai:1001")

    assert error.type == "CivitaiUnavailable"
    assert not error.non_retryable


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>Cloudflare says hi</html>", "not JSON"),
        ({"id": 8008, "files": []}, "baseModel is missing"),
        ({"id": 8008, "baseModel": "SD 1.5", "files": "nope"}, "files is not a list"),
        ([1, 2, 3], "not an object"),
    ],
)
async def test_malformed_civitai_answer_is_a_retryable_error_not_a_crash(
    models: ModelActivities, civitai: Civitai, body: object, problem: str
) -> None:
    fake, _ = civitai
    fake.raw_versions[8008] = body

    error = await resolve_error(models, "civitai:8008")

    assert error.type == "CivitaiBadResponse"
    assert not error.non_retryable
    assert problem in error.message


async def test_civitai_download_url_is_resolved_as_a_civitai_reference(
    models: ModelActivities, civitai: Civitai
) -> None:
    _, base_url = civitai

    resolved = await resolve(models, f"{base_url}/api/download/models/2002")

    assert resolved.family == "sdxl"
    assert resolved.needs_civitai_key


async def test_download_url_from_civitai_is_pinned_to_the_configured_host(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, base_url = civitai
    body = fake.version_json(fake.versions[1001], "https://evil.example")
    fake.raw_versions[1001] = body

    resolved = await resolve(models, "civitai:1001")

    assert resolved.url == f"{base_url}/api/download/models/1001"


# -- S3 -------------------------------------------------------------------------------------------


async def test_s3_model_resolves_to_a_presigned_url(
    models: ModelActivities, s3: S3Client, settings: Settings
) -> None:
    content = checkpoint_bytes("sdxl", label="s3-model", size=4096)
    s3.put_object(Bucket=settings.bucket, Key="models/myModelXL.safetensors", Body=content)

    resolved = await resolve(models, f"s3://{settings.bucket}/models/myModelXL.safetensors")

    assert resolved.filename == "myModelXL.safetensors"
    assert resolved.bytes == len(content)
    assert resolved.family == "sdxl"
    assert not resolved.needs_civitai_key
    async with httpx.AsyncClient() as client:
        response = await client.get(resolved.url)
    assert response.content == content


async def test_missing_s3_model_is_model_not_found(
    models: ModelActivities, settings: Settings
) -> None:
    error = await resolve_error(models, f"s3://{settings.bucket}/models/none.safetensors")

    assert error.type == "ModelNotFound"
    assert error.non_retryable
    assert "none.safetensors does not exist" in error.message


async def test_s3_reference_without_key_is_invalid(
    models: ModelActivities, settings: Settings
) -> None:
    error = await resolve_error(models, f"s3://{settings.bucket}/")

    assert error.type == "InvalidModelReference"


# -- local files ----------------------------------------------------------------------------------


async def test_local_path_resolves_to_a_file_url(models: ModelActivities, tmp_path: Path) -> None:
    path = tmp_path / "sd15_base.ckpt"
    path.write_bytes(b"weights" * 100)

    for reference in (str(path), path.as_uri()):
        resolved = await resolve(models, reference)

        assert resolved.url == path.resolve().as_uri()
        assert resolved.bytes == 700
        assert resolved.filename == "sd15_base.ckpt"
        assert resolved.family == "sd15"


async def test_file_url_fragment_names_the_base_model(
    models: ModelActivities, tmp_path: Path
) -> None:
    path = tmp_path / "base.safetensors"
    path.write_bytes(checkpoint_bytes("sdxl"))

    resolved = await resolve(models, f"{path.as_uri()}#base_model=SDXL%201.0")

    assert (resolved.base_model, resolved.family) == ("SDXL 1.0", "sdxl")


async def test_missing_local_file_is_model_not_found(
    models: ModelActivities, tmp_path: Path
) -> None:
    error = await resolve_error(models, str(tmp_path / "missing.safetensors"))

    assert error.type == "ModelNotFound"
    assert "does not exist" in error.message


async def test_local_directory_is_not_a_model(models: ModelActivities, tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()

    error = await resolve_error(models, str(tmp_path / "dir.safetensors"))

    assert error.type == "ModelNotFound"
    assert "is not a file" in error.message


async def test_local_path_needs_the_local_provider(models: ModelActivities, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"w")
    models.settings = models.settings.model_copy(update={"gpu_provider": "vast"})

    error = await resolve_error(models, str(path))

    assert error.type == "InvalidModelReference"
    assert "only with the local GPU provider" in error.message


# -- other HTTP hosts -----------------------------------------------------------------------------


async def test_https_url_with_a_bad_extension_is_invalid(models: ModelActivities) -> None:
    error = await resolve_error(
        models, "https://example.com/models/model.bin?X-Amz-Signature=s3cr3t"
    )

    assert error.type == "InvalidModelReference"
    assert ".safetensors or .ckpt" in error.message
    assert "s3cr3t" not in error.message  # a presigned URL's query is a credential


async def test_plain_http_is_refused_outside_localhost(models: ModelActivities) -> None:
    error = await resolve_error(models, "http://example.com/models/model.safetensors")

    assert error.type == "InvalidModelReference"
    assert "use https" in error.message


async def test_http_url_size_comes_from_the_server(
    models: ModelActivities, civitai: Civitai
) -> None:
    fake, base_url = civitai
    # The fake's signed storage URL is a plain file URL without Civitai's API path.
    async with httpx.AsyncClient() as client:
        redirect = await client.get(
            f"{base_url}/api/download/models/1001", headers={"authorization": f"Bearer {KEY}"}
        )
    location = redirect.headers["location"]

    resolved = await resolve(models, location)

    assert resolved.bytes == len(fake.file(1001).content)
    assert resolved.filename == "fakeRealistic_v10.safetensors"
    assert resolved.family == "sd15"
    assert not resolved.needs_civitai_key


async def test_http_url_that_is_missing_is_model_not_found(
    models: ModelActivities, civitai: Civitai
) -> None:
    _, base_url = civitai

    error = await resolve_error(models, f"{base_url}/files/1/none.safetensors")

    # The fake's storage answers 403 for unsigned URLs, like a bucket does.
    assert error.type == "ModelAccessDenied"


# -- the fake's download path, which the GPU runner's download tests rely on ----------------------


async def test_fake_download_needs_the_key_and_serves_ranges(civitai: Civitai) -> None:
    fake, base_url = civitai
    content = fake.file(1001).content
    total = len(content)
    async with httpx.AsyncClient() as client:
        anonymous = await client.get(f"{base_url}/api/download/models/1001")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "Unauthorized"

        redirect = await client.get(
            f"{base_url}/api/download/models/1001?token={KEY}", follow_redirects=False
        )
        assert redirect.status_code == 307
        url = redirect.headers["location"]

        middle = await client.get(url, headers={"range": "bytes=100-199"})
        assert middle.status_code == 206
        assert middle.headers["content-range"] == f"bytes 100-199/{total}"
        assert middle.content == content[100:200]

        tail = await client.get(url, headers={"range": "bytes=-10"})
        assert tail.content == content[-10:]

        beyond = await client.get(url, headers={"range": f"bytes={total}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{total}"

        forged = await client.get(url.replace("sig=", "sig=x"))
        assert forged.status_code == 403


async def test_fake_drops_the_connection_once_and_a_range_request_resumes(civitai: Civitai) -> None:
    fake, base_url = civitai
    content = fake.file(2002).content
    fake.drop_after_bytes = 70_000
    received = bytearray()
    async with httpx.AsyncClient(follow_redirects=True) as client:
        headers = {"authorization": f"Bearer {KEY}"}
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "GET", f"{base_url}/api/download/models/2002", headers=headers
            ) as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
        assert len(received) == 70_000

        resumed = await client.get(
            f"{base_url}/api/download/models/2002",
            headers={**headers, "range": f"bytes={len(received)}-"},
        )
    assert resumed.status_code == 206
    received += resumed.content
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(content).hexdigest()
