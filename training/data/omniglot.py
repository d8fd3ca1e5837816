"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) from its zips or unpacked folders.

Layout inside a zip or folder: ``[<set>/]<Alphabet>/<characterNN>/<id>_<drawer>.png``. Each
character is one class named ``"<Alphabet>/<characterNN>"`` whose superclass is its alphabet;
the drawer (1..20) of every image is kept. Files that appear in several sources (Greek and Latin
are in both small background sets) are merged; the same path with different bytes is an error.
The two small background sets give 8 alphabets, 242 characters, 4,840 images.

Pixels go through the serving preprocessor (see ``pixels.py``) with ``omniglot_preprocess``:
squash 105x105 to ``size``, box filter, one channel, ink inverted to 1 on a 0 background.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.imaging import PreprocessConfig
from training.data.imageset import DEFAULT_DATA_ENV, ImageSet
from training.data.pixels import pixels_from_bytes

BACKGROUND_SETS = ("images_background_small1", "images_background_small2")


def data_root() -> Path:
    """``$PROTOSERVE_DATA``, else ``<repo>/../shared/data`` (where CI puts shared/)."""
    env = os.environ.get(DEFAULT_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_sources(root: str | Path | None = None) -> list[Path]:
    """The two small background sets under ``<root>/omniglot``, unpacked folders preferred."""
    base = Path(root) if root is not None else data_root() / "omniglot"
    found = []
    for name in BACKGROUND_SETS:
        folder, archive = base / name, base / f"{name}.zip"
        if folder.is_dir():
            found.append(folder)
        elif archive.is_file():
            found.append(archive)
        else:
            raise FileNotFoundError(
                f"Omniglot set {name} not found: looked for {folder}/ and {archive} "
                f"(set ${DEFAULT_DATA_ENV} or pass the sources explicitly)"
            )
    return found


def omniglot_preprocess(
    size: int | Sequence[int] = 28,
    interpolation: str = "box",
    invert: bool = True,
    crop: str = "none",
    ink_margin: float = 0.15,
) -> dict[str, Any]:
    """The server ``PreprocessConfig`` (dict form) for Omniglot-style ink drawings; ``crop="ink"``
    cuts the square around the drawing first (``ink_margin`` of its side on each side)."""
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return PreprocessConfig(  # validated; its manifest form names ink_margin only for "ink"
        size=hw,
        resize="squash",
        crop=crop,
        ink_margin=ink_margin,
        interpolation=interpolation,
        mean=(0.0,),
        std=(1.0,),
        channels="L",
        invert=invert,
        fill=255,
    ).to_dict()


def _files(source: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    if source.is_dir():
        for path in sorted(source.rglob("*.png")):
            yield path.relative_to(source).parts, path.read_bytes()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for name in sorted(zf.namelist()):
                if name.lower().endswith(".png"):
                    yield tuple(name.split("/")), zf.read(name)
    else:
        raise FileNotFoundError(f"{source} is neither a folder nor a zip file")


def load_omniglot(
    sources: Sequence[str | Path] | None = None,
    *,
    size: int | Sequence[int] = 28,
    interpolation: str = "box",
    invert: bool = True,
    crop: str = "none",
    ink_margin: float = 0.15,
    preprocess: dict[str, Any] | None = None,
) -> ImageSet:
    """Loads and merges Omniglot sources (default: the two small background sets)."""
    paths = [Path(s) for s in sources] if sources else default_sources()
    pre = preprocess or omniglot_preprocess(size, interpolation, invert, crop, ink_margin)
    files: dict[tuple[str, str, str], bytes] = {}
    for source in paths:
        for parts, data in _files(source):
            if len(parts) < 3:
                raise ValueError(f"{source}: {'/'.join(parts)} is not <alphabet>/<char>/<file>")
            key = (parts[-3], parts[-2], parts[-1])
            if key in files and files[key] != data:
                raise ValueError(f"{'/'.join(key)} differs between sources: cannot merge")
            files[key] = data
    if not files:
        raise ValueError(f"no PNG files in {', '.join(map(str, paths))}")
    keys = sorted(files)
    classes = sorted({f"{a}/{c}" for a, c, _ in keys})
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[f"{a}/{c}"] for a, c, _ in keys], dtype=np.int64)
    drawers = np.array([_drawer(f) for _, _, f in keys], dtype=np.int64)
    return ImageSet(
        images=pixels_from_bytes((files[k] for k in keys), pre),
        labels=labels,
        classes=classes,
        superclasses=[name.split("/")[0] for name in classes],
        preprocess=pre,
        drawers=drawers,
    )


def _drawer(filename: str) -> int:
    stem = filename.rsplit(".", 1)[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1
