"""``protoserve train finetune``: fine-tune a backbone on labeled images, report validation (and
test) accuracy, export it into the model repository, register its classes on a server.

Data (``--data``):

* ``fashion-mnist`` (default): the label-scarce protocol of docs/results.md: ``--per-class``
  labels per class from ``semisup_split(seed)`` (its 5,000 validation images choose the epoch),
  scored on the test split;
* a folder ``root/<class>/<image>``: every image is labeled; ``--val-fraction`` of each class
  (seeded) is held out for early stopping, ``--per-class`` caps the rest, and ``--test DIR``
  (same class names) is scored at the end. ``--size`` and ``--channels`` set the preprocessing
  the exported model's manifest carries, so the server feeds it exactly what training saw.

Backbones: any ``create_backbone`` name, optionally with our own weights (``--checkpoint``: a
state dict from ``training.selfsup`` or a meta-training checkpoint).

    protoserve train finetune --mode two-stage --export models/fmnist-ft
    protoserve train finetune --data ~/photos/train --test ~/photos/test --size 64 \\
        --channels RGB --backbone resnet12 --export models/photos --server 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.imageset import ImageSet

# fine-tuning modes, as training.finetune.MODES (repeated so --help needs no torch import)
MODES = ("full", "linear", "two-stage")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="protoserve train finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = ap.add_argument_group("data")
    data.add_argument("--data", default="fashion-mnist", help="fashion-mnist or a folder")
    data.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    data.add_argument("--test", default=None, help="folder data: a test folder to score")
    data.add_argument("--per-class", type=int, default=None, help="labels per class (FMNIST: 10)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="folder data (default 0.2)")
    data.add_argument("--size", type=int, default=28, help="folder data: input side (default 28)")
    data.add_argument("--channels", choices=["L", "RGB"], default="L", help="folder data")
    model = ap.add_argument_group("model")
    model.add_argument("--backbone", default="small_vgg", help="a create_backbone name")
    model.add_argument("--option", action="append", default=[], help="backbone option k=v (int)")
    model.add_argument("--checkpoint", default=None, help="state dict or meta-training checkpoint")
    model.add_argument("--dropout", type=float, default=0.3)
    fitg = ap.add_argument_group("fitting")
    fitg.add_argument("--mode", choices=MODES, default="two-stage")
    fitg.add_argument("--epochs", type=int, default=8)
    fitg.add_argument("--head-epochs", type=int, default=3, help="two-stage: head-only epochs")
    fitg.add_argument("--steps-per-epoch", type=int, default=50)
    fitg.add_argument("--lr", type=float, default=1e-3)
    fitg.add_argument("--backbone-lr-mult", type=float, default=0.1, help="discriminative LR")
    fitg.add_argument("--patience", type=int, default=None, help="early stopping (epochs)")
    fitg.add_argument("--no-augment", action="store_true", help="no flip + shift augmentation")
    fitg.add_argument("--seed", type=int, default=0)
    fitg.add_argument("--threads", type=int, default=1)
    out = ap.add_argument_group("output")
    out.add_argument("--export", type=Path, default=None, help="model folder to write")
    out.add_argument("--overwrite", action="store_true")
    out.add_argument("--server", default=None, help="host:port of a running protoserve")
    out.add_argument("--collection", default="finetuned")
    out.add_argument(
        "--score-test", action="store_true", help="classify the test set through the server"
    )
    return ap


def stratified_holdout(
    labels: np.ndarray, fraction: float, per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: ``fraction`` of each class to val (at least one where a class has
    two or more images), at most ``per_class`` of the rest to train; seeded, sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(fraction * members.size)
        if fraction > 0 and members.size > 1:
            n_val = max(1, n_val)
        val.append(members[:n_val])
        train.append(members[n_val:][:per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Labeled train, val and (optional) test arrays, class names and preprocessing."""
    if args.data == "fashion-mnist":
        from training.data.fashion_mnist import load_fashion_mnist
        from training.data.semisup import semisup_split

        kw = {"root": args.root} if args.root else {}
        train = load_fashion_mnist(split="train", **kw)
        test: ImageSet | None = load_fashion_mnist(split="test", **kw)
        split = semisup_split(train.labels, per_class=args.per_class or 10, seed=args.seed)
        tr, va = split.labeled, split.val
    else:
        from training.data.image_folder import default_preprocess, load_image_folder

        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data}: neither 'fashion-mnist' nor a folder")
        pre = default_preprocess(args.size, args.channels)
        train = load_image_folder(args.data, preprocess=pre)
        test = load_image_folder(args.test, preprocess=pre) if args.test else None
        if test is not None and test.classes != train.classes:
            missing = sorted(set(test.classes) - set(train.classes))
            raise SystemExit(f"--test {args.test}: classes not in --data: {missing[:5]}")
        tr, va = stratified_holdout(train.labels, args.val_fraction, args.per_class, args.seed)
    return {
        "x": train.images[tr],
        "y": train.labels[tr],
        "val": (train.images[va], train.labels[va]) if va.size else None,
        "test": test,
        "classes": train.classes,
        "preprocess": train.preprocess,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.server and not args.export:
        parser().error("--server needs --export (the collection's model)")
    import torch

    from training.finetune import Classifier, FitConfig, fit, fmnist_augment
    from training.finetune_export import (
        export_finetuned,
        load_backbone,
        register_classes,
        served_accuracy,
    )
    from training.inference import accuracy

    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    torch.set_num_threads(args.threads)
    d = load_data(args)
    x, y = d["x"], d["y"]
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, args.checkpoint, x.shape[1], **options)
    model = Classifier.for_backbone(backbone, len(d["classes"]), tuple(x.shape[1:]), args.dropout)
    cfg = FitConfig(
        mode=args.mode,
        epochs=args.epochs,
        head_epochs=args.head_epochs if args.mode == "two-stage" else 0,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        seed=args.seed,
        patience=args.patience,
    )
    res = fit(model, x, y, cfg, val=d["val"], augment=None if args.no_augment else fmnist_augment)
    test: ImageSet | None = d["test"]
    summary: dict[str, Any] = {
        "command": "protoserve train finetune " + " ".join(sys.argv[1:] if argv is None else argv),
        "labeled": len(y),
        "best_epoch": res.best_epoch,
        "val_acc": res.best_val_acc,
        "test_acc": accuracy(model, test.images, test.labels) if test is not None else None,
        "cpu_seconds": res.cpu_seconds,
    }
    if args.export is not None:
        folder = export_finetuned(
            model,
            args.export,
            preprocess=d["preprocess"],
            architecture=f"{args.backbone} {options or ''}".strip(),
            recipe=summary["command"],
            overwrite=args.overwrite,
        )
        summary["exported"] = str(folder.path)
    if args.server:
        from server.client import ProtoserveClient

        with ProtoserveClient(args.server) as client:
            done = register_classes(client, args.collection, folder.name, x, y, d["classes"])
            summary["registered"] = sorted(done)
            if args.score_test and test is not None:
                names = [test.classes[i] for i in test.labels]
                summary["served_test_acc"] = served_accuracy(
                    client, args.collection, test.images, names
                )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
