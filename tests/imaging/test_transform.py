"""Preprocessing (server.imaging): config validation, the transform, and no torch import."""

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import server.imaging.transform as transform_module
from server.imaging import (
    ImageDecodeError,
    PreprocessConfig,
    Preprocessor,
    decode_image,
)
from tests.imaging.helpers import (
    OPENAI_MEAN,
    OPENAI_STD,
    config,
    encode,
    over_white,
    rgb,
    smooth,
)

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
