"""Any ImageFolder tree: ``root/<class>/<image>``, or ``root/<superclass>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.data.imageset import ImageSet
from training.data.pixels import pixels_from_bytes

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def default_preprocess(size: int = 84, channels: str = "RGB") -> dict[str, Any]:
    n = 3 if channels == "RGB" else 1
    return {
        "size": [size, size],
        "resize": "shortest",
        "crop": "center",
        "interpolation": "bicubic",
        "mean": [0.0] * n,
        "std": [1.0] * n,
        "channels": channels,
        "invert": False,
        "fill": 0,
    }


def load_image_folder(
    root: str | Path, *, preprocess: dict[str, Any] | None = None, superclasses: bool = False
) -> ImageSet:
    """Classes are the leaf folders, sorted; with ``superclasses`` their parents group them."""
    root = Path(root)
    pre = preprocess or default_preprocess()
    depth = 2 if superclasses else 1
    files = sorted(
        p
        for p in root.glob("/".join(["*"] * (depth + 1)))
        if p.is_file() and p.suffix.lower() in EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no images at depth {depth + 1} under {root}")
    names = [str(p.parent.relative_to(root).as_posix()) for p in files]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet(
        images=pixels_from_bytes((p.read_bytes() for p in files), pre),
        labels=np.array([index[n] for n in names], dtype=np.int64),
        classes=classes,
        superclasses=[c.split("/")[0] if superclasses else "all" for c in classes],
        preprocess=pre,
    )
