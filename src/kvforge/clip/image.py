"""Images in: decoding with limits (bytes, data URLs, files) and CLIP's preprocessing.

Decoding refuses what a server must not try to hold: more than ``MAX_IMAGE_BYTES`` of input,
more than ``MAX_IMAGE_PIXELS`` pixels (checked from the header, before decoding), files Pillow
cannot identify and truncated ones. Each refusal is an :class:`ImageError` (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from kvforge.errors import InvalidRequestError
from kvforge.models.clip import CLIP_MEAN, CLIP_STD

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels; a 30000 x 30000 image is 900


class ImageError(InvalidRequestError):
    """An image that cannot be used: not an image, truncated, too large, a bad data URL."""


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (or of bare base64)."""
    payload = url
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageError("an image data URL must be data:<type>;base64,<data>", "image_url")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", "image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"the image is not valid base64: {exc}", "image_url") from exc


def image_url_bytes(url: str) -> bytes:
    """The bytes of a chat image URL: a data URL or bare base64 (remote URLs are not
    fetched: a server must not make requests on a client's behalf)."""
    if url.startswith(("http://", "https://", "file:", "ftp:")):
        raise ImageError(
            "image URLs are not fetched: send the image as a data URL (data:image/png;base64,...)",
            "messages",
        )
    return decode_data_url(url)


def open_image(source: object, what: str = "image") -> object:
    """An RGB ``PIL.Image`` from bytes, a file path or a PIL image, decoded within limits."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{path}: no such image file", what)
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise ImageError(f"{path}: larger than {MAX_IMAGE_BYTES} bytes", what)
            data = path.read_bytes()
        else:
            raise ImageError(
                f"an image is bytes, a path or a PIL image, not {type(source).__name__}"
            )
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", what)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(f"the {what} is not an image Pillow can read", what) from exc
        except Image.DecompressionBombError as exc:  # Pillow's own, far higher, limit
            raise ImageError(f"the {what} has more than {MAX_IMAGE_PIXELS} pixels", what) from exc
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"the {what} is {width}x{height}: more than {MAX_IMAGE_PIXELS} pixels", what
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"the {what} is truncated or corrupt: {exc}", what) from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the {what} has no pixels", what)
    return image.convert("RGB")


class Preprocess:
    """CLIP's image preprocessing: resize the short side to ``size`` (bicubic), crop the centre
    square, scale to [0, 1], normalise per channel. Call it on one image -> [3, size, size]."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, source: object) -> torch.Tensor:
        from PIL import Image

        image = open_image(source)
        width, height = image.size  # type: ignore[attr-defined]
        scale = self.size / min(width, height)
        resized = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        if resized != (width, height):
            image = image.resize(resized, Image.Resampling.BICUBIC)  # type: ignore[attr-defined]
        left = (resized[0] - self.size) // 2
        top = (resized[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))  # type: ignore[attr-defined]
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # type: ignore[attr-defined]
        pixels = pixels.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (pixels - self.mean) / self.std

    def batch(self, sources: Sequence[object]) -> torch.Tensor:
        """[n, 3, size, size] of several images."""
        return torch.stack([self(source) for source in sources])
