"""``PreprocessConfig``: the ``preprocess`` section of a model manifest, validated."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PreprocessConfig"]

ResizeMode = Literal["shortest", "longest", "squash"]
CropMode = Literal["center", "none", "ink"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos", "box"]
Channels = Literal["RGB", "L"]

RESIZE_MODES = ("shortest", "longest", "squash")
CROP_MODES = ("center", "none", "ink")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box")
CHANNELS = ("RGB", "L")
MAX_OUTPUT_SIDE = 8192

# open_clip's defaults (open_clip/constants.py, PreprocessCfg), copied to stay torch-free.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn an image into the model's input tensor.

    size: output ``(height, width)``.
    resize: ``"shortest"`` scales so the image covers ``size`` and (with ``crop="center"``)
        centre-crops -- open_clip's default. For a square ``size`` this is torchvision's
        ``Resize(int)``: shorter side to the target, longer side ``int()``-truncated. For a
        non-square ``size`` it is open_clip's ``ResizeKeepRatio``: scale by the smaller of the two
        side ratios, both sides ``round()``-ed. ``"longest"`` scales so the image fits inside
        ``size`` (sides ``round()``-ed) and pads to ``size`` with ``fill``, image centred.
        ``"squash"`` resizes straight to ``size``, ignoring aspect ratio.
    crop: ``"center"`` crops (or pads) to ``size``; ``"none"`` never crops, so it is only valid
        where the resize cannot overshoot (``"longest"``, which still pads, and ``"squash"``).
        ``"ink"`` (drawings on a plain page, like Omniglot) first cuts the square around the
        drawing: the box of every pixel whose luma differs from ``fill`` by 128 or more (lone
        specks, with no such pixel among their 8 neighbours, left out), its longer side grown
        by ``ink_margin`` on each side, centred on the box and padded with
        ``fill`` where it leaves the page; a page with no ink is kept whole. Where and how large
        a character is drawn then no longer matters. Resizing follows as for ``"none"``.
    ink_margin: with ``crop="ink"``, the margin as a fraction of the box's longer side.
    interpolation: Pillow resampling filter used for resizing.
    mean, std: per-channel normalisation, one value per output channel.
    channels: ``"RGB"`` (3 channels) or ``"L"`` (1 channel, ITU-R 601-2 luma).
    invert: ``x -> 1 - x`` on [0, 1] values before normalisation (ink inversion).
    fill: 0-255 padding value, in source pixel space (before ``invert``), every channel.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: ResizeMode = "shortest"
    crop: CropMode = "center"
    interpolation: Interpolation = "bicubic"
    channels: Channels = "RGB"
    invert: bool = False
    fill: int = 0
    ink_margin: float = 0.15

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "size", _size(self.size))
        for name, options in (
            ("resize", RESIZE_MODES),
            ("crop", CROP_MODES),
            ("interpolation", INTERPOLATIONS),
            ("channels", CHANNELS),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in options:
                raise _error(name, f"must be one of {', '.join(options)}", value)
        n = 3 if self.channels == "RGB" else 1
        set_(self, "mean", _floats("mean", self.mean, n, positive=False))
        set_(self, "std", _floats("std", self.std, n, positive=True))
        if not isinstance(self.invert, bool):
            raise _error("invert", "must be true or false", self.invert)
        if not _is_int(self.fill) or not 0 <= self.fill <= 255:
            raise _error("fill", "must be an integer in 0..255", self.fill)
        if self.crop in ("none", "ink") and self.resize == "shortest":
            raise _error(
                "crop",
                f"{self.crop!r} needs resize 'longest' or 'squash' ('shortest' overshoots)",
                self.crop,
            )
        margin = self.ink_margin
        if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not 0 <= margin <= 4:
            raise _error("ink_margin", "must be a number in 0..4", margin)
        set_(self, "ink_margin", float(margin))

    @property
    def num_channels(self) -> int:
        return 3 if self.channels == "RGB" else 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build from a manifest mapping; ``ValueError`` names the first bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocess: expected a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - fields)
        if unknown:
            raise ValueError(f"preprocess: unknown field(s) {', '.join(unknown)}")
        missing = [name for name in ("size", "mean", "std") if name not in data]
        if missing:
            raise ValueError(f"preprocess: missing required field(s) {', '.join(missing)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (JSON-friendly); ``from_dict(to_dict())`` round-trips."""
        out = dataclasses.asdict(self)
        for key in ("size", "mean", "std"):
            out[key] = list(out[key])
        if self.crop != "ink":  # only the ink crop reads it
            del out["ink_margin"]
        return out

    @classmethod
    def from_open_clip(cls, preprocess_cfg: Mapping[str, Any]) -> PreprocessConfig:
        """Map open_clip's ``preprocess_cfg`` (``model.visual.preprocess_cfg``) to ours.

        Follows what open_clip's eval transform (``image_transform``) actually does: missing or
        ``None`` values take ``PreprocessCfg`` defaults; ``interpolation`` ``"bilinear"`` stays
        bilinear and ``"bicubic"``/``"random"`` mean bicubic; with ``resize_mode="shortest"``
        and a non-square size open_clip always resizes bicubic (its ``ResizeKeepRatio`` is built
        without the interpolation), so that case maps to bicubic; ``"squash"`` has no crop.
        """
        if not isinstance(preprocess_cfg, Mapping):
            raise ValueError(
                f"open_clip preprocess_cfg: expected a mapping, got {preprocess_cfg!r}"
            )
        unknown = sorted(set(map(str, preprocess_cfg)) - set(_OPEN_CLIP_KEYS))
        if unknown:
            raise ValueError(f"open_clip preprocess_cfg: unknown key(s) {', '.join(unknown)}")
        cfg = {k: v for k, v in preprocess_cfg.items() if v is not None}

        mode = cfg.get("mode", "RGB")
        if mode != "RGB":
            raise _error("mode", "open_clip supports only 'RGB'", mode, prefix="open_clip")
        size = cfg.get("size", 224)
        if _is_int(size):
            size = (size, size)
        size = _size(size, prefix="open_clip")
        mean: Any = cfg.get("mean") or OPENAI_DATASET_MEAN
        std: Any = cfg.get("std") or OPENAI_DATASET_STD
        if isinstance(mean, numbers.Real):
            mean = (mean,) * 3
        if isinstance(std, numbers.Real):
            std = (std,) * 3
        resize = cfg.get("resize_mode", "shortest")
        if resize not in RESIZE_MODES:
            raise _error(
                "resize_mode",
                "must be one of " + ", ".join(RESIZE_MODES),
                resize,
                prefix="open_clip",
            )
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise _error(
                "interpolation",
                "open_clip's eval transform accepts bicubic, bilinear or random",
                interpolation,
                prefix="open_clip",
            )
        if interpolation != "bilinear" or (resize == "shortest" and size[0] != size[1]):
            interpolation = "bicubic"
        return cls(
            size=size,
            mean=tuple(mean),
            std=tuple(std),
            resize=resize,
            crop="none" if resize == "squash" else "center",
            interpolation=interpolation,
            channels="RGB",
            invert=False,
            fill=cfg.get("fill_color", 0),
        )


def _error(name: str, problem: str, value: Any, *, prefix: str = "preprocess") -> ValueError:
    return ValueError(f"{prefix}.{name}: {problem} (got {value!r})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _size(value: Any, *, prefix: str = "preprocess") -> tuple[int, int]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(_is_int(v) and 1 <= v <= MAX_OUTPUT_SIDE for v in value)
    ):
        raise _error(
            "size",
            f"must be [height, width], integers in 1..{MAX_OUTPUT_SIDE}",
            value,
            prefix=prefix,
        )
    return int(value[0]), int(value[1])


def _floats(name: str, value: Any, n: int, *, positive: bool) -> tuple[float, ...]:
    kind = "positive finite numbers" if positive else "finite numbers"
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n:
        raise _error(name, f"must be a list of {n} {kind} (one per channel)", value)
    for v in value:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (positive and v <= 0):
            raise _error(name, f"must be a list of {n} {kind} (one per channel)", value)
    return tuple(float(v) for v in value)
