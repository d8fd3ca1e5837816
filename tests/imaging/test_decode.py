"""Decoding (server.imaging): formats, EXIF, mode conversion, and bad input rejected fast."""

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from server.imaging import (
    DEFAULT_MAX_SIDE,
    decode_image,
    to_model_mode,
)
from tests.imaging.helpers import (
    assert_decode_error,
    encode,
    gif_header_only,
    jpeg_header_only,
    over_white,
    png_header_only,
    png_zero_bomb,
    rgb,
    smooth,
    tiff_header_only,
)

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
