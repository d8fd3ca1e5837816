"""``ImageSet``: a labelled image collection held in memory, the one type every loader returns.

Pixels are stored as uint8 ``[N, C, H, W]``: the resized 8-bit pixels the serving
preprocessor computes before it scales, inverts and normalises. ``batch`` scales (and inverts,
where the config says so) with the preprocessor's own float32 operations, giving [0, 1] tensors;
``normalise`` applies the config's mean/std, so training sees bit for bit what the server feeds
the model for the same file.

Quarter-turn rotations make extra classes (Vinyals et al. 2016): with ``rotations=(0, 1, 2, 3)``
class ``v`` is base class ``v // 4`` turned ``v % 4`` times 90 degrees counter-clockwise, and
its superclass is ``"<superclass>/rot<r>"`` (a rotated alphabet is a new alphabet).
Codes 4..7 mirror the image left-right first, then turn it ``code - 4`` quarter turns: the
eight codes are the symmetries of the square, and a mirrored alphabet (``"<superclass>/mir<r>"``)
is a new alphabet too (a mirrored character is in general another character, as b and d).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_DATA_ENV = "PROTOSERVE_DATA"
MIRRORED = 4  # view codes from here on are mirrored first


def _view_name(code: int) -> str:
    return f"rot{code}" if code < MIRRORED else f"mir{code - MIRRORED}"


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, C, H, W], resized, not yet inverted
    labels: np.ndarray  # int64 [N], base class of each image
    classes: list[str]  # base class names
    superclasses: list[str]  # superclass (alphabet) of each base class
    preprocess: dict[str, Any]  # server PreprocessConfig (to_dict form) reproducing the pixels
    drawers: np.ndarray | None = None  # int64 [N] drawer/source id, where known
    rotations: tuple[int, ...] = (0,)
    _by_class: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}"
            )
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels {self.labels.shape}")
        if len(self.superclasses) != len(self.classes):
            raise ValueError("one superclass per class is needed")
        if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError("labels must index classes")
        if not set(self.rotations) <= set(range(8)) or len(set(self.rotations)) != len(
            self.rotations
        ):
            raise ValueError(
                "rotations must be distinct codes 0..7 (quarter turns, 4..7 mirrored first), "
                f"got {self.rotations}"
            )
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.classes) + 1))
        self._by_class = [order[bounds[c] : bounds[c + 1]] for c in range(len(self.classes))]

    # -- classes, rotations included ----------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes) * len(self.rotations)

    def base_class(self, cls: int) -> int:
        return cls // len(self.rotations)

    def rotation(self, cls: int) -> int:
        return self.rotations[cls % len(self.rotations)]

    def indices_of(self, cls: int) -> np.ndarray:
        """Image indices of class ``cls`` (a rotated class shares its base class's images)."""
        return self._by_class[self.base_class(cls)]

    def superclass_of(self, cls: int) -> str:
        sup = self.superclasses[self.base_class(cls)]
        return sup if self.rotations == (0,) else f"{sup}/{_view_name(self.rotation(cls))}"

    def class_name(self, cls: int) -> str:
        name = self.classes[self.base_class(cls)]
        return name if self.rotations == (0,) else f"{name}/{_view_name(self.rotation(cls))}"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    # -- pixels -------------------------------------------------------------------------
    def batch(self, indices: Sequence[int] | np.ndarray, turns: Sequence[int] | np.ndarray) -> Any:
        """Float32 tensor [B, C, H, W] in [0, 1]; image ``i`` under code ``turns[i]``: that many
        quarter turns, or for 4..7 mirrored left-right, then ``turns[i] - 4`` quarter turns."""
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        rot = np.asarray(turns, dtype=np.int64)
        if rot.shape != idx.shape:
            raise ValueError(f"{idx.shape[0]} indices but {rot.shape} turns")
        # the server preprocessor's own float32 operations, so the values are bit-identical
        arr = np.divide(self.images[idx], np.float32(255), dtype=np.float32)
        if self.preprocess.get("invert", False):
            np.subtract(np.float32(1), arr, out=arr)
        x = torch.from_numpy(arr)
        for r in np.unique(rot):
            if r:
                sel = torch.from_numpy(np.flatnonzero(rot == r))
                v = torch.flip(x[sel], dims=(3,)) if r >= MIRRORED else x[sel]
                x[sel] = torch.rot90(v, int(r) % MIRRORED, dims=(2, 3))
        return x

    def normalise(self, x: Any) -> Any:
        """Applies the preprocess mean/std to [0, 1] pixels (as the server does)."""
        import torch

        mean = torch.tensor(self.preprocess["mean"], dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess["std"], dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    # -- views --------------------------------------------------------------------------
    def with_rotations(self, rotations: Sequence[int]) -> ImageSet:
        return dataclasses.replace(self, rotations=tuple(rotations), _by_class=[])

    def subset(self, base_classes: Sequence[int]) -> ImageSet:
        """The images of ``base_classes`` (in that order), relabelled 0..len-1."""
        keep = list(base_classes)
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        mask = remap[self.labels] >= 0
        return dataclasses.replace(
            self,
            images=self.images[mask],
            labels=remap[self.labels[mask]],
            classes=[self.classes[c] for c in keep],
            superclasses=[self.superclasses[c] for c in keep],
            drawers=None if self.drawers is None else self.drawers[mask],
            _by_class=[],
        )

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float pixels (k/255 values) -> uint8 k, exactly."""
    return np.rint(np.asarray(x, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8)


def unit_preprocess(preprocess: dict[str, Any]) -> dict[str, Any]:
    """The same geometry with mean 0, std 1 and no inversion: the preprocessor then returns
    the resized 8-bit pixels divided by 255, which ``to_uint8`` recovers exactly."""
    n = 3 if preprocess.get("channels", "RGB") == "RGB" else 1
    return {**preprocess, "mean": [0.0] * n, "std": [1.0] * n, "invert": False}
