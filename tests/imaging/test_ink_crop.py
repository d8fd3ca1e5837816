"""``crop="ink"``: the square around a drawing on a plain page, checked on hand-built pages."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.imaging import Preprocessor
from server.imaging.transform import _without_specks, ink_square
from tests.imaging.helpers import config


def _page(h: int, w: int, boxes: list[tuple[int, int, int, int]], mode: str = "L") -> Image.Image:
    """White page with black filled boxes (top, bottom, left, right; inclusive)."""
    a = np.full((h, w), 255, np.uint8)
    for t, b, left, r in boxes:
        a[t : b + 1, left : r + 1] = 0
    img = Image.fromarray(a)
    return img.convert(mode) if mode != "L" else img


def test_square_around_the_ink_by_hand() -> None:
    # Ink rows 5..9, cols 10..19: longer side 10, grown by 0.5 each side -> 20. Centre (7, 14.5):
    # the square starts at x 4.5 -> 5 (halves round up), y -3 (3 rows of padding above the page).
    out = np.asarray(ink_square(_page(20, 30, [(5, 9, 10, 19)]), fill=255, margin=0.5))
    assert out.shape == (20, 20)
    want = np.full((20, 20), 255, np.uint8)
    want[8:13, 5:15] = 0
    np.testing.assert_array_equal(out, want)


def test_no_margin_and_blank_pages() -> None:
    # Ink rows 2..3, cols 4..7: side 4, centre (2.5, 5.5), so the square starts at row 0.5 -> 1
    # and column 3.5 -> 4.
    out = np.asarray(ink_square(_page(12, 12, [(2, 3, 4, 7)]), fill=255, margin=0.0))
    assert out.shape == (4, 4) and (out[1:3] == 0).all() and (out[[0, 3]] == 255).all()
    blank = _page(9, 7, [])
    assert ink_square(blank, fill=255, margin=0.15) is blank
    # Faint marks (luma within 127 of the page) are not ink.
    faint = Image.fromarray(np.full((9, 7), 130, np.uint8))
    assert ink_square(faint, fill=255, margin=0.15) is faint


def test_specks_do_not_move_the_box() -> None:
    """A lone dark pixel far from the drawing is a speck, not ink: the square is the clean
    page's. Two touching pixels are a mark and count; a page of nothing but specks keeps them."""
    drawing = (5, 9, 10, 19)
    clean = np.asarray(ink_square(_page(20, 30, [drawing]), fill=255, margin=0.5))
    specked = _page(20, 30, [drawing, (0, 0, 0, 0), (18, 18, 28, 28), (0, 0, 29, 29)])
    np.testing.assert_array_equal(np.asarray(ink_square(specked, fill=255, margin=0.5)), clean)
    mark = np.asarray(ink_square(_page(20, 30, [drawing, (18, 18, 27, 28)]), fill=255, margin=0))
    assert mark.shape == (19, 19)  # rows 5..18, columns 10..28: the mark grows the box
    dots = _page(12, 12, [(2, 2, 2, 2), (8, 8, 8, 8)])  # rows and columns 2..8
    assert np.asarray(ink_square(dots, fill=255, margin=0.0)).shape == (7, 7)


def test_colour_pages_and_dark_backgrounds() -> None:
    out = ink_square(_page(20, 30, [(5, 9, 10, 19)], mode="RGB"), fill=255, margin=0.5)
    assert out.mode == "RGB" and out.size == (20, 20)
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]
    light_on_dark = Image.fromarray(255 - np.asarray(_page(20, 30, [(5, 9, 10, 19)])))
    assert np.asarray(ink_square(light_on_dark, fill=0, margin=0.5)).shape == (20, 20)


def test_same_drawing_anywhere_and_any_size_gives_the_same_input() -> None:
    """What the crop is for: a character drawn small in a corner or large in the middle."""
    pre = Preprocessor(
        config(
            size=[16, 16],
            resize="squash",
            crop="ink",
            ink_margin=0.5,
            channels="L",
            mean=[0.0],
            std=[1.0],
            interpolation="box",
            invert=True,
            fill=255,
        )
    )
    # A "T" in an 8 x 8 box, at 2 and 6 pixels per unit: both squares (twice the box) shrink to
    # 16 px by a whole factor, with the box on the same pixel grid, so the inputs are equal.
    glyph = [(0, 1, 0, 7), (2, 7, 3, 4)]

    def drawn(top: int, left: int, scale: int) -> Image.Image:
        boxes = [
            (
                top + t * scale,
                top + (b + 1) * scale - 1,
                left + lf * scale,
                left + (r + 1) * scale - 1,
            )
            for t, b, lf, r in glyph
        ]
        return _page(105, 105, boxes)

    small, large = pre([drawn(4, 80, 2)])[0], pre([drawn(20, 30, 6)])[0]
    np.testing.assert_allclose(small, large, atol=1e-6)
    uncropped = Preprocessor(config(**{**pre.config.to_dict(), "crop": "none"}))
    a, b = uncropped([drawn(4, 80, 2)])[0], uncropped([drawn(20, 30, 6)])[0]
    assert np.abs(a - b).max() > 0.5


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"crop": "ink"}, r"crop: 'ink' needs resize"),  # the default resize is "shortest"
        ({"crop": "ink", "resize": "squash", "ink_margin": -0.1}, r"ink_margin: must be"),
        ({"crop": "ink", "resize": "squash", "ink_margin": "wide"}, r"ink_margin: must be"),
        ({"crop": "ink", "resize": "squash", "ink_margin": True}, r"ink_margin: must be"),
    ],
)
def test_ink_config_errors(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**overrides)


def test_manifest_form_names_the_margin_only_for_the_ink_crop() -> None:
    ink = config(size=[8, 8], resize="squash", crop="ink", ink_margin=0.3)
    assert ink.to_dict()["ink_margin"] == 0.3 and type(ink).from_dict(ink.to_dict()) == ink
    assert "ink_margin" not in config(size=[8, 8], resize="squash", crop="none").to_dict()


def test_without_specks_matches_counting_the_8_neighbours() -> None:
    """The two-pass 3x3 sums against the definition: keep ink with any of its 8 neighbours."""
    rng = np.random.default_rng(5)
    cases = [rng.random((h, w)) < p for h, w in ((105, 105), (7, 3), (1, 9)) for p in (0.02, 0.3)]
    cases += [np.zeros((4, 4), bool), np.eye(6, dtype=bool), np.ones((1, 1), bool)]
    for ink in cases:
        h, w = ink.shape
        padded = np.pad(ink, 1)
        neighbours = sum(
            padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].astype(int)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy, dx) != (0, 0)
        )
        kept = ink & (neighbours > 0)
        np.testing.assert_array_equal(_without_specks(ink), kept if kept.any() else ink)
