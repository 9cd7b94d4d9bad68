"""Unzip the images archive without trusting it: no escaping paths, no links, no zip bombs.
Pack a folder the trainer wrote (its TensorBoard logs) into a .tar.gz to upload."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_SUFFIXES = frozenset({".txt"})
ALLOWED_SUFFIXES = IMAGE_SUFFIXES | CAPTION_SUFFIXES
_CHUNK = 1024 * 1024


class ArchiveError(Exception):
    """The images zip is unsafe or broken; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class ExtractedDataset:
    image_count: int
    bytes: int  # total uncompressed bytes written
    files: list[Path]


def _safe_relative_path(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    # Windows-made zips may use backslashes; treat them as separators so ..\ is caught too.
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise ArchiveError(f"{name}: absolute paths are not allowed in the images zip")
    if any(part == ".." for part in parts):
        raise ArchiveError(f"{name}: '..' in a path is not allowed in the images zip")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise ArchiveError(f"{name!r}: empty entry name in the images zip")
    return PurePosixPath(*clean)


def _check_entry(info: zipfile.ZipInfo) -> PurePosixPath:
    relative = _safe_relative_path(info)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveError(f"{info.filename}: symbolic links are not allowed in the images zip")
    if mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
        raise ArchiveError(f"{info.filename}: only regular files are allowed in the images zip")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{info.filename}: encrypted entries are not supported")
    if relative.suffix.lower() not in ALLOWED_SUFFIXES:
        raise ArchiveError(
            f"{info.filename}: not an image or caption file (allowed: .png .jpg .jpeg .webp .txt)"
        )
    return relative


def safe_extract(zip_path: Path, dest: Path, *, max_bytes: int) -> ExtractedDataset:
    """Extract images and captions from `zip_path` into `dest`.

    Every entry is checked before anything is written; sizes are counted while inflating, never
    taken from the (forgeable) headers, and extraction stops as soon as `max_bytes` is passed.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"the images zip cannot be read: {e}") from None
    with archive:
        entries: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        seen: set[str] = set()
        for info in archive.infolist():
            if info.is_dir():
                _safe_relative_path(info)
                continue
            relative = _check_entry(info)
            key = str(relative).lower()
            if key in seen:
                raise ArchiveError(f"{info.filename}: the images zip holds this file twice")
            seen.add(key)
            entries.append((info, relative))

        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        image_count = 0
        files: list[Path] = []
        for info, relative in entries:
            target = root.joinpath(*relative.parts)
            if not target.resolve().is_relative_to(root):  # belt and braces after the checks
                raise ArchiveError(f"{info.filename}: path escapes the dataset folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(
                                f"the images zip expands past the limit of {max_bytes} bytes "
                                f"(at {info.filename}); refusing it as a possible zip bomb"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as e:
                raise ArchiveError(f"{info.filename}: cannot be extracted: {e}") from None
            except FileExistsError:
                raise ArchiveError(f"{info.filename}: clashes with another entry") from None
            files.append(target)
            if relative.suffix.lower() in IMAGE_SUFFIXES:
                image_count += 1
        if image_count == 0:
            raise ArchiveError("the images zip holds no images (.png .jpg .jpeg .webp)")
        return ExtractedDataset(image_count=image_count, bytes=written, files=files)


def pack_folder(folder: Path, dest: Path) -> int:
    """Write the regular files under `folder` to the .tar.gz `dest`, named relative to `folder`;
    how many. With none (or no folder), no archive is written and the answer is 0."""
    files = (
        sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        if folder.is_dir()
        else []
    )
    dest.unlink(missing_ok=True)
    if not files:
        return 0
    with tarfile.open(dest, "w:gz") as archive:
        for path in files:
            archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return len(files)
