"""resolve_model's model sources and the family check at intake: hf: references against a fake
Hugging Face Hub over real HTTP, Civitai multi-file versions against the fake Civitai, the local S3
server, and real local files, each a tiny safetensors file in its family's real layout."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.civitai import (
    DEFAULT_COMPONENTS,
    ModelActivities,
    ResolvedModel,
    ResolveModelInput,
    check_local_model,
)
from activities.storage import ImagesZip, JobSpecInput, StorageActivities
from common.settings import Settings
from gpu_runner.protocol import JobSpec, TrainingConfig
from tests.fake_civitai import FakeCivitai, checkpoint_bytes, flux_version, pony_v7_version
from tests.fake_hf import FakeHub
from tests.http_support import serve_asgi
from workflows.models import OutputLocation, S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HF_TOKEN = "hf_secret_token_for_tests"
CIVITAI_KEY = "civitai-key-for-tests"
Served = tuple[Any, str]


def _populate_defaults(hub: FakeHub) -> None:
    """Every family default in DEFAULT_COMPONENTS, at its real path, in its real layout."""
    for family, roles in DEFAULT_COMPONENTS.items():
        for role, reference in roles.items():
            repo_and_path = reference.removeprefix("hf:")
            owner, name, path = repo_and_path.split("/", 2)
            hub.add_file(
                f"{owner}/{name}",
                path,
                checkpoint_bytes(role, label=f"default-{family}-{role}"),
                gated=owner == "stabilityai",
            )


@pytest.fixture
def hub() -> Iterator[Served]:
    fake = FakeHub(token=HF_TOKEN)
    _populate_defaults(fake)
    with serve_asgi(fake.app) as base_url:
        yield fake, base_url


@pytest.fixture
def civitai() -> Iterator[Served]:
    fake = FakeCivitai(api_key=CIVITAI_KEY, versions=[flux_version(3003), pony_v7_version(9009)])
    with serve_asgi(fake.app) as base_url:
        yield fake, base_url


@pytest.fixture
def models(settings: Settings, s3: S3Client, hub: Served, civitai: Served) -> ModelActivities:
    configured = settings.model_copy(
        update={
            "hf_base_url": hub[1],
            "hf_token": SecretStr(HF_TOKEN),
            "civitai_base_url": civitai[1],
            "civitai_api_key": SecretStr(CIVITAI_KEY),
        }
    )
    return ModelActivities(s3, configured)


async def resolve(models: ModelActivities, model: str, **files: str) -> ResolvedModel:
    return await models.resolve_model(
        ResolveModelInput(run_id="run-1", model=model, model_files=files)  # type: ignore[arg-type]
    )


async def resolve_error(models: ModelActivities, model: str, **files: str) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await resolve(models, model, **files)
    return caught.value


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# -- the family comes from the header ------------------------------------------------------------


async def test_sdxl_file_with_a_name_that_says_nothing_resolves_as_sdxl(
    models: ModelActivities, tmp_path: Path
) -> None:
    path = tmp_path / "random-base.safetensors"
    path.write_bytes(checkpoint_bytes("sdxl"))

    resolved = await resolve(models, str(path))

    assert (resolved.family, resolved.base_model) == ("sdxl", "SDXL 1.0")
    assert resolved.components == []  # SDXL's checkpoint holds its text encoders and VAE


async def test_sdxl_file_hinted_as_sd15_is_refused_with_one_line(
    models: ModelActivities, tmp_path: Path
) -> None:
    path = tmp_path / "random-base.safetensors"
    path.write_bytes(checkpoint_bytes("sdxl"))

    error = await resolve_error(models, f"{path.as_uri()}#base_model=SD%201.5")

    assert error.type == "ModelFamilyMismatch"
    assert error.non_retryable
    assert error.message == (
        "random-base.safetensors is an SDXL checkpoint, not SD 1.x: set the request's base "
        "model to SDXL or give an SD 1.x checkpoint"
    )
    assert "\n" not in error.message


async def test_sd2_v_parameterization_comes_from_the_header(
    models: ModelActivities, tmp_path: Path
) -> None:
    path = tmp_path / "base.safetensors"
    path.write_bytes(checkpoint_bytes("sd2", metadata={"modelspec.prediction_type": "v"}))

    resolved = await resolve(models, str(path))

    assert (resolved.family, resolved.v_parameterization) == ("sd2", True)


async def test_a_file_that_is_not_safetensors_is_one_clear_line(
    models: ModelActivities, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<html><body>Please log in</body></html>" + bytes(64))

    error = await resolve_error(models, str(path))

    assert error.type == "InvalidModelFile"
    assert error.non_retryable
    assert error.message == (
        "model.safetensors: not a safetensors file: it starts like an HTML or XML page (a login "
        "or error page?); the model must be a .safetensors file (or a .ckpt)"
    )


async def test_ckpt_keeps_the_name_based_guess(models: ModelActivities, tmp_path: Path) -> None:
    path = tmp_path / "someModelXL.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(100))

    resolved = await resolve(models, str(path))

    assert resolved.family == "sdxl"


async def test_s3_checkpoint_header_is_read_and_its_stored_sha256_kept(
    models: ModelActivities, s3: S3Client, settings: Settings
) -> None:
    content = checkpoint_bytes("sd15", size=5000)
    s3.put_object(
        Bucket=settings.bucket,
        Key="models/anything.safetensors",
        Body=content,
        Metadata={"sha256": sha(content)},
    )

    resolved = await resolve(models, f"s3://{settings.bucket}/models/anything.safetensors")

    assert resolved.family == "sd15"
    assert (resolved.bytes, resolved.sha256) == (len(content), sha(content))


def test_check_local_model_is_the_same_check_for_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "mix.safetensors"
    path.write_bytes(checkpoint_bytes("flux-schnell"))

    detected = check_local_model(path, None)
    assert detected is not None
    assert (detected.family, detected.variant) == ("flux", "schnell")

    with pytest.raises(ApplicationError) as caught:
        check_local_model(path, "SDXL 1.0")
    assert caught.value.type == "ModelFamilyMismatch"
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"PK\x03\x04")
    assert check_local_model(pickle, None) is None


# -- Hugging Face --------------------------------------------------------------------------------


async def test_flux_dev_from_hf_gets_the_three_default_components(
    models: ModelActivities, hub: Served
) -> None:
    fake, base_url = hub
    content = checkpoint_bytes("flux-dev", size=20_000)
    reference = fake.add_file(
        "black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", content, gated=True
    )

    resolved = await resolve(models, reference)

    assert (resolved.family, resolved.variant, resolved.base_model) == ("flux", "dev", "Flux.1 D")
    assert (resolved.sha256, resolved.bytes) == (sha(content), len(content))
    assert (
        resolved.url
        == f"{base_url}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"
    )
    assert resolved.needs_hf_token  # gated: the job must carry the token
    by_role = {c.role: c for c in resolved.components}
    assert list(by_role) == ["clip_l", "t5xxl", "ae"]
    for role, component in by_role.items():
        expected = checkpoint_bytes(role, label=f"default-flux-{role}")
        assert (component.sha256, component.bytes) == (sha(expected), len(expected))
        assert not component.needs_hf_token  # public repos
    assert (
        by_role["ae"].url
        == f"{base_url}/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors"
    )
    assert by_role["t5xxl"].filename == "t5xxl_fp16.safetensors"


async def test_gated_hf_repo_without_a_token_is_one_clear_line(
    models: ModelActivities, hub: Served
) -> None:
    fake, _ = hub
    reference = fake.add_file(
        "black-forest-labs/FLUX.1-dev",
        "flux1-dev.safetensors",
        checkpoint_bytes("flux-dev"),
        gated=True,
    )
    models.settings = models.settings.model_copy(update={"hf_token": None})

    error = await resolve_error(models, reference)

    assert error.type == "HuggingFaceUnauthorized"
    assert error.non_retryable
    assert "black-forest-labs/FLUX.1-dev is gated" in error.message
    assert "LORA_HF_TOKEN" in error.message


async def test_gated_hf_repo_the_token_may_not_read_names_the_repo(
    models: ModelActivities, hub: Served
) -> None:
    fake, _ = hub
    reference = fake.add_file("org/gated", "m.safetensors", checkpoint_bytes("sdxl"), gated=True)
    fake.denied.add("org/gated")

    error = await resolve_error(models, reference)

    assert error.type == "HuggingFaceUnauthorized"
    assert "refused LORA_HF_TOKEN for the gated repo org/gated" in error.message
    assert HF_TOKEN not in error.message


async def test_missing_hf_file_names_the_file_and_revision(
    models: ModelActivities, hub: Served
) -> None:
    fake, _ = hub
    fake.add_file("org/models", "a.safetensors", checkpoint_bytes("sd15"))

    missing_file = await resolve_error(models, "hf:org/models/dir/b.safetensors")
    missing_revision = await resolve_error(models, "hf:org/models@v2/a.safetensors")

    assert missing_file.type == missing_revision.type == "ModelNotFound"
    assert missing_file.message == (
        "hf:org/models/dir/b.safetensors: org/models has no file dir/b.safetensors at revision "
        "'main'"
    )
    assert "has no revision 'v2'" in missing_revision.message


async def test_sd35_defaults_are_gated_and_need_the_token(
    models: ModelActivities, hub: Served
) -> None:
    fake, _ = hub
    reference = fake.add_file(
        "someone/sd35", "sd3.5_medium.safetensors", checkpoint_bytes("sd3-medium", holds=["clip_l"])
    )

    resolved = await resolve(models, reference)

    assert (resolved.family, resolved.variant) == ("sd3", "medium")
    assert not resolved.needs_hf_token
    assert [c.role for c in resolved.components] == ["clip_g", "t5xxl"]  # it holds clip_l
    assert all(c.needs_hf_token for c in resolved.components)

    models.settings = models.settings.model_copy(update={"hf_token": None})
    error = await resolve_error(models, reference)
    assert error.type == "HuggingFaceUnauthorized"
    assert "does not hold its clip_g file" in error.message
    assert "model_files.clip_g" in error.message


# -- components ----------------------------------------------------------------------------------


async def test_given_t5xxl_that_is_a_clip_l_is_refused_naming_the_role(
    models: ModelActivities, hub: Served, tmp_path: Path
) -> None:
    fake, _ = hub
    flux = tmp_path / "flux-dev.safetensors"
    flux.write_bytes(checkpoint_bytes("flux-dev"))
    wrong = fake.add_file("me/encoders", "t5.safetensors", checkpoint_bytes("clip_l"))

    error = await resolve_error(models, str(flux), t5xxl=wrong)

    assert error.type == "ModelComponentMismatch"
    assert error.non_retryable
    assert error.message == (
        "hf:me/encoders/t5.safetensors was given as model_files.t5xxl but its header shows a "
        "clip_l file; name a t5xxl file there"
    )


async def test_given_components_in_any_scheme_replace_the_defaults(
    models: ModelActivities, s3: S3Client, settings: Settings, tmp_path: Path
) -> None:
    flux = tmp_path / "flux.safetensors"
    flux.write_bytes(checkpoint_bytes("flux-schnell", holds=["clip_l"]))
    t5 = checkpoint_bytes("t5xxl", label="mine")
    s3.put_object(Bucket=settings.bucket, Key="enc/t5.safetensors", Body=t5)
    ae = tmp_path / "my-ae.safetensors"
    ae.write_bytes(checkpoint_bytes("ae", label="my-ae"))

    resolved = await resolve(
        models, str(flux), t5xxl=f"s3://{settings.bucket}/enc/t5.safetensors", ae=str(ae)
    )

    assert resolved.variant == "schnell"
    by_role = {c.role: c for c in resolved.components}
    # Flux's script loads clip_l only from a file of its own, though the checkpoint holds it.
    assert list(by_role) == ["clip_l", "t5xxl", "ae"]
    assert by_role["clip_l"].filename == "clip_l.safetensors"  # the default
    assert by_role["t5xxl"].bytes == len(t5)
    assert by_role["ae"].url == ae.resolve().as_uri()


async def test_incomplete_file_set_names_the_missing_roles_and_model_files(
    models: ModelActivities, tmp_path: Path
) -> None:
    flux = tmp_path / "flux.safetensors"
    flux.write_bytes(checkpoint_bytes("flux-dev"))
    models.default_components = {}

    error = await resolve_error(models, str(flux))

    assert error.type == "ModelFilesIncomplete"
    assert error.message.startswith(
        "flux.safetensors is a flux checkpoint without clip_l, t5xxl, ae: give them in the "
        "request's model_files"
    )


# -- Civitai -------------------------------------------------------------------------------------


async def test_civitai_pony_v7_is_refused_naming_auraflow(models: ModelActivities) -> None:
    error = await resolve_error(models, "civitai:9009")

    assert error.type == "UnsupportedModel"
    assert error.non_retryable
    assert error.message == (
        "civitai:9009 is a Pony V7 model, built on AuraFlow, which loratrain does not train; "
        "supported: SD 1.x, SD 2.x, SDXL (Pony, Illustrious, NoobAI), Flux.1, SD 3.5"
    )


async def test_civitai_flux_version_fills_its_components_from_its_own_files(
    models: ModelActivities, civitai: Served, hub: Served
) -> None:
    fake, base_url = civitai
    version = fake.versions[3003]

    resolved = await resolve(models, "civitai:3003")

    assert (resolved.family, resolved.variant) == ("flux", "dev")
    assert resolved.sha256 == version.files[0].sha256
    by_role = {c.role: c for c in resolved.components}
    assert by_role["ae"].sha256 == version.files[1].sha256
    assert by_role["clip_l"].sha256 == version.files[2].sha256
    assert by_role["t5xxl"].sha256 == version.files[3].sha256
    assert by_role["ae"].url.startswith(f"{base_url}/api/download/models/3003?type=VAE")
    assert all(c.needs_civitai_key for c in resolved.components)
    assert not hub[0].requests  # nothing came from the defaults
    # The key never went to the storage host the header was read from.
    storage = [r for r in fake.requests if r[1].startswith("/files/")]
    assert storage and all("authorization" not in r[2] for r in storage)


async def test_civitai_sdxl_label_on_an_sd15_upload_is_refused(
    models: ModelActivities, civitai: Served
) -> None:
    from tests.fake_civitai import FakeFile, FakeVersion

    fake, _ = civitai
    fake.add_version(
        FakeVersion(
            id=5150,
            base_model="SDXL 1.0",
            files=[FakeFile(name="mislabeled.safetensors", content=checkpoint_bytes("sd15"))],
        )
    )

    error = await resolve_error(models, "civitai:5150")

    assert error.type == "ModelFamilyMismatch"
    assert error.message.startswith("civitai:5150 is an SD 1.x checkpoint, not SDXL")


# -- secrets -------------------------------------------------------------------------------------


async def test_the_hf_token_is_never_in_the_result_and_only_in_the_job_that_needs_it(
    models: ModelActivities, hub: Served, s3: S3Client, settings: Settings
) -> None:
    fake, _ = hub
    reference = fake.add_file(
        "black-forest-labs/FLUX.1-dev",
        "flux1-dev.safetensors",
        checkpoint_bytes("flux-dev"),
        gated=True,
    )

    resolved = await resolve(models, reference)

    assert resolved.needs_hf_token
    assert HF_TOKEN not in resolved.model_dump_json()
    assert HF_TOKEN not in repr(resolved)

    storage_settings = models.settings.model_copy(
        update={"webhook_master_secret": SecretStr("m" * 32)}
    )
    storage = StorageActivities(s3, storage_settings)
    job = JobSpecInput(
        run_id="run-hf",
        images_zip=ImagesZip(
            location=S3Location(bucket=settings.bucket, key="runs/run-hf/images.zip"),
            sha256="0" * 64,
            bytes=10,
            image_count=1,
        ),
        model=resolved,
        training=TrainingConfig(),
        trainer="sd-scripts",
        output=OutputLocation(),
    )
    assert HF_TOKEN not in job.model_dump_json()
    ref = storage.write_job_spec(job)
    body = s3.get_object(Bucket=ref.location.bucket, Key=ref.location.key)["Body"].read()
    spec = JobSpec.model_validate_json(body)
    assert spec.hf_token == HF_TOKEN
    assert spec.model.needs_hf_token
    assert [c.role for c in spec.model.components] == ["clip_l", "t5xxl", "ae"]
    assert HF_TOKEN not in repr(spec)

    # A job whose files are all public carries no token.
    public = resolved.model_copy(update={"needs_hf_token": False})
    ref = storage.write_job_spec(job.model_copy(update={"model": public}))
    body = s3.get_object(Bucket=ref.location.bucket, Key=ref.location.key)["Body"].read()
    assert JobSpec.model_validate_json(body).hf_token is None
