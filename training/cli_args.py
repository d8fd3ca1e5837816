"""Argument groups of ``protoserve train`` and the ``TrainConfig`` they describe."""

from __future__ import annotations

import argparse
from typing import Any

from training.config import PRECISIONS, TrainConfig


def data_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=["omniglot", "fashion-mnist", "folder"])
    g.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="Omniglot zips/folders (repeatable; default: the two small background "
        "sets under $PROTOSERVE_DATA or ../shared/data), or the dataset root",
    )
    g.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    g.add_argument("--interpolation", default=d.interpolation)
    g.add_argument(
        "--crop",
        default=d.crop,
        choices=["none", "ink"],
        help="omniglot: 'ink' cuts the square around each drawing before resizing",
    )
    g.add_argument(
        "--ink-margin",
        type=float,
        default=d.ink_margin,
        help="with --crop ink: margin on each side, as a fraction of the drawing's longer side",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share of classes held out for validation (0: train on all)",
    )
    g.add_argument(
        "--split-by",
        default=d.split,
        choices=["characters", "superclasses"],
        help="hold out characters within every alphabet, or whole alphabets",
    )
    g.add_argument("--split-seed", type=int, default=d.split_seed)


def metatrain_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--out", default="runs/metatrain", help="run folder (checkpoint, log, curve)")
    data_args(p)
    p.add_argument("--no-rotations", action="store_true", help="no 90-degree rotated classes")
    p.add_argument(
        "--mirror",
        action="store_true",
        help="mirrored characters (and their turns) as extra classes too: 8 per character",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--backbone",
        default=d.backbone,
        help="conv4, resnet12, open_clip:<arch>[@<tag>], timm:<name>",
    )
    g.add_argument("--hidden", type=int, help="conv4 width (default 64)")
    g.add_argument(
        "--pools",
        type=int,
        choices=range(5),
        help="conv4 blocks that max-pool, from the first (default 4; 3 keeps a 3x3 map at 28 px)",
    )
    g.add_argument("--widths", type=int, nargs=4, help="resnet12 widths (default 64 160 320 640)")
    g.add_argument(
        "--method", default=d.method, choices=["protonet", "matching", "relation", "maml", "fomaml"]
    )
    g.add_argument("--distance", default=d.distance, choices=["l2", "cosine"], help="protonet")
    g.add_argument("--inner-lr", type=float, help="maml/fomaml inner step size (0.4)")
    g.add_argument("--inner-steps", type=int, help="maml/fomaml inner steps (1)")
    g.add_argument(
        "--aux-weight",
        type=float,
        default=d.aux_weight,
        help="protonet: add this times the loss of a cosine classifier over every training "
        "class (TADAM's co-training; 0: off)",
    )
    g = p.add_argument_group("episodes")
    g.add_argument("--way", type=int, default=d.n_way)
    g.add_argument("--shot", type=int, default=d.k_shot)
    g.add_argument("--query", type=int, default=d.q_query)
    g.add_argument("--episodes", type=int, default=d.episodes)
    g.add_argument("--within-alphabet", action="store_true", help="one alphabet per episode")
    g.add_argument(
        "--split-drawers",
        action="store_true",
        help="support and queries by different drawers, as in the one-shot runs",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", default=d.schedule, choices=["constant", "cosine", "step"])
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up episodes")
    g.add_argument("--step-every", type=int, default=d.step_every, help="step schedule period")
    g.add_argument("--gamma", type=float, default=d.gamma, help="step schedule factor")
    g = p.add_argument_group("augmentation (off by default)")
    g.add_argument("--degrees", type=float, default=0.0, help="random rotation, +- degrees")
    g.add_argument("--translate", type=float, default=0.0, help="random shift, +- fraction")
    g.add_argument("--scale", type=float, nargs=2, default=[1.0, 1.0], metavar=("MIN", "MAX"))
    g.add_argument("--shear", type=float, default=0.0, help="random shear, +- degrees")
    g.add_argument("--stroke", type=float, default=0.0, help="stroke-width jitter, 0..1")
    g.add_argument(
        "--elastic",
        type=float,
        default=0.0,
        help="elastic distortion: std of a smooth random displacement, fraction of the side",
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument(
        "--precision",
        default=d.precision,
        choices=PRECISIONS,
        help="bf16: the backbone trains under bfloat16 autocast (about 1.8x faster than fp32 on "
        "CPUs with AVX512-BF16 or AMX, and on GPUs); prototypes and distances stay float32",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="torch device to train on: auto (cuda when one is visible, else cpu), cpu, cuda, "
        "cuda:N; episodes are still sampled and augmented on the CPU, so runs are seeded alike",
    )
    g.add_argument("--val-every", type=int, default=d.val_every, help="0: at the end only")
    g.add_argument("--val-episodes", type=int, default=d.val_episodes)
    g.add_argument("--val-way", type=int, default=d.val_way)
    g.add_argument("--val-shot", type=int, default=d.val_shot)
    g.add_argument("--val-query", type=int, default=d.val_query)
    g.add_argument(
        "--val-within-alphabet",
        action="store_true",
        help="validation episodes within one alphabet (the one-shot runs' format)",
    )
    g.add_argument(
        "--val-split-drawers",
        action="store_true",
        help="validation supports and queries by different drawers",
    )
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--stop-after", type=int, help="stop after this many episodes (resumable)")
    g.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> Any:
    aug: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("degrees", "translate", "shear", "stroke", "elastic")
        if getattr(args, k)
    }
    if list(args.scale) != [1.0, 1.0]:
        aug["scale"] = list(args.scale)
    backbone_opts = {
        k: v
        for k, v in (("hidden", args.hidden), ("widths", args.widths), ("pools", args.pools))
        if v is not None
    }
    method_opts = {
        k: v for k, v in (("inner_lr", args.inner_lr), ("inner_steps", args.inner_steps)) if v
    }
    return TrainConfig(
        dataset=args.dataset,
        data_path=list(args.data),
        size=args.size,
        interpolation=args.interpolation,
        crop=args.crop,
        ink_margin=args.ink_margin,
        rotations=_view_codes(args.no_rotations, args.mirror),
        val_fraction=args.val_fraction,
        split=args.split_by,
        split_seed=args.split_seed,
        backbone=args.backbone,
        backbone_options=backbone_opts,
        method=args.method,
        distance=args.distance,
        method_options=method_opts,
        aux_weight=args.aux_weight,
        n_way=args.way,
        k_shot=args.shot,
        q_query=args.query,
        episodes=args.episodes,
        within_superclass=args.within_alphabet,
        split_drawers=args.split_drawers,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup=args.warmup,
        step_every=args.step_every,
        gamma=args.gamma,
        augment=aug,
        seed=args.seed,
        val_every=args.val_every,
        val_episodes=args.val_episodes,
        val_way=args.val_way,
        val_shot=args.val_shot,
        val_query=args.val_query,
        val_within_superclass=args.val_within_alphabet,
        val_split_drawers=args.val_split_drawers,
        precision=args.precision,
    )


def data_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` with only the data flags set (the rest default)."""
    return TrainConfig(
        dataset=args.dataset,
        data_path=list(args.data),
        size=args.size,
        interpolation=args.interpolation,
        crop=args.crop,
        ink_margin=args.ink_margin,
        val_fraction=args.val_fraction,
        split=args.split_by,
        split_seed=args.split_seed,
    )


def _view_codes(no_rotations: bool, mirror: bool) -> list[int]:
    """``ImageSet`` view codes: quarter turns 0..3, and 4..7 (the same, mirrored first)."""
    turns = [0] if no_rotations else [0, 1, 2, 3]
    return turns + [t + 4 for t in turns] if mirror else turns
