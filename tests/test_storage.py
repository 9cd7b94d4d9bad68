"""StorageActivities against the local S3 server (SeaweedFS) over real HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import storage
from activities.civitai import ResolvedModel
from activities.storage import (
    ZIP_DATE_TIME,
    DatasetInput,
    ImagesZip,
    JobSpecInput,
    StorageActivities,
    VerifyUploadInput,
    _safe_name,
)
from common.settings import Settings
from gpu_runner.protocol import JobSpec, TrainingConfig, derive_run_secret
from workflows.models import OutputLocation, S3Location, S3Prefix

from .images import encoded

PREFIX = "datasets/cats"


def png(size: int = 64, seed: int = 0) -> bytes:
    """A real PNG, `size` bytes of padding after its end (decoders ignore them) to vary sizes."""
    return encoded("PNG", seed) + bytes((seed + i) % 251 for i in range(size))


def jpeg(size: int = 64, seed: int = 0) -> bytes:
    return encoded("JPEG", seed) + bytes((seed + i) % 251 for i in range(size))


def webp(size: int = 64) -> bytes:
    return encoded("WEBP") + bytes(size)


def gif() -> bytes:
    return b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(20)


def put(s3: Any, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def upload_dataset(s3: Any, bucket: str, files: dict[str, bytes], prefix: str = PREFIX) -> None:
    for name, body in files.items():
        put(s3, bucket, f"{prefix}/{name}", body)


def dataset(settings: Settings, run_id: str = "run-1", prefix: str = PREFIX) -> DatasetInput:
    return DatasetInput(run_id=run_id, images=S3Prefix(bucket=settings.bucket, prefix=prefix))


def rejection(call: Any, *args: Any) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        call(*args)
    error = caught.value
    assert error.type == "InvalidDataset"
    assert error.non_retryable
    return error


def no_pending_uploads(s3: Any, bucket: str) -> bool:
    return not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


GOOD_FILES = {
    "b.png": png(100, seed=1),
    "a.jpg": jpeg(80, seed=2),
    "a.txt": b"a cat, sitting",
    "sub/c.webp": webp(50),
    "sub/d.JPEG": jpeg(30, seed=3),
    "sub/c.txt": "ein Kätzchen".encode(),
}


# ---------------------------------------------------------------------------------------------
# validate_images
# ---------------------------------------------------------------------------------------------


def test_validate_counts_images_captions_and_bytes(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    put(s3, settings.bucket, f"{PREFIX}/sub/", b"")  # directory marker: ignored
    put(s3, settings.bucket, f"{PREFIX}2/other.gif", gif())  # a sibling prefix, not in the set

    summary = StorageActivities(s3, settings).validate_images(dataset(settings))

    assert summary.image_count == 4
    assert summary.caption_count == 2
    assert summary.total_bytes == sum(len(b) for b in GOOD_FILES.values())


def test_file_manager_clutter_is_skipped_not_rejected(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    for clutter in (".DS_Store", "sub/._b.png", "__MACOSX/sub/._c.webp", "Thumbs.db"):
        put(s3, settings.bucket, f"{PREFIX}/{clutter}", b"\x00\x05\x16\x07 metadata")
    acts = StorageActivities(s3, settings)

    summary = acts.validate_images(dataset(settings))
    result = acts.build_images_zip(dataset(settings, run_id="run-clutter"))

    assert summary.image_count == 4
    with zipfile.ZipFile(io.BytesIO(read_object(s3, result.location))) as archive:
        assert archive.namelist() == sorted(GOOD_FILES)


def test_empty_prefix_is_rejected(settings: Settings, s3: Any) -> None:
    put(s3, settings.bucket, f"{PREFIX}/only-a-caption.txt", b"a cat")

    error = rejection(StorageActivities(s3, settings).validate_images, dataset(settings))

    assert error.message == f"no images under s3://{settings.bucket}/{PREFIX}/"


def test_missing_bucket_is_rejected(settings: Settings, s3: Any) -> None:
    missing = DatasetInput(run_id="run-1", images=S3Prefix(bucket="no-such-bucket-x1", prefix=""))

    error = rejection(StorageActivities(s3, settings).validate_images, missing)

    assert "bucket no-such-bucket-x1 does not exist" in error.message


def test_gif_is_rejected_by_extension(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, {"a.png": png(), "cat.gif": gif()})

    error = rejection(StorageActivities(s3, settings).validate_images, dataset(settings))

    assert error.message == "cat.gif: GIF is not a supported image type (use PNG, JPEG or WebP)"
    assert error.details == (
        ["cat.gif: GIF is not a supported image type (use PNG, JPEG or WebP)"],
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (jpeg(), "fake.png: the file is a JPEG image but its name says PNG; fix the extension"),
        (gif(), "fake.png: the file is a GIF image, not PNG; GIF is not supported"),
        (b"hello, I am text", "fake.png: not a PNG image (its first bytes are not a PNG"),
    ],
)
def test_png_name_on_other_content_is_rejected(
    settings: Settings, s3: Any, body: bytes, expected: str
) -> None:
    upload_dataset(s3, settings.bucket, {"a.png": png(), "fake.png": body})

    error = rejection(StorageActivities(s3, settings).validate_images, dataset(settings))

    assert error.message.startswith(expected)


@pytest.mark.parametrize("activity", ["validate_images", "build_images_zip"])
def test_images_that_do_not_decode_are_rejected_with_every_name(
    settings: Settings, s3: Any, activity: str
) -> None:
    """Right first bytes, broken insides: what the trainer would crash on after a GPU is rented.
    The zip checks each file as it reads it, and names every problem as validation does."""
    upload_dataset(
        s3,
        settings.bucket,
        {
            "a.png": png(),
            "signature-only.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
            "truncated.jpg": encoded("JPEG", size=64)[:-200],
            "cut.webp": encoded("WEBP", size=64)[:-10],
        },
    )

    error = rejection(getattr(StorageActivities(s3, settings), activity), dataset(settings))

    assert error.message.startswith(f"3 problems with the images under s3://{settings.bucket}/")
    lines = error.details[0]
    assert [line.split(":", 1)[0] for line in lines] == [
        "cut.webp",
        "signature-only.png",
        "truncated.jpg",
    ]
    assert "signature-only.png: the PNG image cannot be decoded (" in lines[1]
    assert lines[1].endswith("open and save it again")
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix="runs/")["KeyCount"] == 0
    assert no_pending_uploads(s3, settings.bucket)


def test_too_many_images_is_rejected(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, {f"{i}.png": png(seed=i) for i in range(4)})
    small = settings.model_copy(update={"max_images": 3})

    error = rejection(StorageActivities(s3, small).validate_images, dataset(small))

    assert "4 images" in error.message
    assert "more than the limit of 3" in error.message


def test_image_over_the_size_limit_is_rejected(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, {"small.png": png(10), "big.png": png(2000)})
    small = settings.model_copy(update={"max_image_bytes": 1024})

    error = rejection(StorageActivities(s3, small).validate_images, dataset(small))

    assert error.message.startswith("big.png: 2.0 KiB is over the limit of 1.0 KiB per image")
    assert "small.png" not in error.message


def test_dataset_over_the_total_limit_is_rejected(settings: Settings, s3: Any) -> None:
    files = {f"{i}.png": png(600, seed=i) for i in range(3)}
    upload_dataset(s3, settings.bucket, files)
    small = settings.model_copy(update={"max_dataset_bytes": 1500})

    error = rejection(StorageActivities(s3, small).validate_images, dataset(small))

    total_kib = sum(len(body) for body in files.values()) / 1024
    assert f"add up to {total_kib:.1f} KiB, more than the limit of 1.5 KiB" in error.message


@pytest.mark.parametrize("activity", ["validate_images", "build_images_zip"])
def test_every_problem_is_named_in_one_error(settings: Settings, s3: Any, activity: str) -> None:
    upload_dataset(
        s3,
        settings.bucket,
        {
            "ok.png": png(),
            "ok.txt": b"fine",
            "cat.gif": gif(),
            "fake.png": jpeg(),
            "big.webp": webp(5000),
            "notes.pdf": b"%PDF-1.7",
            "README": b"hi",
            "bad.txt": b"caf\xe9",  # Latin-1, not UTF-8
            "huge.txt": b"x" * (64 * 1024 + 1),
            "empty.jpg": b"",
        },
    )
    small = settings.model_copy(update={"max_image_bytes": 4096})

    error = rejection(getattr(StorageActivities(s3, small), activity), dataset(small))

    offenders = [
        "README",
        "bad.txt",
        "big.webp",
        "cat.gif",
        "empty.jpg",
        "fake.png",
        "huge.txt",
        "notes.pdf",
    ]
    assert error.message.startswith(f"8 problems with the images under s3://{small.bucket}/")
    problems = error.details[0]
    assert [p.split(":")[0] for p in problems] == offenders  # sorted by name, one per file
    for name in offenders:
        assert f"- {name}: " in error.message
    assert "ok.png" not in error.message and "ok.txt" not in error.message
    assert "bad.txt: caption is not UTF-8 text" in error.message
    assert "notes.pdf: .pdf files are not allowed" in error.message
    assert "README: files without an extension are not allowed" in error.message
    assert "empty.jpg: the file is empty" in error.message


def test_unsafe_names_are_rejected(settings: Settings, s3: Any) -> None:
    put(s3, settings.bucket, f"{PREFIX}/a.png", png())
    put(s3, settings.bucket, f"{PREFIX}/bell\x07.png", png())
    put(s3, settings.bucket, f"{PREFIX}/del\x7f.png", png())

    error = rejection(StorageActivities(s3, settings).validate_images, dataset(settings))

    assert "- bell\x07.png: unsafe file name" in error.message
    assert "- del\x7f.png: unsafe file name" in error.message
    assert "a.png" not in error.message


# Keys real S3 stores and lists as given; the local S3 server refuses or folds them (below), so
# the check is shown on the names themselves.
@pytest.mark.parametrize(
    "name", ["x/../evil.png", "../up.png", "/rooted.png", "x//y.png", "./a.png", "x\\..\\y.png"]
)
def test_names_with_empty_dot_or_backslash_parts_are_unsafe(name: str) -> None:
    assert not _safe_name(name)
    assert _safe_name("cats/..png") and _safe_name("cats/a.b.png")


def test_the_local_s3_server_refuses_keys_that_climb_out(settings: Settings, s3: Any) -> None:
    for key in (f"{PREFIX}/x/../evil.png", f"{PREFIX}/../up.png", f"{PREFIX}/./a.png"):
        with pytest.raises(ClientError) as refused:
            put(s3, settings.bucket, key, png())
        assert refused.value.response["Error"]["Code"] == "InvalidRequest"


# ---------------------------------------------------------------------------------------------
# build_images_zip
# ---------------------------------------------------------------------------------------------


def read_object(s3: Any, location: S3Location) -> bytes:
    body: bytes = s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    return body


def test_zip_holds_every_file_sorted_with_fixed_dates(settings: Settings, s3: Any) -> None:
    # Two 9 MiB images cross the 8 MiB part boundaries: two parts upload at once, then a last.
    files = dict(GOOD_FILES)
    files["large-1.png"] = png(9 * 1024 * 1024, seed=7)
    files["large-2.png"] = png(9 * 1024 * 1024, seed=8)
    upload_dataset(s3, settings.bucket, files)
    acts = StorageActivities(s3, settings)

    result = acts.build_images_zip(dataset(settings, run_id="run-zip"))

    assert result.location == S3Location(bucket=settings.bucket, key="runs/run-zip/images.zip")
    assert result.image_count == 6
    data = read_object(s3, result.location)
    assert len(data) == result.bytes
    assert hashlib.sha256(data).hexdigest() == result.sha256
    head = s3.head_object(Bucket=settings.bucket, Key=result.location.key)
    assert head["Metadata"] == {"sha256": result.sha256, "image-count": "6"}
    assert head["ContentType"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every CRC checks out
        assert archive.namelist() == sorted(files)
        for info in archive.infolist():
            assert info.date_time == ZIP_DATE_TIME
            assert info.compress_type == zipfile.ZIP_STORED
            assert archive.read(info) == files[info.filename]
    assert no_pending_uploads(s3, settings.bucket)


def test_same_dataset_gives_the_same_zip_bytes(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    acts = StorageActivities(s3, settings)

    first = acts.build_images_zip(dataset(settings, run_id="run-a"))
    second = acts.build_images_zip(dataset(settings, run_id="run-b"))

    assert first.sha256 == second.sha256
    assert read_object(s3, first.location) == read_object(s3, second.location)


def test_a_finished_zip_is_returned_without_rebuilding(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    acts = StorageActivities(s3, settings)
    first = acts.build_images_zip(dataset(settings))
    # With a source image gone, a rebuild would fail validation or give other bytes.
    s3.delete_object(Bucket=settings.bucket, Key=f"{PREFIX}/b.png")

    again = acts.build_images_zip(dataset(settings))

    assert again == first
    assert hashlib.sha256(read_object(s3, again.location)).hexdigest() == first.sha256


def test_an_unfinished_zip_is_rebuilt(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    # What an attempt that died before stamping the metadata leaves behind.
    put(s3, settings.bucket, "runs/run-1/images.zip", b"half a zip")
    s3.create_multipart_upload(Bucket=settings.bucket, Key="runs/run-1/images.zip")

    result = StorageActivities(s3, settings).build_images_zip(dataset(settings))

    data = read_object(s3, result.location)
    assert hashlib.sha256(data).hexdigest() == result.sha256
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == sorted(GOOD_FILES)
    assert no_pending_uploads(s3, settings.bucket)


def test_zip_heartbeats_its_progress(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    heartbeats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details)

    result = env.run(StorageActivities(s3, settings).build_images_zip, dataset(settings))

    progress = [details[0] for details in heartbeats if details]
    assert len(progress) >= len(GOOD_FILES)
    assert progress == sorted(progress)
    assert 0 < progress[-1] <= result.bytes


def test_bad_dataset_is_never_zipped(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, {"a.png": png(), "cat.gif": gif()})

    error = rejection(StorageActivities(s3, settings).build_images_zip, dataset(settings))

    assert "cat.gif" in error.message
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix="runs/")["KeyCount"] == 0
    assert no_pending_uploads(s3, settings.bucket)


def test_a_bad_image_after_parts_went_up_aborts_the_multipart_upload(
    settings: Settings, s3: Any
) -> None:
    files = {
        "large-1.png": png(9 * 1024 * 1024, seed=1),
        "large-2.png": png(9 * 1024 * 1024, seed=2),
        "z.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    upload_dataset(s3, settings.bucket, files)

    error = rejection(StorageActivities(s3, settings).build_images_zip, dataset(settings))

    assert error.message.startswith("z.png: the PNG image cannot be decoded (")
    assert no_pending_uploads(s3, settings.bucket)
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix="runs/")["KeyCount"] == 0


def test_zip_parts_grow_to_stay_within_the_s3_part_limit() -> None:
    """A dataset far over the default limits (1,000 images of 100 MiB) still fits S3's 10,000
    parts, each part a little larger than usual."""
    files = [
        storage._DatasetFile("b", f"k/{i:04d}.png", f"{i:04d}.png", 100 * 1024 * 1024, "e")
        for i in range(1000)
    ]
    summary = storage.DatasetSummary(image_count=1000, caption_count=0, total_bytes=0)
    part_bytes = storage._zip_part_bytes(storage._Dataset("s3://b/k/", files, summary))

    # Zip64 throughout: local header and its extra field, data descriptor, central directory
    # record and its extra field; then the zip64 end records and the end of central directory.
    zip_bytes = sum(f.size + 30 + 20 + 24 + 46 + 28 + 2 * len(f.name) for f in files) + 98
    assert part_bytes > storage.ZIP_PART_BYTES
    assert zip_bytes / part_bytes <= 10_000


def test_image_replaced_while_zipping_aborts_the_upload(
    settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One file read ahead at a time, so b.png is read only after a.png is in the zip.
    monkeypatch.setattr(storage, "_READ_AHEAD_BYTES", 1)
    upload_dataset(s3, settings.bucket, {"a.png": png(seed=1), "b.png": png(seed=2)})
    env = ActivityEnvironment()

    def replace_b_once(*_details: Any) -> None:
        if _details:  # a.png went into the zip; b.png is next
            env.on_heartbeat = lambda *_: None
            put(s3, settings.bucket, f"{PREFIX}/b.png", png(seed=3))

    env.on_heartbeat = replace_b_once

    with pytest.raises(Exception) as caught:
        env.run(StorageActivities(s3, settings).build_images_zip, dataset(settings))

    assert not isinstance(caught.value, ApplicationError)  # retryable: the next attempt rebuilds
    assert "PreconditionFailed" in str(caught.value)
    assert no_pending_uploads(s3, settings.bucket)
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix="runs/")["KeyCount"] == 0


# ---------------------------------------------------------------------------------------------
# write_job_spec
# ---------------------------------------------------------------------------------------------

CIVITAI_KEY = "civitai-user-key-0123456789"
SDXL_MODEL = ResolvedModel(
    url="https://civitai.com/api/download/models/128078",
    filename="sdXL_v10.safetensors",
    sha256="a" * 64,
    bytes=6_938_078_334,
    base_model="SDXL 1.0",
    family="sdxl",
    needs_civitai_key=True,
)


def job_input(
    images_zip: ImagesZip, output: OutputLocation | None = None, key: str | None = CIVITAI_KEY
) -> JobSpecInput:
    return JobSpecInput(
        run_id="run-job",
        images_zip=images_zip,
        model=SDXL_MODEL,
        training=TrainingConfig(epochs=3, network_dim=64),
        trainer="sd-scripts",
        output=output or OutputLocation(),
        civitai_api_key=key,
    )


def test_job_spec_is_readable_through_its_url(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    acts = StorageActivities(s3, settings)
    images_zip = acts.build_images_zip(dataset(settings, run_id="run-job"))

    ref = acts.write_job_spec(job_input(images_zip))

    assert ref.location == S3Location(bucket=settings.bucket, key="runs/run-job/job.json")
    expected_output = S3Location(bucket=settings.bucket, key="runs/run-job/model/lora.safetensors")
    assert ref.output == expected_output
    raw = httpx.get(ref.job_url, timeout=10).raise_for_status().content
    spec = JobSpec.model_validate_json(raw)
    assert spec.run_id == "run-job"
    # SDXL defaults fill what the request left unset; what it set stays.
    assert spec.training.resolution == 1024
    assert spec.training.batch_size == 1
    assert spec.training.text_encoder_lr == 0.0
    assert spec.training.mixed_precision == "bf16"
    assert spec.training.epochs == 3 and spec.training.network_dim == 64
    assert spec.model.family == "sdxl" and spec.model.url == SDXL_MODEL.url
    assert spec.events_url == f"{settings.relay_public_url}/v1/runs/run-job/events"
    assert spec.webhook_secret == derive_run_secret("test-master-secret", "run-job")
    assert spec.civitai_api_key == CIVITAI_KEY
    assert spec.upload.bucket == expected_output.bucket
    assert spec.upload.key == expected_output.key
    assert spec.upload.max_bytes == settings.max_model_bytes
    # The presigned URLs in the spec work: the images zip downloads, the model uploads.
    zipped = httpx.get(spec.images.url, timeout=10).raise_for_status().content
    assert hashlib.sha256(zipped).hexdigest() == spec.images.sha256 == images_zip.sha256
    assert spec.images.image_count == 4
    httpx.put(spec.upload.url, content=b"safetensors!", timeout=10).raise_for_status()
    assert read_object(s3, expected_output) == b"safetensors!"
    # The run's log goes next to the model, one file per GPU attempt.
    assert spec.log_upload is not None
    log = S3Location(bucket=settings.bucket, key="runs/run-job/logs/attempt-1.log")
    assert (spec.log_upload.bucket, spec.log_upload.key) == (log.bucket, log.key)
    httpx.put(spec.log_upload.url, content=b"the log", timeout=10).raise_for_status()
    assert read_object(s3, log) == b"the log"
    # Secrets are in the spec but not in what the workflow keeps or logs.
    assert CIVITAI_KEY in raw.decode() and spec.webhook_secret in raw.decode()
    shown = repr(ref) + str(ref)
    for secret in (ref.job_url, CIVITAI_KEY, spec.webhook_secret, spec.upload.url):
        assert secret not in shown


def test_job_spec_has_a_put_for_tensorboard_logs_beside_the_runs_log(
    settings: Settings, s3: Any
) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    acts = StorageActivities(s3, settings)
    images_zip = acts.build_images_zip(dataset(settings, run_id="run-job"))

    job = job_input(images_zip).model_copy(update={"attempt": 2, "upload_url_ttl_s": 4321})

    ref = acts.write_job_spec(job)

    spec = JobSpec.model_validate_json(httpx.get(ref.job_url, timeout=10).content)
    assert spec.log_upload is not None and spec.tensorboard_upload is not None
    assert spec.log_upload.key == "runs/run-job/logs/attempt-2.log"
    logs = S3Location(bucket=settings.bucket, key="runs/run-job/tensorboard/attempt-2.tar.gz")
    assert (spec.tensorboard_upload.bucket, spec.tensorboard_upload.key) == (logs.bucket, logs.key)
    assert spec.tensorboard_upload.max_bytes == storage.MAX_TENSORBOARD_BYTES

    def ttl_s(url: str) -> float:
        query = parse_qs(urlsplit(url).query)
        if "X-Amz-Expires" in query:  # SigV4: the TTL
            return float(query["X-Amz-Expires"][0])
        return float(query["Expires"][0]) - time.time()  # SigV2: the time it expires

    # Signed for as long as the log's PUT (both go up when training ends), as requested.
    assert ttl_s(spec.tensorboard_upload.url) == pytest.approx(4321, abs=60)
    assert ttl_s(spec.log_upload.url) == pytest.approx(4321, abs=60)
    httpx.put(spec.tensorboard_upload.url, content=b"tar.gz", timeout=10).raise_for_status()
    assert read_object(s3, logs) == b"tar.gz"


def test_job_spec_uses_the_requested_output_and_the_worker_key(settings: Settings, s3: Any) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    worker_key = "civitai-worker-key-987654321"
    keyed = settings.model_copy(update={"civitai_api_key": SecretStr(worker_key)})
    acts = StorageActivities(s3, keyed)
    images_zip = acts.build_images_zip(dataset(keyed, run_id="run-job"))
    output = OutputLocation(bucket=keyed.bucket, key="models/mine.safetensors")

    ref = acts.write_job_spec(job_input(images_zip, output=output, key=None))

    assert ref.output == S3Location(bucket=keyed.bucket, key="models/mine.safetensors")
    spec = JobSpec.model_validate_json(httpx.get(ref.job_url, timeout=10).content)
    assert spec.upload.key == "models/mine.safetensors"
    assert spec.civitai_api_key == worker_key


def test_job_spec_carries_no_civitai_key_when_the_model_needs_none(
    settings: Settings, s3: Any
) -> None:
    upload_dataset(s3, settings.bucket, GOOD_FILES)
    keyed = settings.model_copy(update={"civitai_api_key": SecretStr("civitai-worker-key-1")})
    acts = StorageActivities(s3, keyed)
    images_zip = acts.build_images_zip(dataset(keyed, run_id="run-job"))
    s3_model = SDXL_MODEL.model_copy(update={"needs_civitai_key": False})

    ref = acts.write_job_spec(job_input(images_zip).model_copy(update={"model": s3_model}))

    raw = httpx.get(ref.job_url, timeout=10).raise_for_status().text
    assert JobSpec.model_validate_json(raw).civitai_api_key is None
    assert CIVITAI_KEY not in raw and "civitai-worker-key-1" not in raw


def unused_zip(settings: Settings) -> ImagesZip:
    """An images zip that a job names but no test downloads."""
    return ImagesZip(
        location=S3Location(bucket=settings.bucket, key="runs/x/images.zip"),
        sha256="b" * 64,
        bytes=10,
        image_count=1,
    )


def test_job_spec_rejects_an_unsafe_run_id(settings: Settings, s3: Any) -> None:
    images_zip = unused_zip(settings)
    bad = job_input(images_zip).model_copy(update={"run_id": "../other-run"})

    with pytest.raises(ApplicationError) as caught:
        StorageActivities(s3, settings).write_job_spec(bad)

    assert caught.value.type == "InvalidRequest"
    assert s3.list_objects_v2(Bucket=settings.bucket)["KeyCount"] == 0


def test_the_builtin_trainer_refuses_a_family_it_cannot_train_before_any_gpu(
    settings: Settings, s3: Any
) -> None:
    images_zip = unused_zip(settings)
    builtin_sdxl = job_input(images_zip).model_copy(update={"trainer": "builtin"})

    with pytest.raises(ApplicationError) as caught:
        StorageActivities(s3, settings).write_job_spec(builtin_sdxl)

    assert caught.value.non_retryable and caught.value.type == "InvalidTrainingConfig"
    assert "not sdxl: start the run with `--trainer sd-scripts`" in caught.value.message
    assert s3.list_objects_v2(Bucket=settings.bucket)["KeyCount"] == 0


def test_a_block_swap_the_model_cannot_take_is_refused_before_any_gpu(
    settings: Settings, s3: Any
) -> None:
    images_zip = unused_zip(settings)
    sd35_medium = SDXL_MODEL.model_copy(
        update={"family": "sd3", "variant": "medium", "base_model": "SD 3.5 Medium"}
    )
    job = job_input(images_zip).model_copy(
        update={"model": sd35_medium, "training": TrainingConfig(blocks_to_swap=30)}
    )

    with pytest.raises(ApplicationError) as caught:
        StorageActivities(s3, settings).write_job_spec(job)

    assert caught.value.non_retryable and caught.value.type == "InvalidTrainingConfig"
    assert "training.blocks_to_swap is 30, but this model has blocks for at most 22" in (
        caught.value.message
    )


# ---------------------------------------------------------------------------------------------
# verify_upload
# ---------------------------------------------------------------------------------------------

MODEL_BYTES = os.urandom(3 * 1024 * 1024 + 17)
MODEL_SHA256 = hashlib.sha256(MODEL_BYTES).hexdigest()


def uploaded_model(settings: Settings, s3: Any) -> S3Location:
    location = S3Location(bucket=settings.bucket, key="runs/run-v/model/lora.safetensors")
    put(s3, location.bucket, location.key, MODEL_BYTES)
    return location


def verify(settings: Settings, s3: Any, location: S3Location, size: int, sha256: str) -> Any:
    return StorageActivities(s3, settings).verify_upload(
        VerifyUploadInput(run_id="run-v", output=location, bytes=size, sha256=sha256)
    )


def test_verify_upload_accepts_the_reported_model(settings: Settings, s3: Any) -> None:
    location = uploaded_model(settings, s3)

    verified = verify(settings, s3, location, len(MODEL_BYTES), MODEL_SHA256.upper())

    assert verified.location == location
    assert verified.bytes == len(MODEL_BYTES)
    assert verified.sha256 == MODEL_SHA256
    assert httpx.get(verified.download_url, timeout=10).content == MODEL_BYTES
    assert verified.download_url not in repr(verified)


def test_verify_upload_reports_a_missing_model(settings: Settings, s3: Any) -> None:
    location = S3Location(bucket=settings.bucket, key="runs/run-v/model/lora.safetensors")

    with pytest.raises(ApplicationError) as caught:
        verify(settings, s3, location, 10, MODEL_SHA256)

    assert caught.value.type == "UploadMissing"
    assert caught.value.non_retryable
    assert location.uri in caught.value.message


def test_verify_upload_reports_a_wrong_size(settings: Settings, s3: Any) -> None:
    location = uploaded_model(settings, s3)

    with pytest.raises(ApplicationError) as caught:
        verify(settings, s3, location, len(MODEL_BYTES) + 1, MODEL_SHA256)

    assert caught.value.type == "UploadMismatch"
    assert caught.value.non_retryable
    assert f"is {len(MODEL_BYTES)} bytes" in caught.value.message
    assert f"reported {len(MODEL_BYTES) + 1}" in caught.value.message


def test_verify_upload_reports_a_wrong_sha256(settings: Settings, s3: Any) -> None:
    location = uploaded_model(settings, s3)
    wrong = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(ApplicationError) as caught:
        verify(settings, s3, location, len(MODEL_BYTES), wrong)

    assert caught.value.type == "UploadMismatch"
    assert MODEL_SHA256 in caught.value.message
    assert wrong in caught.value.message
