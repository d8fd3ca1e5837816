"""Preprocessing matches open_clip's own transforms (bit-exact on RGB and L inputs)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.imaging import (
    PreprocessConfig,
    Preprocessor,
    decode_image,
    to_model_mode,
)
from tests.imaging.helpers import (
    OPENAI_MEAN,
    OPENAI_STD,
    config,
    encode,
    rgb,
    smooth,
)

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
