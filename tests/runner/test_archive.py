"""Safe unzip of the images archive."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from gpu_runner.archive import ArchiveError, safe_extract
from tests.runner.support import PNG, bomb_zip, dataset_zip, make_zip, symlink_zip


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "images.zip"
    path.write_bytes(data)
    return path


def test_extracts_images_and_captions(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = safe_extract(write(tmp_path, dataset_zip(3)), out, max_bytes=10**6)
    assert result.image_count == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "img0.png", "img0.txt", "img1.png", "img1.txt", "img2.png", "img2.txt"
    ]  # fmt: skip
    assert result.bytes == sum(p.stat().st_size for p in out.iterdir())


def test_keeps_subfolders_and_skips_directory_entries(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("set/", b"")
        archive.writestr("set/a.JPG", b"\xff\xd8\xff" + b"1" * 10)
        archive.writestr("./set/a.txt", b"caption")
    out = tmp_path / "dataset"
    result = safe_extract(write(tmp_path, buffer.getvalue()), out, max_bytes=10**6)
    assert result.image_count == 1
    assert (out / "set" / "a.JPG").is_file() and (out / "set" / "a.txt").is_file()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.png", "'..'"),
        ("set/../../evil.png", "'..'"),
        ("..\\evil.png", "'..'"),
        ("/etc/evil.png", "absolute"),
        ("C:/evil.png", "absolute"),
        ("run.sh", "not an image or caption"),
        ("img.gif", "not an image or caption"),
    ],
)
def test_refuses_unsafe_or_foreign_entries(tmp_path: Path, name: str, problem: str) -> None:
    out = tmp_path / "dataset"
    with pytest.raises(ArchiveError, match=problem) as caught:
        safe_extract(write(tmp_path, make_zip({"ok.png": PNG, name: PNG})), out, max_bytes=10**6)
    assert name in str(caught.value)
    # Checked before anything was written: nothing lands anywhere.
    assert not out.exists() or not any(out.rglob("*"))
    assert not (tmp_path / "evil.png").exists()


def test_refuses_symlinks(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=r"evil\.png: symbolic links are not allowed"):
        safe_extract(write(tmp_path, symlink_zip()), tmp_path / "dataset", max_bytes=10**6)


def test_refuses_zip_bomb_while_extracting(tmp_path: Path) -> None:
    data = bomb_zip(20 * 1024 * 1024)
    assert len(data) < 100_000  # tiny on the wire
    out = tmp_path / "dataset"
    with pytest.raises(ArchiveError, match="expands past the limit of 1048576 bytes"):
        safe_extract(write(tmp_path, data), out, max_bytes=1024 * 1024)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= 1024 * 1024


def test_bomb_with_lying_header_is_caught_by_counting(tmp_path: Path) -> None:
    """A header that claims a tiny size does not get the entry past the limit."""
    data = bytearray(bomb_zip(4 * 1024 * 1024))
    archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = archive.getinfo("huge.png")
    assert info.file_size == 4 * 1024 * 1024
    lie = (100).to_bytes(4, "little")
    real = info.file_size.to_bytes(4, "little")
    data = bytearray(bytes(data).replace(real, lie))  # both local and central headers
    with pytest.raises(ArchiveError):
        safe_extract(write(tmp_path, bytes(data)), tmp_path / "dataset", max_bytes=1024 * 1024)


def test_refuses_duplicates_and_empty_and_garbage(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning):
        archive.writestr("a.png", PNG)
        archive.writestr("a.png", PNG)
    with pytest.raises(ArchiveError, match="twice"):
        safe_extract(write(tmp_path, buffer.getvalue()), tmp_path / "d1", max_bytes=10**6)
    with pytest.raises(ArchiveError, match="holds no images"):
        safe_extract(write(tmp_path, make_zip({"a.txt": b"x"})), tmp_path / "d2", max_bytes=10**6)
    with pytest.raises(ArchiveError, match="cannot be read"):
        safe_extract(write(tmp_path, b"not a zip"), tmp_path / "d3", max_bytes=10**6)
