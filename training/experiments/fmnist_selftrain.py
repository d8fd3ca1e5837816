"""Fashion-MNIST self-training (experiment 2): Noisy Student (Xie et al. 2020) with 100 labels
(10 per class, ``semisup_split`` seed ``--seed``) and the other 59,900 training images unlabeled.

Generation 0 is a SmallVGG teacher trained on the 100 labels with strong noise. Each later
generation pseudo-labels the 59,900 images, keeps at most ``--per-class`` of each predicted
class (most confident first; a list, one value per generation, so it can grow as a
curriculum), and trains a fresh student on the 100 labels (repeated) plus those pseudo-labels
with RandAugment + Cutout and dropout; the student is the next teacher. By default
(``--propagate 30``) the pseudo-labels come from label propagation (Iscen et al. 2019) on a
30-NN graph of [pixel PCA, the model's features] seeded by the 100 labels; ``--propagate 0``
uses the model's softmax (plain Noisy Student). The 5,000 validation labels are used only for
early stopping and for choosing this recipe (docs/results/selftrain.md); the test set is scored
after each generation for the report, never for a choice.

    python -m training.experiments.fmnist_selftrain --seed 0 --out runs/fmnist_selftrain

prints one line per generation and writes ``results.json`` (after every generation, so an
interrupted run keeps what it finished): config, seed, val/test accuracy, pseudo-label
precision on the validation images, CPU and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.fashion_mnist import load_fashion_mnist
from training.data.semisup import semisup_split
from training.finetune import FMNIST_ARCHS, FitConfig, fmnist_classifier
from training.inference import accuracy
from training.noise import Noise
from training.selftrain import PseudoLabelConfig, SelfTrainConfig, noisy_student


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_selftrain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist_selftrain"))
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--threads", type=int, default=1)
    # models
    ap.add_argument("--teacher-width", type=int, default=16)
    ap.add_argument(
        "--teacher-checkpoint",
        type=Path,
        default=None,
        help="generation 0 from a file instead of training it: a fmnist_fixmatch checkpoint.pt "
        "(its val-chosen EMA weights) or a Classifier state dict",
    )
    ap.add_argument(
        "--teacher-arch",
        choices=FMNIST_ARCHS,
        default="strided",
        help="with --teacher-checkpoint: its network (width: --teacher-width)",
    )
    ap.add_argument("--widths", type=_ints, default=(16,), help="student width per generation")
    ap.add_argument("--dropout", type=float, default=0.3)
    # pseudo-labels
    ap.add_argument("--per-class", type=_ints, default=(6000,))
    ap.add_argument("--threshold", type=float, default=0.0)
    ap.add_argument("--soft", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reweight", action="store_true")
    ap.add_argument("--labeled-repeat", type=int, default=10)
    ap.add_argument("--tta", action="store_true", help="teacher averages mirror images")
    ap.add_argument("--warm-start", action="store_true")
    ap.add_argument(
        "--propagate",
        type=int,
        default=30,
        help="k > 0: pseudo-labels by label propagation on a k-NN graph of [pixel PCA, features]",
    )
    ap.add_argument("--pca", type=int, default=50, help="pixel PCA dimensions for --propagate")
    # noise and optimisation
    ap.add_argument("--n-ops", type=int, default=2)
    ap.add_argument("--magnitude", type=float, default=5.0)
    ap.add_argument("--cutout", type=float, default=0.5)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--teacher-steps", type=int, default=50, help="steps per teacher epoch")
    ap.add_argument("--epochs", type=int, default=40, help="student epochs per generation")
    ap.add_argument("--steps", type=int, default=120, help="steps per student epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-test", action="store_true", help="do not score the test set")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    c0, t0 = time.process_time(), time.perf_counter()
    kw = {"root": args.root} if args.root else {}
    train = load_fashion_mnist(split="train", **kw)
    test = load_fashion_mnist(split="test", **kw)
    split = semisup_split(train.labels, per_class=10, n_val=5000, seed=args.seed)
    x_lab, y_lab = train.images[split.labeled], train.labels[split.labeled]
    x_unl = train.images[split.unlabeled]
    val = (train.images[split.val], train.labels[split.val])
    if args.quick:
        x_unl, val = x_unl[::20], (val[0][::5], val[1][::5])
        test = type(test)(test.images[::10], test.labels[::10], test.classes, test.superclasses,
                          test.preprocess)  # fmt: skip
    q = 0.1 if args.quick else 1.0

    def fit_cfg(epochs: int, steps: int, batch: int) -> FitConfig:
        return FitConfig(
            mode="full",
            epochs=max(1, round(epochs * (0.5 if args.quick else 1))),
            steps_per_epoch=max(2, round(steps * q)),
            batch_size=batch,
            lr=args.lr,
            weight_decay=5e-4,
            seed=args.seed,
        )

    teacher_fit = fit_cfg(args.teacher_epochs, args.teacher_steps, 64)
    student_fit = fit_cfg(args.epochs, args.steps, args.batch_size)
    per_class = tuple(max(1, round(k * (0.05 if args.quick else 1))) for k in args.per_class)
    cfg = SelfTrainConfig(
        iterations=len(per_class),
        pseudo=PseudoLabelConfig(
            threshold=args.threshold,
            soft=args.soft,
            temperature=args.temperature,
            reweight=args.reweight,
        ),
        max_per_class=per_class,
        labeled_repeat=args.labeled_repeat,
        flip_tta=args.tta,
        warm_start=args.warm_start,
    )
    noise = Noise("strong", n_ops=args.n_ops, magnitude=args.magnitude, cutout_size=args.cutout)

    def make_model(i: int) -> Any:
        torch.manual_seed(args.seed * 1000 + i)
        width = args.teacher_width if i == 0 else args.widths[min(i, len(args.widths)) - 1]
        return fmnist_classifier(10, dropout=args.dropout, width=width)

    command = "python -m training.experiments.fmnist_selftrain " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    rows: list[dict[str, Any]] = []
    last_stats: dict[str, Any] = {}

    def record(i: int, model: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "generation": i,
            "val_acc": accuracy(model, *val),
            "cpu_s_total": time.process_time() - c0,
            "wall_s_total": time.perf_counter() - t0,
        }
        if not args.no_test:
            row["test_acc"] = accuracy(model, test.images, test.labels)
        if i > 0:
            row["pseudo_labels"] = dict(last_stats)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, rows, command, args, cfg, teacher_fit, student_fit, split, c0, t0)
        return row

    # val images are among the unlabeled ones: the pseudo-labels' precision there (labels for
    # choosing the schedule only), overall and for the top k per class at several k
    in_unl = np.searchsorted(split.unlabeled, split.val)
    y_val_unl = np.full(len(split.unlabeled), -1)
    y_val_unl[in_unl] = train.labels[split.val]
    if args.quick:
        y_val_unl = y_val_unl[::20]

    def pseudo_stats(i: int, probs: np.ndarray, pl: Any) -> dict[str, Any]:
        known = y_val_unl >= 0
        pred, conf = probs.argmax(1), probs.max(1)
        sel = pl.index[known[pl.index]]
        at_k = {}
        for k in (250, 500, 1000, 2000, 3000, 4000, 5000, 6000):
            top = np.concatenate(
                [np.flatnonzero(pred == c)[np.argsort(-conf[pred == c])][:k] for c in range(10)]
            )
            top = top[known[top]]
            at_k[k] = round(float((pred[top] == y_val_unl[top]).mean()), 4) if top.size else None
        stats = {
            "teacher_val_acc_unlabeled": float((pred[known] == y_val_unl[known]).mean()),
            "pseudo_precision_val": float((pred[sel] == y_val_unl[sel]).mean())
            if sel.size
            else None,
            "precision_top_k_per_class_val": at_k,
        }
        print(json.dumps(stats), flush=True)
        last_stats.clear()
        last_stats.update(stats)
        return stats

    make_teacher = None
    if args.propagate:
        make_teacher = propagation_teacher(x_lab, y_lab, args.propagate, args.pca)

    teacher = None
    if args.teacher_checkpoint is not None:
        teacher = load_teacher(args.teacher_checkpoint, args.teacher_arch, args.teacher_width)
        record(0, teacher)

    result = noisy_student(
        make_model,
        x_lab,
        y_lab,
        x_unl,
        cfg,
        student_fit,
        teacher_fit=teacher_fit,
        noise=noise,
        teacher_noise=noise,
        val=val,
        on_generation=record,
        on_pseudo_labels=pseudo_stats,
        teacher=teacher,
        make_teacher=make_teacher,
        log=lambda msg: print(msg, flush=True),
    )
    trained = rows[1:] if teacher is not None else rows  # a loaded teacher has no fit record
    for row, gen in zip(trained, result.generations, strict=True):
        row.update(
            n_pseudo=gen.n_pseudo,
            per_class=gen.per_class,
            mean_confidence=gen.mean_confidence,
            best_epoch=gen.best_epoch,
            cpu_s=gen.cpu_seconds,
            wall_s=gen.wall_seconds,
        )
    path = write(args.out, rows, command, args, cfg, teacher_fit, student_fit, split, c0, t0)
    print(f"total: {time.process_time() - c0:.0f} CPU s, {time.perf_counter() - t0:.0f} wall s")
    print(f"wrote {path}")
    return 0


def load_teacher(path: Path, arch: str, width: int) -> Any:
    """A ``Classifier`` for generation 0 from ``path``: a ``fmnist_fixmatch`` checkpoint (its
    best-on-validation EMA weights) or a plain state dict."""
    from training.checkpoint import load_checkpoint
    from training.fixmatch import best_weights

    state = load_checkpoint(path)
    state = best_weights(state) or state
    model = fmnist_classifier(10, dropout=0.0, width=width, arch=arch)
    model.load_state_dict(state)
    return model.eval()


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def propagation_teacher(x_lab: np.ndarray, y_lab: np.ndarray, k: int, pca: int) -> Any:
    """``make_teacher`` for ``noisy_student``: label propagation (Iscen et al. 2019) over the
    labeled + unlabeled images, on each image's unit pixel-PCA vector next to its unit model
    features, seeded by the labels. Pixels see what the model missed and vice versa."""
    from training.inference import embed
    from training.labelprop import label_propagation

    cache: dict[int, np.ndarray] = {}  # id(x_unl) -> unit pixel-PCA rows of [x_lab, x_unl]

    def pixels(x_all: np.ndarray, key: int) -> np.ndarray:
        if key not in cache:
            flat = x_all.reshape(len(x_all), -1).astype(np.float32) / 255
            flat -= flat.mean(0)
            _, _, vt = np.linalg.svd(flat[:: max(1, len(flat) // 6000)], full_matrices=False)
            cache.clear()
            cache[key] = _unit(flat @ vt[:pca].T)
        return cache[key]

    def make(model: Any) -> Any:
        def teach(x_unl: np.ndarray) -> np.ndarray:
            x_all = np.concatenate([x_lab, x_unl])
            feats = np.concatenate([pixels(x_all, id(x_unl)), _unit(embed(model, x_all))], 1)
            probs = label_propagation(feats, np.arange(len(x_lab)), y_lab, 10, k=k)
            return probs[len(x_lab) :]

        return teach

    return make


def write(
    out: Path,
    rows: list[dict[str, Any]],
    command: str,
    args: argparse.Namespace,
    cfg: SelfTrainConfig,
    teacher_fit: FitConfig,
    student_fit: FitConfig,
    split: Any,
    c0: float,
    t0: float,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = rows[-1] if rows else {}
    chosen = max(rows, key=lambda r: r["val_acc"]) if rows else {}  # the generation val picks
    data = {
        "experiment": "fmnist_selftrain",
        "command": command,
        "seed": args.seed,
        "quick": args.quick,
        "data": {"dataset": "Fashion-MNIST", "split": split.describe()},
        "threads": args.threads,
        "noise": {"n_ops": args.n_ops, "magnitude": args.magnitude, "cutout": args.cutout},
        "dropout": args.dropout,
        "teacher_width": args.teacher_width,
        "student_widths": list(args.widths),
        "selftrain": cfg.to_dict(),
        "teacher_fit": teacher_fit.to_dict(),
        "student_fit": student_fit.to_dict(),
        "generations": rows,
        "final_val_acc": final.get("val_acc"),
        "final_test_acc": final.get("test_acc"),
        "chosen_generation": chosen.get("generation"),
        "chosen_val_acc": chosen.get("val_acc"),
        "chosen_test_acc": chosen.get("test_acc"),
        "cpu_seconds": time.process_time() - c0,
        "wall_seconds": time.perf_counter() - t0,
    }
    path = out / "results.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
