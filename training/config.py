"""``TrainConfig``: everything a meta-training run depends on, saved with every checkpoint.

``build_data`` and ``build_method`` turn a config into the train/validation ``ImageSet``s and
the method, so ``metatrain``, ``evaluate`` and ``export`` rebuild the same things from a
checkpoint. This module
imports no torch (the CLI builds its parser from these defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.data.imageset import ImageSet

DATASETS = ("omniglot", "fashion-mnist", "folder")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class AugmentConfig:
    degrees: float = 0.0  # rotation, +- degrees
    translate: float = 0.0  # shift, +- fraction of the image side
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range
    shear: float = 0.0  # +- degrees
    stroke: float = 0.0  # stroke-width jitter strength in [0, 1]
    elastic: float = 0.0  # elastic distortion: displacement std, fraction of the image side
    background: float = 0.0

    @property
    def warps(self) -> bool:
        """Whether pixels move (an affine or elastic resampling)."""
        affine = self.degrees or self.translate or self.shear or self.scale != (1.0, 1.0)
        return bool(affine or self.elastic)

    @property
    def enabled(self) -> bool:
        return self.warps or bool(self.stroke)


@dataclass
class TrainConfig:
    # data
    dataset: str = "omniglot"
    data_path: list[str] = field(default_factory=list)  # sources / root; empty: the default
    size: int = 28
    interpolation: str = "box"
    crop: str = "none"  # Omniglot: "ink" cuts the square around the drawing before resizing
    ink_margin: float = 0.15
    rotations: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    val_fraction: float = 0.2
    split: str = "characters"
    split_seed: int = 0
    # model
    backbone: str = "conv4"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    method: str = "protonet"
    distance: str = "l2"
    method_options: dict[str, Any] = field(default_factory=dict)
    # protonet: weight of an auxiliary cosine classifier over every training class (0: none)
    aux_weight: float = 0.0
    # episodes
    n_way: int = 20
    k_shot: int = 1
    q_query: int = 5
    episodes: int = 300
    within_superclass: bool = False
    split_drawers: bool = False
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine | step
    warmup: int = 0
    step_every: int = 1000
    gamma: float = 0.5
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentConfig fields
    # run
    seed: int = 0
    val_every: int = 0  # 0: only at the end
    val_episodes: int = 200
    val_way: int = 5
    val_shot: int = 1
    val_query: int = 15
    val_within_superclass: bool = False  # validation episodes within one alphabet
    val_split_drawers: bool = False  # validation supports and queries by different drawers
    # "bf16": the backbone runs under bfloat16 autocast in training (distances stay float32)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule must be constant, cosine or step, got {self.schedule!r}")
        AugmentConfig(**self.augment_kwargs())  # fail early on a bad field
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.aux_weight and self.method != "protonet":
            raise ValueError(f"aux_weight is for protonet, not {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision != "fp32" and self.method in ("maml", "fomaml"):
            raise ValueError(f"precision {self.precision!r} is not for {self.method!r}")
        if self.crop not in ("none", "ink"):
            raise ValueError(f"crop must be none or ink, got {self.crop!r}")
        if self.crop != "none" and self.dataset != "omniglot":
            raise ValueError(f"crop {self.crop!r} applies to omniglot, not {self.dataset!r}")

    def augment_kwargs(self) -> dict[str, Any]:
        kw = dict(self.augment)
        if "scale" in kw:
            kw["scale"] = tuple(kw["scale"])
        return kw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)


def load_dataset(cfg: TrainConfig, preprocess: dict[str, Any] | None = None) -> ImageSet:
    """The whole dataset (before the split), with ``preprocess`` overriding the config's."""
    if cfg.dataset == "omniglot":
        from training.data.omniglot import load_omniglot

        return load_omniglot(
            cfg.data_path or None,
            size=cfg.size,
            interpolation=cfg.interpolation,
            crop=cfg.crop,
            ink_margin=cfg.ink_margin,
            preprocess=preprocess,
        )
    if cfg.dataset == "fashion-mnist":
        from training.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

        return load_fashion_mnist(
            cfg.data_path[0] if cfg.data_path else DEFAULT_ROOT, size=cfg.size
        )
    from training.data.image_folder import default_preprocess, load_image_folder

    if not cfg.data_path:
        raise ValueError("dataset 'folder' needs data_path")
    return load_image_folder(
        cfg.data_path[0], preprocess=preprocess or default_preprocess(cfg.size)
    )


def build_data(
    cfg: TrainConfig, preprocess: dict[str, Any] | None = None
) -> tuple[ImageSet, ImageSet]:
    """(train with rotations, validation without) split as the config says."""
    from training.data.split import split_classes

    train, val = split_classes(
        load_dataset(cfg, preprocess), cfg.val_fraction, cfg.split_seed, cfg.split
    )
    return train.with_rotations(cfg.rotations), val


def build_method(cfg: TrainConfig, in_channels: int, size: tuple[int, int]) -> Any:
    from training.backbones import create_backbone
    from training.methods import create_method

    backbone = create_backbone(cfg.backbone, in_channels, **cfg.backbone_options)
    return create_method(
        cfg.method,
        backbone,
        in_channels=in_channels,
        size=size,
        n_way=cfg.n_way,
        distance=cfg.distance,
        **cfg.method_options,
    )
