"""Synthetic Omniglot-like glyphs (black strokes on white, 105x105) for the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.data.imageset import ImageSet
from training.data.omniglot import omniglot_preprocess
from training.data.pixels import pixels_from_images


def glyph(
    cls: int, shift: tuple[int, int] = (0, 0), width: int = 9, size: int = 105
) -> Image.Image:
    """Class ``cls``'s glyph: a seeded random 4-point stroke, moved by ``shift`` pixels."""
    rng = np.random.default_rng(1000 + cls)
    points = [tuple(int(v) for v in rng.integers(20, size - 20, 2) + shift) for _ in range(4)]
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).line(points, fill=0, width=width, joint="curve")
    return img


def glyph_set(n_classes: int = 12, per_class: int = 8, size: int = 16, groups: int = 3) -> ImageSet:
    """An ImageSet of ``n_classes`` glyphs, each drawn ``per_class`` times with small shifts and
    stroke widths (drawers 1..per_class); superclasses ``g0..`` group the classes."""
    rng = np.random.default_rng(0)
    images, labels, drawers = [], [], []
    for c in range(n_classes):
        for d in range(per_class):
            shift = (int(rng.integers(-6, 7)), int(rng.integers(-6, 7)))
            images.append(glyph(c, shift, width=int(rng.integers(6, 12))))
            labels.append(c)
            drawers.append(d + 1)
    pre = omniglot_preprocess(size)
    return ImageSet(
        images=pixels_from_images(images, pre),
        labels=np.array(labels),
        classes=[f"g{c % groups}/char{c:02d}" for c in range(n_classes)],
        superclasses=[f"g{c % groups}" for c in range(n_classes)],
        preprocess=pre,
        drawers=np.array(drawers),
    )


def write_run(folder: Path, n: int = 20, labels: list[int] | None = None) -> Path:
    """A one-shot run folder: training/classNN.png = glyph NN, test/itemNN.png = a shifted copy
    of glyph ``perm[NN]``; class_labels.txt gives test item -> ``labels[NN]`` (default: the
    truth). Returns the folder."""
    perm = np.random.default_rng(7).permutation(n)
    (folder / "training").mkdir(parents=True)
    (folder / "test").mkdir()
    for c in range(n):
        glyph(c).save(folder / "training" / f"class{c + 1:02d}.png")
    for i, c in enumerate(perm):
        glyph(int(c), shift=(3, -2)).save(folder / "test" / f"item{i + 1:02d}.png")
    answer = list(perm) if labels is None else labels
    run = folder.name
    (folder / "class_labels.txt").write_text(
        "".join(
            f"{run}/test/item{i + 1:02d}.png {run}/training/class{int(c) + 1:02d}.png\n"
            for i, c in enumerate(answer)
        )
    )
    return folder


def true_labels(n: int = 20) -> list[int]:
    return [int(c) for c in np.random.default_rng(7).permutation(n)]
