"""A local folder of images and captions, uploaded to S3 before a run starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from common.s3 import s3_client
from common.settings import Settings

from .errors import BucketNotFound, S3Unreachable, StorageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class DatasetFiles:
    """A folder's images and captions, and what it holds besides (never uploaded)."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def dataset_files(folder: Path) -> DatasetFiles:
    """The top-level images and `.txt` captions of `folder`, sorted; hidden files are left out
    silently, folders and other files are listed in `skipped`."""
    found = DatasetFiles()
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if not path.is_dir() and (suffix in IMAGE_SUFFIXES or suffix == CAPTION_SUFFIX):
            found.files.append(path)
        else:
            found.skipped.append(path)
    return found


def upload_files(settings: Settings, files: Sequence[Path], bucket: str, prefix: str) -> None:
    """Upload each file to s3://bucket/prefix<its name>, one after another (blocking)."""
    s3 = s3_client(settings)
    where = settings.s3_endpoint_url or "AWS S3"
    for path in files:
        try:
            s3.upload_file(str(path), bucket, prefix + path.name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") == "NoSuchBucket":
                raise BucketNotFound(f"bucket {bucket!r} does not exist at {where}") from None
            raise StorageError(f"S3 refused {path.name}: {e}") from None
        except BotoCoreError as e:
            raise S3Unreachable(
                f"cannot reach S3 at {settings.s3_endpoint_url or 'AWS'} ({e})"
            ) from None
