"""What `loratrain train` checks on the user's machine before it uploads anything or starts a run.

The workflow checks the same things again at intake (activities/storage.py, activities/civitai.py)
for clients that skip the CLI; here the user learns of every problem at once, in seconds, with
nothing uploaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from activities.storage import MAX_CAPTION_BYTES, image_problem

from .settings import Settings

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_SUFFIX = ".txt"
_CIVITAI_REF = re.compile(r"^civitai:\d{1,12}$")
_MODEL_FORMS = "use civitai:<versionId>, an https URL, s3://bucket/key or a local path"


def check_model(reference: str) -> tuple[str, str | None]:
    """(the reference to send, the problem with it or None); a local path is made absolute."""
    ref = reference.strip()
    if ref.startswith("civitai:"):
        if _CIVITAI_REF.match(ref):
            return ref, None
        return ref, (
            f"--model: {ref!r} is not a Civitai reference: use civitai:<model version id>, "
            "e.g. civitai:128713"
        )
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return ref, None if parts.hostname else f"--model: {ref!r} names no host"
    if scheme == "s3":
        if parts.netloc and parts.path.strip("/"):
            return ref, None
        return ref, f"--model: {ref!r} is not s3://bucket/key"
    if scheme == "file":
        return ref, _local_file_problem(Path(unquote(parts.path)), ref)
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        return ref, f"--model: {ref!r}: unknown scheme {scheme!r}; {_MODEL_FORMS}"
    path = Path(ref).expanduser()
    problem = _local_file_problem(path, ref)
    return (ref, problem) if problem else (str(path.resolve()), None)


def _local_file_problem(path: Path, ref: str) -> str | None:
    if path.is_file():
        return None
    what = "is not a file" if path.exists() else "does not exist"
    return f"--model: {ref} {what} ({_MODEL_FORMS})"


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
