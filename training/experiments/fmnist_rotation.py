"""Fashion-MNIST: rotation pre-training (RotNet, Gidaris et al. 2018) on the 59,900 unlabeled
training images, then fine-tuning on the 100 labels (``semisup_split`` seed ``--seed``) as a
linear probe, two-stage (head, then everything) and full fine-tuning, and (``--scratch``, on by
default) the same full fine-tuning from random initialisation for reference.

The backbone learning-rate multiplier (discriminative LRs, 0.1 or 1) of the two-stage and full
runs is chosen on the 5,000 validation images, as is every run's epoch (early stopping); the
test set is scored once per fine-tuning mode with the chosen run.

    python -m training.experiments.fmnist_rotation --seed 0 --out runs/fmnist_rotation

prints a table and writes ``results.json`` and the pre-trained ``backbone.pt`` (state dict).
``--pretext simclr`` runs the same protocol after SimCLR pre-training instead.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbones.small_vgg import SmallVGG
from training.experiments.fmnist_baseline import Clock, load_data, print_table, write_json
from training.finetune import Classifier, FitConfig, fit, fmnist_augment
from training.inference import accuracy
from training.selfsup import PretrainConfig, pretrain_rotation, pretrain_simclr


def finetune_grid(seed: int, scale: float) -> list[tuple[str, FitConfig]]:
    """(name, config) for each fine-tuning run; the mode is the part of the name before " "."""
    epochs = max(2, int(8 * scale))
    base: dict[str, Any] = {
        "epochs": epochs,
        "steps_per_epoch": max(2, int(50 * scale)),
        "batch_size": 64,
        "weight_decay": 5e-4,
        "seed": seed,
    }
    runs = [("linear lr=0.01", FitConfig(mode="linear", lr=1e-2, **base))]
    for mult in (0.1, 1.0):
        runs.append(
            (
                f"two-stage mult={mult:g}",
                FitConfig(
                    mode="two-stage",
                    lr=1e-3,
                    head_epochs=max(1, epochs * 3 // 8),
                    backbone_lr_mult=mult,
                    **base,
                ),
            )
        )
        runs.append(
            (f"full mult={mult:g}", FitConfig(mode="full", lr=1e-3, backbone_lr_mult=mult, **base))
        )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_rotation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist_rotation"))
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--pretext", choices=("rotation", "simclr"), default="rotation")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument(
        "--scratch", action=argparse.BooleanOptionalAction, default=True, help="also from scratch"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = Clock()
    data = load_data(args.seed, args.root)
    scale = 0.1 if args.quick else 1.0
    unlabeled = data.train.images[data.split.unlabeled]

    torch.manual_seed(args.seed)
    backbone = SmallVGG(1, args.width)
    pcfg = PretrainConfig(
        steps=max(2, int(args.pretrain_steps * scale)),
        batch_size=args.pretrain_batch,
        lr=2e-3,
        warmup=max(1, int(args.pretrain_steps * scale) // 20),
        seed=args.seed,
    )
    if args.pretext == "rotation":
        pre = pretrain_rotation(backbone, unlabeled, pcfg, augment=fmnist_augment)
    else:
        pre = pretrain_simclr(backbone, unlabeled, pcfg)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), args.out / "backbone.pt")
    last = pre.history[-1]
    print(
        f"{args.pretext} pre-training: {pcfg.steps} steps x {pcfg.batch_size} images, "
        f"final pretext loss {last['loss']:.4f} acc {last['acc']:.4f}, {pre.cpu_seconds:.0f} CPU s",
        flush=True,
    )

    x_l, y_l = data.labeled()
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    grid = finetune_grid(args.seed, scale)
    starts: list[tuple[str, nn.Module]] = [("pretrained", backbone)]
    if args.scratch:  # the same fine-tuning from random initialisation
        starts.append(("scratch", SmallVGG(1, args.width)))
    for init, start in starts:
        for name, cfg in grid:
            if init == "scratch" and not name.startswith("full mult=1"):
                continue
            torch.manual_seed(args.seed)
            model = Classifier(copy.deepcopy(start), 4 * args.width, 10, dropout=args.dropout)
            res = fit(model, x_l, y_l, cfg, val=data.val(), augment=fmnist_augment)
            row = {
                "init": init,
                "run": name,
                "mode": name.split(" ")[0],
                "best_epoch": res.best_epoch,
                "val_acc": res.best_val_acc,
                "cpu_s": res.cpu_seconds,
                "wall_s": res.wall_seconds,
                "config": cfg.to_dict(),
                "history": res.history,
            }
            rows.append(row)
            models[f"{init}/{name}"] = model
            print(f"{init} {name}: val {row['val_acc']:.4f} ({row['cpu_s']:.0f} CPU s)", flush=True)

    # per (init, mode): the run with the best validation accuracy gets scored on test
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = f"{row['init']}/{row['mode']}"
        if key not in chosen or row["val_acc"] > chosen[key]["val_acc"]:
            chosen[key] = row
    for row in chosen.values():
        row["chosen"] = True
        row["test_acc"] = accuracy(models[f"{row['init']}/{row['run']}"], *_test(data))

    cols = ("init", "run", "best_epoch", "val_acc", "test_acc", "cpu_s", "wall_s")
    print(f"\nFashion-MNIST, {args.pretext} pre-training then 100 labels (test: chosen runs only)")
    table = print_table(rows, cols)
    print(f"total: {clock.cpu():.0f} CPU s, {clock.wall():.0f} wall s")
    path = write_json(
        args.out,
        {
            "experiment": "fmnist_rotation",
            "command": "python -m training.experiments.fmnist_rotation "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "data": data.describe(),
            "backbone": f"small_vgg width={args.width}",
            "threads": args.threads,
            "quick": args.quick,
            "pretext": args.pretext,
            "pretrain": {
                "config": pcfg.to_dict(),
                "images": int(unlabeled.shape[0]),
                "history": pre.history,
                "cpu_seconds": pre.cpu_seconds,
                "wall_seconds": pre.wall_seconds,
            },
            "test_acc": {k: v["test_acc"] for k, v in chosen.items()},
            "chosen": {k: v["run"] for k, v in chosen.items()},
            "runs": rows,
            "table": table,
            "cpu_seconds": clock.cpu(),
            "wall_seconds": clock.wall(),
        },
    )
    print(f"wrote {path}")
    return 0


def _test(data: Any) -> tuple[Any, Any]:
    return data.test.images, data.test.labels


if __name__ == "__main__":
    raise SystemExit(main())
