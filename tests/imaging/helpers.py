"""Images built in the tests (numpy/PIL; nothing downloaded) and hand-made bad headers."""

import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.imaging import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- helpers


def smooth(w: int, h: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 image: upsampled noise (edges and gradients) plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((h // 8 + 2, w // 8 + 2, channels)) * 255).astype(np.uint8)
    bands = [
        Image.fromarray(coarse[..., c]).resize((w, h), Image.Resampling.BICUBIC)
        for c in range(channels)
    ]
    base = np.stack([np.asarray(b) for b in bands], axis=-1).astype(np.int16)
    noisy = base + rng.integers(-12, 13, base.shape)
    out: np.ndarray = np.clip(noisy, 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(smooth(w, h, 3, seed))


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c = color.astype(np.uint32)
    a = alpha.astype(np.uint32)
    if c.ndim == 3:
        a = a[..., None]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries (almost) no pixel data: 57 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real, fully valid grayscale PNG of zeros: tiny on disk, width*height bytes decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * ((width + 1) * height), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", raw)
        + png_chunk(b"IEND", b"")
    )


def gif_header_only(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    frame = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00\x02\x00"
    return b"GIF89a" + screen + frame + b";"


def jpeg_header_only(width: int, height: int) -> bytes:
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xda" + sos + b"\x00" * 16 + b"\xff\xd9"


def tiff_header_only(width: int, height: int) -> bytes:
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 1),
    ]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 10) + b"\x00\x00" + ifd


def assert_decode_error(data: bytes, match: str, **limits: int) -> ImageDecodeError:
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=match) as info:
        decode_image(data, **limits)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"rejecting took {elapsed:.2f} s"
    return info.value


def config(**overrides: Any) -> PreprocessConfig:
    base: dict[str, Any] = {"size": [224, 224], "mean": [0, 0, 0], "std": [1, 1, 1]}
    base.update(overrides)
    return PreprocessConfig.from_dict(base)
