"""Decode untrusted image bytes into a Pillow image in ``"RGB"`` or ``"L"`` mode.

Safety properties of :func:`decode_image`:

* Only JPEG (with its multi-picture variant MPO, which Pillow's JPEG opener handles), PNG,
  WebP, BMP, GIF and TIFF are parsed; Pillow's other plugins (EPS, which would start
  Ghostscript, among them) are never tried.
* Width, height and pixel count come from the header and are checked against the caller's
  limits *before* any pixel data is decoded, so no large buffer is allocated for a bomb.
  Pillow's own process-wide ``Image.MAX_IMAGE_PIXELS`` is left alone; it still applies as an
  outer bound (Pillow refuses more than twice that many pixels, ~179 MP by default).
* The whole first frame is decoded eagerly (``load()``) and truncation is an error. That
  needs Pillow's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` to be off (its default);
  if other code in the process switched it on, decoding refuses to run (``RuntimeError``)
  rather than silently accept half images.
* Any failure caused by the input surfaces as the single type :class:`ImageDecodeError`.
"""

from __future__ import annotations

import io
import logging

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError
from .modes import to_model_mode

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "SUPPORTED_FORMATS", "decode_image"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 16_384
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Leading bytes of each supported format, only used to word the error for a corrupt header.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Image.Image:
    """Decode one encoded image (first frame only) to a loaded ``"RGB"`` or ``"L"`` image.

    EXIF orientation is applied; alpha is composited over white and other modes reduced as
    described in :mod:`server.imaging.modes`. ``max_side`` bounds width and height,
    ``max_pixels`` bounds width * height.

    Raises :class:`ImageDecodeError` for any problem with ``data``; ``ValueError`` for
    non-positive limits; ``RuntimeError`` if Pillow's LOAD_TRUNCATED_IMAGES was turned on.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, not {type(data).__name__}")
    if max_pixels < 1 or max_side < 1:
        raise ValueError(f"max_pixels and max_side must be positive, got {max_pixels}, {max_side}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; the serving path needs "
            "it off so that truncated uploads are rejected instead of decoded as partial images"
        )
    if len(data) == 0:
        raise ImageDecodeError("empty input: the image data is zero bytes")

    img = _open(bytes(data) if not isinstance(data, bytes) else data)
    try:
        _check_size(img.size, max_pixels=max_pixels, max_side=max_side)
        try:
            img.load()
        except MemoryError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"truncated or corrupt {img.format} data: {e}") from e
        _apply_orientation(img)
        out = to_model_mode(img)
    except BaseException:
        img.close()
        raise
    if out is not img:
        img.close()
    return out


def _open(data: bytes) -> ImageFile.ImageFile:
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large, possible decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        fmt = _sniff(data)
        if fmt is not None:
            raise ImageDecodeError(f"truncated or corrupt {fmt} header") from e
        raise ImageDecodeError(
            f"not a supported image (expected one of {', '.join(SUPPORTED_FORMATS)}; "
            f"data starts with {data[:8]!r})"
        ) from e
    except MemoryError:
        raise
    except Exception as e:
        fmt = _sniff(data) or "image"
        raise ImageDecodeError(f"truncated or corrupt {fmt} data: {e}") from e


def _sniff(data: bytes) -> str | None:
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_size(size: tuple[int, int], *, max_pixels: int, max_side: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width > max_side or height > max_side:
        raise ImageDecodeError(
            f"image is {width}x{height} pixels; width and height may be at most {max_side}"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels; at most {max_pixels} allowed"
        )


def _apply_orientation(img: Image.Image) -> None:
    """Rotate/flip per the EXIF Orientation tag; broken EXIF data is ignored, not fatal."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception as e:
        log.debug("ignoring unreadable EXIF orientation: %s", e)
