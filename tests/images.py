"""Real, tiny image files for datasets: intake decodes every image, so test images must decode."""

from __future__ import annotations

import io

from PIL import Image


def encoded(fmt: str, seed: int = 0, size: int = 8) -> bytes:
    """A `size` px square image in `fmt` ("PNG", "JPEG", "WEBP"); `seed` changes its colour."""
    buffer = io.BytesIO()
    colour = (seed * 37 % 256, seed * 91 % 256, 200)
    Image.new("RGB", (size, size), colour).save(buffer, fmt)
    return buffer.getvalue()


PNG = encoded("PNG")
JPEG = encoded("JPEG")
WEBP = encoded("WEBP")
