"""Fashion-MNIST supervised baseline: SmallVGG trained from scratch with 100 labels (10 per
class, ``semisup_split`` seed ``--seed``) and with all training labels.

The 5,000 validation images of the split choose everything (the 100-label learning rate and
augmentation from a small grid, the epoch by early stopping for both settings); the 10,000 test
images are only scored, once per setting, with the chosen model. "All labels" trains on the
55,000 training images outside the validation split and stops early on those 5,000.

    python -m training.experiments.fmnist_baseline --seed 0 --out runs/fmnist_baseline

prints a table and writes ``results.json`` (config, seed, accuracies, CPU and wall seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.fashion_mnist import load_fashion_mnist
from training.data.imageset import ImageSet
from training.data.semisup import SemiSupSplit, semisup_split
from training.finetune import FitConfig, fit, fmnist_augment, fmnist_classifier
from training.inference import accuracy


@dataclass
class Data:
    train: ImageSet
    test: ImageSet
    split: SemiSupSplit

    def labeled(self) -> tuple[np.ndarray, np.ndarray]:
        i = self.split.labeled
        return self.train.images[i], self.train.labels[i]

    def val(self) -> tuple[np.ndarray, np.ndarray]:
        i = self.split.val
        return self.train.images[i], self.train.labels[i]

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": "Fashion-MNIST",
            "split": self.split.describe(),
            "train": len(self.train),
            "test": len(self.test),
        }


def load_data(seed: int, root: str | None = None) -> Data:
    kw = {"root": root} if root else {}
    train = load_fashion_mnist(split="train", **kw)
    test = load_fashion_mnist(split="test", **kw)
    return Data(train, test, semisup_split(train.labels, per_class=10, n_val=5000, seed=seed))


class Clock:
    """CPU (``process_time``: all threads of this process) and wall seconds since creation."""

    def __init__(self) -> None:
        self.c0, self.t0 = time.process_time(), time.perf_counter()

    def cpu(self) -> float:
        return time.process_time() - self.c0

    def wall(self) -> float:
        return time.perf_counter() - self.t0


def print_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1.0 else f"{v:.0f}"
    return str(v)


def write_json(out: Path, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run_config(
    name: str,
    data: Data,
    x: np.ndarray,
    y: np.ndarray,
    cfg: FitConfig,
    *,
    width: int,
    dropout: float,
    augment: bool,
) -> tuple[dict[str, Any], Any]:
    torch.manual_seed(cfg.seed)
    model = fmnist_classifier(10, dropout=dropout, width=width)
    res = fit(model, x, y, cfg, val=data.val(), augment=fmnist_augment if augment else None)
    row = {
        "run": name,
        "labels": len(y),
        "lr": cfg.lr,
        "augment": augment,
        "dropout": dropout,
        "best_epoch": res.best_epoch,
        "val_acc": res.best_val_acc,
        "cpu_s": res.cpu_seconds,
        "wall_s": res.wall_seconds,
        "config": cfg.to_dict(),
        "history": res.history,
    }
    return row, model


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist_baseline"))
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full-epochs", type=int, default=10, help="epochs on all labels")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = Clock()
    data = load_data(args.seed, args.root)
    scale = 0.1 if args.quick else 1.0
    x_l, y_l = data.labeled()

    # 100 labels: learning rate x augmentation, chosen by best validation accuracy.
    few = []
    best: tuple[float, Any, dict[str, Any]] | None = None
    for lr in (1e-3, 3e-3):
        for aug in (False, True):
            cfg = FitConfig(
                mode="full",
                epochs=max(2, int(8 * scale)),
                steps_per_epoch=max(2, int(50 * scale)),
                batch_size=64,
                lr=lr,
                weight_decay=5e-4,
                seed=args.seed,
            )
            row, model = run_config(
                f"100 labels lr={lr:g} aug={'weak' if aug else 'none'}",
                data,
                x_l,
                y_l,
                cfg,
                width=args.width,
                dropout=0.3,
                augment=aug,
            )
            few.append(row)
            print(f"{row['run']}: val {row['val_acc']:.4f} ({row['cpu_s']:.0f} CPU s)", flush=True)
            if best is None or row["val_acc"] > best[0]:
                best = (row["val_acc"], model, row)
    assert best is not None
    chosen_few = best[2]
    chosen_few["test_acc"] = accuracy(best[1], data.test.images, data.test.labels)

    # All labels (55,000 outside val), the recipe the 100-label grid chose, early stopping.
    keep = np.setdiff1d(np.arange(len(data.train)), data.split.val)
    if args.quick:
        keep = keep[:: max(1, int(1 / scale))]
    cfg = FitConfig(
        mode="full",
        epochs=max(1, args.full_epochs),
        batch_size=128,
        lr=chosen_few["lr"],
        weight_decay=5e-4,
        seed=args.seed,
    )
    full_row, full_model = run_config(
        f"all labels ({keep.size}) lr={cfg.lr:g} aug={'weak' if chosen_few['augment'] else 'none'}",
        data,
        data.train.images[keep],
        data.train.labels[keep],
        cfg,
        width=args.width,
        dropout=0.3,
        augment=bool(chosen_few["augment"]),
    )
    full_row["test_acc"] = accuracy(full_model, data.test.images, data.test.labels)

    cols = ("run", "labels", "best_epoch", "val_acc", "test_acc", "cpu_s", "wall_s")
    print("\nFashion-MNIST supervised baseline (test accuracy only for the chosen runs)")
    table = print_table([*few, full_row], cols)
    print(f"total: {clock.cpu():.0f} CPU s, {clock.wall():.0f} wall s")
    path = write_json(
        args.out,
        {
            "experiment": "fmnist_baseline",
            "command": "python -m training.experiments.fmnist_baseline "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "data": data.describe(),
            "backbone": f"small_vgg width={args.width}",
            "threads": args.threads,
            "quick": args.quick,
            "chosen_100": chosen_few["run"],
            "test_acc_100": chosen_few["test_acc"],
            "test_acc_all": full_row["test_acc"],
            "runs_100": few,
            "run_all": full_row,
            "table": table,
            "cpu_seconds": clock.cpu(),
            "wall_seconds": clock.wall(),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
