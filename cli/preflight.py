"""What `loratrain train` checks on the user's machine before it uploads anything or starts a run.

The workflow checks the same things again at intake (activities/storage.py, activities/civitai.py)
for clients that skip the CLI; here the user learns of every problem at once, in seconds, with
nothing uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from temporalio.exceptions import ApplicationError

from activities.civitai import ModelReference, check_local_model, parse_model_reference
from activities.storage import MAX_CAPTION_BYTES, image_problem
from client.uploads import CAPTION_SUFFIX, IMAGE_SUFFIXES
from common.settings import DEV_ENV_NAME, Settings
from gpu_runner.captions import caption_warnings
from gpu_runner.protocol import BaseModelFamily, TrainerName, TrainingConfig
from gpu_runner.settings import RunnerSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MODEL_FORMS = (
    "use civitai:<versionId>, hf:<owner>/<repo>[@revision]/<file>, an https URL, "
    "s3://bucket/key or a local path"
)
# A Civitai model's family is known only once Civitai answers: its settings must hold for one.
_CIVITAI_FAMILIES: tuple[BaseModelFamily, ...] = ("sd15", "sd2", "sdxl")
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


class CheckedModel(NamedTuple):
    reference: str  # what to send: a local path made absolute
    problem: str | None
    parsed: ModelReference | None  # what the worker will make of it, when it is valid


def check_model(reference: str, settings: Settings) -> CheckedModel:
    """The model reference checked as the worker checks it (`parse_model_reference`), and a
    local file's existence and size on this machine; nothing is asked over the network."""
    ref = reference.strip()
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    given, local = ref, None
    if scheme == "file":
        local = Path(unquote(parts.path))
    elif len(scheme) > 1 and scheme not in ("http", "https", "s3", "civitai", "hf"):
        # One letter is a Windows drive, not a scheme.
        return CheckedModel(
            ref, f"--model: {ref!r}: unknown scheme {scheme!r}; {_MODEL_FORMS}", None
        )
    elif not scheme and not ref.startswith(("civitai:", "hf:")):
        local = Path(ref).expanduser()
    if local is not None:
        problem = _local_file_problem(local, ref)
        if problem:
            return CheckedModel(ref, problem, None)
        if scheme != "file":
            ref = str(local.resolve())
    try:
        parsed = parse_model_reference(ref, settings)
        if parsed.kind == "local" and parsed.path is not None:
            # The file is here: its header says what it is, as the worker's intake reads it.
            detected = check_local_model(parsed.path, None)
            if detected is not None:
                parsed = replace(parsed, family=detected.family, variant=detected.variant)
    except ApplicationError as e:
        # Named as the user typed it, not as the absolute path it was made.
        return CheckedModel(ref, f"--model: {e.message.replace(ref, given)}", None)
    return CheckedModel(ref, None, parsed)


def caption_notes(
    folder: Path, files: list[Path], family: BaseModelFamily, variant: str | None
) -> list[str]:
    """Warnings for captions the family's text encoder certainly cuts (they still train)."""
    captions = {
        str(f.relative_to(folder)): f.read_text(encoding="utf-8", errors="replace")
        for f in files
        if f.suffix.lower() == CAPTION_SUFFIX
    }
    return [f"warning: {line}" for line in caption_warnings(captions, family, variant)]


def _local_file_problem(path: Path, ref: str) -> str | None:
    if path.is_file():
        if path.stat().st_size == 0:
            return f"--model: {ref} is empty (0 bytes): not a model"
        return None
    what = "is not a file" if path.exists() else "does not exist"
    return f"--model: {ref} {what} ({_MODEL_FORMS})"


class Unchecked(Exception):
    """S3 gave no answer here (no credentials, no access, not reachable): the worker, with its
    own credentials, checks the input again when the run starts."""


def s3_model_problem(model: ModelReference, s3: S3Client) -> str | None:
    """Whether an s3:// model exists, asked with this machine's S3 credentials."""
    assert model.bucket is not None and model.key is not None
    try:
        head = s3.head_object(Bucket=model.bucket, Key=model.key)
    except ClientError as e:
        if _code(e) in _NOT_FOUND:
            return f"--model: {model.reference} does not exist"
        raise Unchecked(f"S3 answered {_code(e) or e} for {model.reference}") from None
    except BotoCoreError as e:
        raise Unchecked(f"cannot ask S3 about {model.reference}: {e}") from None
    if head["ContentLength"] == 0:
        return f"--model: {model.reference} is empty (0 bytes): not a model"
    return None


def s3_images_problem(bucket: str, prefix: str, s3: S3Client) -> str | None:
    """Whether s3://bucket/prefix exists and holds at least one image (the worker checks every
    file again when it zips them)."""
    folder = prefix.lstrip("/")
    if folder and not folder.endswith("/"):
        folder += "/"  # as the worker reads it: 'cats' is cats/, never cats2/
    where = f"s3://{bucket}/{folder}"
    found = False
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            keys = [item["Key"] for item in page.get("Contents", [])]
            found = found or bool(keys)
            if any(Path(key).suffix.lower() in IMAGE_SUFFIXES for key in keys):
                return None
    except ClientError as e:
        if _code(e) == "NoSuchBucket":
            return f"IMAGES: bucket {bucket!r} does not exist"
        raise Unchecked(f"S3 answered {_code(e) or e} for {where}") from None
    except BotoCoreError as e:
        raise Unchecked(f"cannot ask S3 about {where}: {e}") from None
    if not found:
        return f"IMAGES: nothing under {where}: no such prefix"
    return f"IMAGES: {where} holds no .png, .jpg, .jpeg or .webp images"


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def training_problems(training: TrainingConfig, model: ModelReference | None) -> list[str]:
    """The worker's check of the settings with the model family's defaults filled in. A
    Civitai model's family is not known here: refused only when no family would take them."""
    families: Sequence[BaseModelFamily] = (
        [model.family] if model is not None and model.family is not None else _CIVITAI_FAMILIES
    )
    found = [training.family_problems(family) for family in families]
    if all(found):
        return [f"training: {problem}" for problem in found[0]]
    return []


class TrainerChoice(NamedTuple):
    trainer: TrainerName
    note: str | None  # one line to tell the user, when the trainer was chosen for them
    problem: str | None


def choose_trainer(requested: TrainerName | None, settings: Settings) -> TrainerChoice:
    """The trainer the run will use. The local GPU provider runs sd-scripts from its runner's
    sd-scripts folder (LORA_RUNNER_SD_SCRIPTS_DIR, here or as `loratrain dev` recorded it):
    without that folder the default becomes the builtin trainer, and an explicit sd-scripts
    is refused. Other providers run the GPU image, which has both."""
    if settings.gpu_provider != "local":
        return TrainerChoice(requested or "sd-scripts", None, None)
    runner = local_runner_settings(settings)
    if runner.runner_trainer_factory or requested == "builtin":
        return TrainerChoice(requested or "sd-scripts", None, None)
    folder = runner.runner_sd_scripts_dir
    if folder.is_dir():
        return TrainerChoice("sd-scripts", None, None)
    if requested is None:
        note = (
            f"note: no sd-scripts for the local GPU provider ({folder} does not exist, "
            "LORA_RUNNER_SD_SCRIPTS_DIR): training with the builtin trainer"
        )
        return TrainerChoice("builtin", note, None)
    return TrainerChoice(
        "sd-scripts",
        None,
        f"--trainer sd-scripts: the local GPU provider runs sd-scripts from {folder}, which "
        "does not exist; set LORA_RUNNER_SD_SCRIPTS_DIR to a kohya-ss sd-scripts checkout "
        "(where the worker or `loratrain dev` starts) or use --trainer builtin",
    )


def local_runner_settings(settings: Settings) -> RunnerSettings:
    """The local runner's settings as its worker sees them: LORA_RUNNER_ variables here, else
    those `loratrain dev` recorded in its dev env file for the worker it started."""
    return RunnerSettings(_env_file=settings.state_dir / DEV_ENV_NAME)


def dataset_problems(folder: Path, files: list[Path], settings: Settings) -> list[str]:
    """Every problem with the images and captions that would be uploaded, one line each."""
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    captions = [f for f in files if f.suffix.lower() == CAPTION_SUFFIX]
    if not images:
        return [f"IMAGES: {folder} holds no .png, .jpg, .jpeg or .webp images"]
    problems: list[str] = []
    sizes = {f: f.stat().st_size for f in images + captions}
    total = sum(sizes.values())
    if len(images) > settings.max_images:
        problems.append(
            f"IMAGES: {len(images)} images, more than the limit of {settings.max_images}; "
            "remove some or split the dataset"
        )
    if total > settings.max_dataset_bytes:
        problems.append(
            f"IMAGES: the images and captions add up to {_human(total)}, more than the limit "
            f"of {_human(settings.max_dataset_bytes)}"
        )
    for image in images:
        size = sizes[image]
        if size == 0:
            problems.append(f"IMAGES: {image.name}: the file is empty")
        elif size > settings.max_image_bytes:
            problems.append(
                f"IMAGES: {image.name}: {_human(size)} is over the limit of "
                f"{_human(settings.max_image_bytes)} per image; resize it"
            )
        elif (problem := image_problem(image.name, image.read_bytes())) is not None:
            problems.append(f"IMAGES: {image.name}: {problem}")
    for caption in captions:
        if sizes[caption] > MAX_CAPTION_BYTES:
            problems.append(
                f"IMAGES: {caption.name}: caption is {_human(sizes[caption])}, over the limit "
                f"of {_human(MAX_CAPTION_BYTES)}"
            )
            continue
        try:
            caption.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                f"IMAGES: {caption.name}: caption is not UTF-8 text (byte {e.start}); "
                "save it as UTF-8"
            )
    return problems


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
