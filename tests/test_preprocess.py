"""Image decoding and preprocessing (server.imaging): formats, modes, limits, open_clip parity.

Every image is generated here with numpy/PIL; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

import server.imaging.transform as transform_module
from server.imaging import (
    DEFAULT_MAX_SIDE,
    ImageDecodeError,
    PreprocessConfig,
    Preprocessor,
    decode_image,
    to_model_mode,
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


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("fmt", "kwargs", "mode", "tolerance"),
    [
        ("PNG", {}, "RGB", 0),
        ("PNG", {}, "L", 0),
        ("JPEG", {"quality": 95}, "RGB", 8.0),
        ("JPEG", {"quality": 95}, "L", 8.0),
        ("WEBP", {"lossless": True}, "RGB", 0),
        ("WEBP", {"quality": 90}, "RGB", 10.0),
        ("BMP", {}, "RGB", 0),
        ("BMP", {}, "L", 0),
        ("TIFF", {}, "RGB", 0),
        ("TIFF", {"compression": "tiff_lzw"}, "L", 0),
        ("TIFF", {"compression": "tiff_adobe_deflate"}, "RGB", 0),
    ],
)
def test_format_round_trip(fmt: str, kwargs: dict[str, Any], mode: str, tolerance: float) -> None:
    src = rgb(97, 61).convert(mode)
    out = decode_image(encode(src, fmt, **kwargs))
    assert out.mode == mode
    assert out.size == src.size
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(src, dtype=np.int16))
    assert diff.mean() <= tolerance
    if tolerance == 0:
        assert diff.max() == 0


def test_gif_round_trip_is_exact_for_palette_images() -> None:
    src = rgb(80, 50).quantize(200)
    out = decode_image(encode(src, "GIF"))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src.convert("RGB")))


def _frames(colors: list[tuple[int, int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", (32, 24), c) for c in colors]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF", "PNG"])
def test_multi_frame_files_decode_the_first_frame(fmt: str) -> None:
    first, *rest = _frames([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    kwargs: dict[str, Any] = {"save_all": True, "append_images": rest}
    if fmt == "WEBP":
        kwargs["lossless"] = True
    out = decode_image(encode(first, fmt, **kwargs))
    assert out.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(out)[5, 5], [255, 0, 0])


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode(rgb(20, 10), "PNG")
    for buf in (bytearray(data), memoryview(data)):
        assert decode_image(buf).size == (20, 10)
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


# Expected display image for each EXIF orientation, written independently of Pillow.
ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_png(orientation: int) -> None:
    src = rgb(40, 24)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(src, "PNG", exif=exif))
    np.testing.assert_array_equal(np.asarray(out), ORIENTED[orientation](np.asarray(src)))


def test_exif_orientation_jpeg_rotates_pixels() -> None:
    # Left half red, right half blue; orientation 6 = "rotate 90° clockwise to display",
    # so the displayed image is tall with red on top and blue at the bottom.
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(Image.fromarray(a), "JPEG", quality=95, exif=exif))
    assert out.size == (32, 64)
    pixels = np.asarray(out, dtype=np.int16)
    assert np.abs(pixels[8, 16] - (255, 0, 0)).max() < 10
    assert np.abs(pixels[56, 16] - (0, 0, 255)).max() < 10
    plain = decode_image(encode(Image.fromarray(a), "JPEG", quality=95))
    assert plain.size == (64, 32)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_exif_is_ignored() -> None:
    data = encode(rgb(30, 20), "JPEG", quality=95)
    app1 = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x13" * 40
    broken = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    out = decode_image(broken)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(decode_image(data)))


# ---------------------------------------------------------------------------- modes


def test_rgba_is_composited_over_white() -> None:
    color = smooth(50, 40, 3, seed=1)
    alpha = smooth(50, 40, 1, seed=2)
    alpha[:5] = 0
    alpha[-5:] = 255
    src = Image.fromarray(np.dstack([color, alpha]))
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB"
    expected = over_white(color, alpha)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert (np.asarray(out)[:5] == 255).all()


def test_rgba_webp_is_composited_over_white() -> None:
    color = smooth(30, 20, 3)
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, :10] = 0
    out = decode_image(encode(Image.fromarray(np.dstack([color, alpha])), "WEBP", lossless=True))
    assert out.mode == "RGB"
    assert (np.asarray(out)[:, :10] == 255).all()
    np.testing.assert_array_equal(np.asarray(out)[:, 10:], color[:, 10:])


def test_la_is_composited_over_white_to_grayscale() -> None:
    gray = smooth(40, 30, 1, seed=3)
    alpha = smooth(40, 30, 1, seed=4)
    src = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), over_white(gray, alpha))


def test_palette_without_transparency_becomes_rgb() -> None:
    src = rgb(60, 40).quantize(32)
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    src = rgb(60, 40).quantize(32)
    index = np.asarray(src)
    transparent = int(index[0, 0])
    out = decode_image(encode(src, fmt, transparency=transparent))
    assert out.mode == "RGB"
    pixels = np.asarray(out)
    mask = index == transparent
    assert (pixels[mask] == 255).all()
    np.testing.assert_array_equal(pixels[~mask], np.asarray(src.convert("RGB"))[~mask])


def test_grayscale_and_rgb_trns_transparency() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode_image(encode(Image.fromarray(gray), "PNG", transparency=10))
    expected = gray.copy()
    expected[gray == 10] = 255
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), expected)

    color = np.zeros((8, 8, 3), np.uint8)
    color[:4] = (1, 2, 3)
    color[4:] = (9, 9, 9)
    out = decode_image(encode(Image.fromarray(color), "PNG", transparency=(1, 2, 3)))
    assert out.mode == "RGB"
    assert (np.asarray(out)[:4] == 255).all()
    assert (np.asarray(out)[4:] == 9).all()


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_becomes_rgb(fmt: str) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    cmyk.paste((0, 0, 0, 0), (0, 0, 8, 16))  # white on the left
    out = decode_image(encode(cmyk, fmt))
    assert out.mode == "RGB"
    pixels = np.asarray(out, dtype=np.int16)
    assert np.abs(pixels[8, 2] - (255, 255, 255)).max() <= 3
    assert np.abs(pixels[8, 13] - (255, 0, 0)).max() <= 3
    if fmt == "TIFF":
        np.testing.assert_array_equal(pixels, np.asarray(cmyk.convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257, 1000, 32768, 65278, 65535]], dtype=np.uint16)
    expected = [[0, 0, 1, 1, 4, 128, 254, 255]]
    for fmt in ("PNG", "TIFF"):
        src = Image.fromarray(values)
        assert src.mode == "I;16"
        out = decode_image(encode(src, fmt))
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), expected)
    big_endian = Image.frombytes("I;16B", (8, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_model_mode(big_endian)), expected)


def test_thirty_two_bit_int_is_read_as_sixteen_bit() -> None:
    values = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    out = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), [[0, 0, 1, 255, 255]])


def test_float_is_read_as_zero_to_one() -> None:
    values = np.array([[np.nan, -1.0, 0.0, 0.25, 0.5, 1.0, 7.0, np.inf]], dtype=np.float32)
    out = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), [[0, 0, 0, 64, 128, 255, 255, 255]])


def test_one_bit_becomes_black_and_white_grayscale() -> None:
    bits = np.zeros((8, 8), bool)
    bits[:, 4:] = True
    for fmt in ("PNG", "BMP", "TIFF"):
        out = decode_image(encode(Image.fromarray(bits), fmt))
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), bits.astype(np.uint8) * 255)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("RGBa", "RGB"),
        ("La", "L"),
        ("PA", "RGB"),
        ("YCbCr", "RGB"),
        ("HSV", "RGB"),
        ("LAB", "RGB"),
        ("RGBX", "RGB"),
        ("CMYK", "RGB"),
        ("I;16", "L"),
        ("I;16B", "L"),
        ("I", "L"),
        ("F", "L"),
        ("1", "L"),
        ("P", "RGB"),
    ],
)
def test_every_mode_reduces_to_rgb_or_l(mode: str, expected: str) -> None:
    out = to_model_mode(Image.new(mode, (5, 3)))
    assert out.mode == expected
    assert out.size == (5, 3)


def test_rgb_and_l_pass_through_untouched() -> None:
    for img in (rgb(5, 5), rgb(5, 5).convert("L")):
        assert to_model_mode(img) is img


def test_premultiplied_alpha_composites_over_white() -> None:
    out = to_model_mode(Image.new("RGBA", (2, 2), (10, 20, 30, 0)).convert("RGBa"))
    assert (np.asarray(out) == 255).all()


# ---------------------------------------------------------------------------- bad input


def test_zero_bytes() -> None:
    assert_decode_error(b"", "zero bytes")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(7).bytes(4096),
        b"hello, world",
        b"\x00" * 100,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS: never reach Ghostscript
        b"P6\n2 2\n255\n" + b"\x80" * 12,  # valid PPM, but not a served format
    ],
    ids=["random", "text", "zeros", "eps", "ppm"],
)
def test_not_an_image(data: bytes) -> None:
    err = assert_decode_error(data, "not a supported image")
    assert err.index is None


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("WEBP", {}),
        ("BMP", {}),
        ("TIFF", {}),
    ],
)
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated(fmt: str, kwargs: dict[str, Any], fraction: float) -> None:
    src = rgb(200, 150)
    if fmt == "GIF":
        src = src.quantize(128)
    data = encode(src, fmt, **kwargs)
    assert_decode_error(data[: int(len(data) * fraction)], f"truncated or corrupt {fmt}")


def test_truncated_header_names_the_format() -> None:
    data = encode(rgb(20, 20), "PNG")
    assert_decode_error(data[:20], "truncated or corrupt PNG")
    assert_decode_error(data[:8], "truncated or corrupt PNG")


def test_load_truncated_images_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(rgb(200, 150), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "builder", [png_header_only, gif_header_only, jpeg_header_only, tiff_header_only]
)
def test_decompression_bomb_headers(builder: Callable[[int, int], bytes]) -> None:
    # 65000 x 65000 = 4.2 gigapixels, declared in a file of under 200 bytes.
    assert_decode_error(builder(65_000, 65_000), "decompression bomb|at most")
    # 8000 x 8000 = 64 MP: under Pillow's own limit, over our default 40 MP.
    assert_decode_error(builder(8_000, 8_000), "64000000 pixels; at most 40000000")
    # An absurd side with few pixels in total.
    assert_decode_error(builder(20_000, 10), f"at most {DEFAULT_MAX_SIDE}")


def test_png_100000_square_bomb() -> None:
    data = png_header_only(100_000, 100_000)
    assert len(data) < 100
    assert_decode_error(data, "decompression bomb")


def test_real_compressed_bomb_is_rejected_before_decoding() -> None:
    data = png_zero_bomb(4000, 4000)  # 16 MP of zeros in ~16 kB
    assert len(data) < 100_000
    assert_decode_error(data, "at most 1000000", max_pixels=1_000_000)
    assert decode_image(data).size == (4000, 4000)  # allowed under the default limit


def test_caller_limits() -> None:
    data = encode(rgb(300, 200), "PNG")
    assert decode_image(data).size == (300, 200)
    assert_decode_error(data, "300x200 pixels; width and height may be at most 256", max_side=256)
    assert_decode_error(data, "60000 pixels; at most 50000", max_pixels=50_000)
    assert decode_image(data, max_side=300, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ValueError, match="positive"):
        decode_image(data, max_pixels=0)


def test_pillow_global_limits_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    decode_image(encode(rgb(30, 20), "PNG"), max_pixels=10**10, max_side=10**6)
    assert_decode_error(png_header_only(8_000, 8_000), "at most", max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------- config


def test_config_defaults_and_round_trip() -> None:
    cfg = config()
    assert cfg.size == (224, 224)
    assert cfg.mean == (0.0, 0.0, 0.0)
    assert (cfg.resize, cfg.crop, cfg.interpolation) == ("shortest", "center", "bicubic")
    assert (cfg.channels, cfg.invert, cfg.fill) == ("RGB", False, 0)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fill = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"size": 224}, "size"),
        ({"size": "224"}, "size"),
        ({"size": [224]}, "size"),
        ({"size": [224, 224, 3]}, "size"),
        ({"size": [0, 224]}, "size"),
        ({"size": [224.0, 224]}, "size"),
        ({"size": [True, 224]}, "size"),
        ({"size": [100_000, 224]}, "size"),
        ({"resize": "fit"}, "resize"),
        ({"resize": None}, "resize"),
        ({"crop": "left"}, "crop"),
        ({"crop": "none"}, "crop"),  # with the default resize "shortest"
        ({"interpolation": "cubic"}, "interpolation"),
        ({"channels": "RGBA"}, "channels"),
        ({"channels": "L"}, "mean"),  # three means for one channel
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
        ({"mean": ["0", 0, 0]}, "mean"),
        ({"mean": 0.5}, "mean"),
        ({"std": [1, 0, 1]}, "std"),
        ({"std": [1, -1, 1]}, "std"),
        ({"std": [1, 1, float("inf")]}, "std"),
        ({"invert": "yes"}, "invert"),
        ({"invert": 1}, "invert"),
        ({"fill": 256}, "fill"),
        ({"fill": -1}, "fill"),
        ({"fill": 1.5}, "fill"),
        ({"fill": True}, "fill"),
    ],
)
def test_config_validation(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"preprocess\.{field}:"):
        config(**overrides)


def test_config_structure_errors() -> None:
    with pytest.raises(ValueError, match="unknown field.*colour"):
        config(colour="red")
    with pytest.raises(ValueError, match="missing required field.*mean, std"):
        PreprocessConfig.from_dict({"size": [224, 224]})
    with pytest.raises(ValueError, match="mapping"):
        PreprocessConfig.from_dict([("size", [1, 1])])  # type: ignore[arg-type]


def test_valid_alternatives() -> None:
    gray = config(channels="L", mean=[0.5], std=[0.25], resize="longest", crop="none")
    assert gray.num_channels == 1
    squash = config(resize="squash", crop="none", interpolation="lanczos", fill=255)
    assert squash.fill == 255


def test_from_open_clip_mapping() -> None:
    vit_b_32 = {
        "size": (224, 224),
        "mode": "RGB",
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    cfg = PreprocessConfig.from_open_clip(vit_b_32)
    assert cfg == config(mean=list(OPENAI_MEAN), std=list(OPENAI_STD))

    siglip = PreprocessConfig.from_open_clip(
        {"size": 256, "mean": 0.5, "std": (0.5,) * 3, "resize_mode": "squash"}
    )
    assert siglip.size == (256, 256)
    assert siglip.mean == (0.5, 0.5, 0.5)
    assert (siglip.resize, siglip.crop) == ("squash", "none")

    assert PreprocessConfig.from_open_clip({}).mean == OPENAI_MEAN
    assert PreprocessConfig.from_open_clip({"mean": None}).mean == OPENAI_MEAN
    assert PreprocessConfig.from_open_clip({"interpolation": "random"}).interpolation == "bicubic"
    bilinear = {"interpolation": "bilinear"}
    assert PreprocessConfig.from_open_clip(bilinear).interpolation == "bilinear"
    # open_clip's non-square "shortest" path ignores the interpolation and uses bicubic.
    wide = PreprocessConfig.from_open_clip({**bilinear, "size": (224, 320)})
    assert wide.interpolation == "bicubic"
    longest = PreprocessConfig.from_open_clip({**bilinear, "resize_mode": "longest"})
    assert (longest.interpolation, longest.crop) == ("bilinear", "center")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"mode": "L"}, r"open_clip\.mode"),
        ({"interpolation": "nearest"}, r"open_clip\.interpolation"),
        ({"resize_mode": "fit"}, r"open_clip\.resize_mode"),
        ({"size": (224,)}, r"open_clip\.size"),
        ({"image_size": 224}, "unknown key"),
        ({"fill_color": 300}, r"preprocess\.fill"),
    ],
)
def test_from_open_clip_rejects(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessConfig.from_open_clip(cfg)


# ---------------------------------------------------------------------------- transform


def test_output_shape_dtype_and_empty_batch() -> None:
    pre = Preprocessor(config(size=[160, 96]))
    out = pre([rgb(300, 200), rgb(50, 80), rgb(96, 160)])
    assert out.shape == (3, 3, 160, 96)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert pre.output_shape == (3, 160, 96)
    assert pre([]).shape == (0, 3, 160, 96)
    assert pre.preprocess_bytes([]).shape == (0, 3, 160, 96)


def test_grayscale_model_output() -> None:
    pre = Preprocessor({"size": [28, 28], "mean": [0.5], "std": [0.5], "channels": "L"})
    color = rgb(100, 90)
    out = pre([color, color.convert("L"), color.convert("RGBA")])
    assert out.shape == (3, 1, 28, 28)
    # RGB is reduced with Pillow's ITU-R 601-2 luma before resizing.
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    assert out.min() >= -1 and out.max() <= 1


def test_grayscale_input_for_rgb_model_repeats_channels() -> None:
    out = Preprocessor(config())([rgb(120, 100).convert("L")])
    np.testing.assert_array_equal(out[0, 0], out[0, 1])
    np.testing.assert_array_equal(out[0, 0], out[0, 2])


def test_normalisation_values() -> None:
    pre = Preprocessor(config(size=[8, 8], mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]))
    out = pre([Image.new("RGB", (10, 10), (51, 102, 255))])
    expected = [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (1.0 - 0.3) / 2.0]
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
    assert np.ptp(out[0], axis=(1, 2)).max() == 0


def test_invert() -> None:
    pre = Preprocessor({"size": [4, 4], "mean": [0], "std": [1], "channels": "L", "invert": True})
    white, black = Image.new("L", (6, 6), 255), Image.new("L", (6, 6), 0)
    out = pre([white, black, Image.new("L", (6, 6), 51)])
    assert (out[0] == 0).all()
    assert (out[1] == 1).all()
    np.testing.assert_allclose(out[2], 0.8, rtol=1e-6)
    normalised = Preprocessor(
        {"size": [4, 4], "mean": [0.5], "std": [0.5], "channels": "L", "invert": True}
    )
    assert (normalised([black]) == 1).all()  # (1 - 0 - 0.5) / 0.5


def test_longest_pads_with_fill_before_invert() -> None:
    pre = Preprocessor(
        {
            "size": [224, 224],
            "mean": [0],
            "std": [1],
            "channels": "L",
            "resize": "longest",
            "crop": "none",
            "fill": 255,
            "invert": True,
        }
    )
    out = pre([Image.new("L", (200, 100), 0)])[0, 0]
    # 200x100 -> 224x112, centred: rows 56..167 are the (inverted black) image.
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] == 1).all()


def test_squash_ignores_aspect_ratio() -> None:
    pre = Preprocessor(config(size=[10, 20], resize="squash", crop="none", interpolation="nearest"))
    a = np.zeros((100, 30, 3), np.uint8)
    a[:50] = 255
    out = pre([Image.fromarray(a)])
    assert out.shape == (1, 3, 10, 20)
    assert (out[0, :, :5] == 1).all() and (out[0, :, 5:] == 0).all()


def test_alpha_inputs_are_composited_like_decode() -> None:
    color = smooth(90, 70, 3, seed=5)
    alpha = smooth(90, 70, 1, seed=6)
    rgba = Image.fromarray(np.dstack([color, alpha]))
    pre = Preprocessor(config())
    expected = pre([Image.fromarray(over_white(color, alpha))])
    np.testing.assert_array_equal(pre([rgba]), expected)
    np.testing.assert_array_equal(pre.preprocess_bytes([encode(rgba, "PNG")]), expected)


def test_preprocess_bytes_matches_decode_then_call() -> None:
    pre = Preprocessor(config(size=[64, 48]))
    blobs = [encode(rgb(120, 90, seed=s), fmt) for s, fmt in enumerate(["PNG", "JPEG", "WEBP"])]
    np.testing.assert_array_equal(
        pre.preprocess_bytes(blobs), pre([decode_image(b) for b in blobs])
    )


def test_preprocess_bytes_reports_the_bad_index() -> None:
    pre = Preprocessor(config(size=[32, 32]))
    good = encode(rgb(40, 40), "PNG")
    with pytest.raises(ImageDecodeError, match="^image 2: .*zero bytes") as info:
        pre.preprocess_bytes([good, good, b"", good])
    assert info.value.index == 2
    with pytest.raises(ImageDecodeError, match="at most 100"):
        pre.preprocess_bytes([good], max_pixels=100)


def test_type_errors() -> None:
    pre = Preprocessor(config())
    with pytest.raises(TypeError):
        pre(rgb(10, 10))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pre([np.zeros((10, 10, 3), np.uint8)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        pre.preprocess_bytes(encode(rgb(10, 10), "PNG"))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(1, 16384), (16384, 1), (3, 12000), (12000, 3)])
def test_extreme_aspect_ratio_stays_small_and_fast(shape: tuple[int, int]) -> None:
    w, h = shape
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    start = time.perf_counter()
    out = Preprocessor(config())([img])
    assert time.perf_counter() - start < 1.0
    assert out.shape == (1, 3, 224, 224)


@pytest.fixture
def cropped_resize(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Select the resize path: "full", "cropped" (exact passes allowed) or "boxed"."""

    def use(path: str) -> None:
        entry = 1 << 60 if path == "full" else 0
        exact_pass = 0 if path == "boxed" else 1 << 22
        monkeypatch.setattr(transform_module, "_MAX_INTERMEDIATE_PIXELS", entry)
        monkeypatch.setattr(transform_module, "_MAX_EXACT_PASS_PIXELS", exact_pass)

    yield use


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest", "box"])
@pytest.mark.parametrize("size", [[224, 224], [224, 320], [320, 224]])
def test_cropped_resize_path(
    cropped_resize: Callable[[str], None], interpolation: str, size: list[int]
) -> None:
    """The memory-bounded path is exact while its passes are cheap, otherwise within one
    8-bit step per boxed pass for smooth filters (documented in server/imaging/transform.py)."""
    pre = Preprocessor(config(size=size, interpolation=interpolation))
    rng = np.random.default_rng(1)
    for w, h in [(1000, 223), (2000, 90), (300, 37), (90, 2000), (37, 300)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cropped_resize("full")
        full = pre([img])
        for path in ("cropped", "boxed"):
            cropped_resize(path)
            diff = np.abs(pre([img]) - full)
            if path == "cropped" and w > h:
                assert diff.max() == 0, (w, h)
            elif interpolation in ("bicubic", "bilinear", "lanczos"):
                steps = 2 if path == "boxed" else 1
                assert diff.max() <= steps / 255 + 1e-6, (w, h, path)
                assert (diff > 0).mean() < 0.05, (w, h, path)


# ---------------------------------------------------------------------------- isolation


def test_import_does_not_pull_in_torch() -> None:
    code = (
        "import sys, server.imaging\n"
        "bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=repo)


# ---------------------------------------------------------------------------- open_clip parity


def parity_images() -> dict[str, Image.Image]:
    images = {
        f"rgb{w}x{h}": rgb(w, h, seed=i)
        for i, (w, h) in enumerate(
            [
                (50, 40),  # smaller than the target both ways
                (7, 5),
                (37, 300),  # thin and tall, smaller on one side
                (640, 480),  # larger, landscape
                (480, 640),  # larger, portrait
                (224, 224),  # exactly the target
                (301, 225),
                (225, 301),
                (1000, 223),
                (333, 334),
            ]
        )
    }
    images["L333x250"] = Image.fromarray(smooth(333, 250, 1, seed=20))
    images["L90x400"] = Image.fromarray(smooth(90, 400, 1, seed=21))
    images["RGBA320x200"] = Image.fromarray(
        np.dstack([smooth(320, 200, 3, seed=22), smooth(320, 200, 1, seed=23)])
    )
    images["LA120x300"] = Image.merge(
        "LA", [Image.fromarray(smooth(120, 300, 1, seed=s)) for s in (24, 25)]
    )
    palette = rgb(400, 300, seed=26).quantize(64)
    images["P400x300"] = palette
    with_alpha = palette.copy()
    with_alpha.info["transparency"] = 3
    images["P400x300-trns"] = with_alpha
    return images


# (name, overrides on open_clip's PreprocessCfg defaults) -- the pretrained configs
# open_clip ships (pretrained.py: _pcfg, _slpcfg, _apcfg, _mccfg) plus every resize mode
# with square and non-square targets.
OPEN_CLIP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("siglip-webli", {"mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"}),
    (
        "clipa-imagenet-bilinear-squash",
        {
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "interpolation": "bilinear",
            "resize_mode": "squash",
        },
    ),
    (
        "mobileclip-256-bilinear-shortest",
        {"size": 256, "mean": (0.0,) * 3, "std": (1.0,) * 3, "interpolation": "bilinear"},
    ),
    ("longest-bicubic-fill128", {"resize_mode": "longest", "fill_color": 128}),
    ("longest-bilinear", {"resize_mode": "longest", "interpolation": "bilinear"}),
    ("shortest-224x320", {"size": (224, 320)}),
    ("shortest-320x224-bilinear", {"size": (320, 224), "interpolation": "bilinear"}),
    (
        "longest-224x320-fill255",
        {
            "size": (224, 320),
            "resize_mode": "longest",
            "interpolation": "bilinear",
            "fill_color": 255,
        },
    ),
    ("squash-320x224", {"size": (320, 224), "resize_mode": "squash"}),
    ("shortest-384-random", {"size": 384, "interpolation": "random"}),
]


@pytest.fixture(scope="module")
def open_clip_vit_b_32() -> tuple[dict[str, Any], Any]:
    open_clip = pytest.importorskip("open_clip")
    model, _, preprocess_val = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return dict(model.visual.preprocess_cfg), preprocess_val


def assert_parity(
    ours: Preprocessor, theirs: Callable[[Image.Image], Any], images: dict[str, Image.Image]
) -> None:
    diffs = {}
    for name, img in images.items():
        mine = ours([img])[0]
        # open_clip is handed the image as our pipeline sees it (RGB or L); see
        # test_raw_alpha_and_palette_inputs_differ_from_open_clip for raw RGBA/P inputs.
        reference = theirs(to_model_mode(img)).numpy()
        assert mine.shape == reference.shape, name
        diffs[name] = float(np.abs(mine - reference).max())
    assert max(diffs.values()) <= 1e-5, diffs


def test_parity_vit_b_32(open_clip_vit_b_32: tuple[dict[str, Any], Any]) -> None:
    cfg, preprocess_val = open_clip_vit_b_32
    ours = PreprocessConfig.from_open_clip(cfg)
    assert ours == config(mean=list(OPENAI_MEAN), std=list(OPENAI_STD))
    assert_parity(Preprocessor(ours), preprocess_val, parity_images())


@pytest.mark.parametrize(
    ("name", "overrides"), OPEN_CLIP_CASES, ids=[c[0] for c in OPEN_CLIP_CASES]
)
def test_parity_open_clip_configs(name: str, overrides: dict[str, Any]) -> None:
    pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), overrides)
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    ours = Preprocessor(PreprocessConfig.from_open_clip(cfg))
    assert_parity(ours, theirs, parity_images())


def test_parity_through_decode(open_clip_vit_b_32: tuple[dict[str, Any], Any]) -> None:
    cfg, preprocess_val = open_clip_vit_b_32
    pre = Preprocessor(PreprocessConfig.from_open_clip(cfg))
    blobs = [
        encode(rgb(500, 375, seed=30), "JPEG", quality=90),
        encode(rgb(180, 260, seed=31), "PNG"),
        encode(rgb(300, 300, seed=32).convert("L"), "PNG"),
        encode(rgb(256, 200, seed=33), "WEBP"),
    ]
    ours = pre.preprocess_bytes(blobs)
    for i, blob in enumerate(blobs):
        reference = preprocess_val(decode_image(blob)).numpy()
        assert float(np.abs(ours[i] - reference).max()) <= 1e-5


def test_raw_alpha_and_palette_inputs_differ_from_open_clip(
    open_clip_vit_b_32: tuple[dict[str, Any], Any],
) -> None:
    """Documents the one intended difference: open_clip resizes RGBA/P images in their own
    mode and then drops alpha (transparent pixels keep whatever colour they hold; palette
    images are resized nearest-neighbour); we composite over white and expand first."""
    cfg, preprocess_val = open_clip_vit_b_32
    pre = Preprocessor(PreprocessConfig.from_open_clip(cfg))
    transparent_red = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    ours = pre([transparent_red])[0]
    theirs = preprocess_val(transparent_red).numpy()
    white = (1.0 - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    np.testing.assert_allclose(ours[:, 0, 0], white, rtol=1e-6)
    assert np.abs(ours - theirs).max() > 1.0
