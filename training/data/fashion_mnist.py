"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its IDX files, ``.gz`` or raw.

Debian's ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``. Classes
get superclasses (tops, bottoms, dresses, footwear, bags) for same-superclass episodes.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.imageset import ImageSet
from training.data.pixels import pixels_from_images

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SUPERCLASSES = [
    "top",
    "bottom",
    "top",
    "dress",
    "top",
    "footwear",
    "top",
    "footwear",
    "bag",
    "footwear",
]
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (unsigned-byte data) as a numpy array of its declared shape."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root / stem}[.gz] not found (apt-get install dataset-fashion-mnist, or pass root)"
    )


def load_fashion_mnist(
    root: str | Path = DEFAULT_ROOT,
    split: str = "train",
    *,
    size: int | Sequence[int] = 28,
    invert: bool = False,
) -> ImageSet:
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: images {images.shape} do not match labels {labels.shape}")
    hw = [size, size] if isinstance(size, int) else list(size)
    pre: dict[str, Any] = {
        "size": hw,
        "resize": "squash",
        "crop": "none",
        "interpolation": "bilinear",
        "mean": [0.0],
        "std": [1.0],
        "channels": "L",
        "invert": invert,
        "fill": 0,
    }
    if tuple(hw) == images.shape[1:]:
        pixels = images[:, None].copy()
    else:
        pixels = pixels_from_images([Image.fromarray(im) for im in images], pre)
    return ImageSet(pixels, labels, list(CLASSES), list(SUPERCLASSES), pre)
