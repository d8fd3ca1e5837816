"""Fashion-MNIST FixMatch (experiment 2): 100 labels (10 per class, ``semisup_split`` seed
``--seed``) and the other 59,900 training images unlabeled, trained with FixMatch
(``training.fixmatch``: weak-view pseudo-labels above ``--tau``, cross-entropy on the strong
view, EMA weights evaluated) on the "strided" LeNet-sized CNN (``training.backbones.strided``).

The 5,000 validation images are among the unlabeled ones; their labels are used only to pick
the EMA checkpoint (every ``--eval-every`` steps) and the recipe, and to monitor the precision
of the kept pseudo-labels. The test set scores the val-chosen checkpoint once; with
``--test-curve`` it is also scored at every evaluation, for a curve that chooses nothing.

    python -m training.experiments.fmnist_fixmatch --seed 0 --out runs/fmnist_fixmatch

prints one line per evaluation and a final table, and writes ``results.json`` (config, seed,
the evaluation history, the chosen step, val/test accuracy, CPU and wall seconds) and
``checkpoint.pt`` (resumes an interrupted run with the same options).

``--simclr-steps N`` first pre-trains the network's backbone with SimCLR
(``training.selfsup.pretrain_simclr``, Chen et al. 2020) for N steps of ``--simclr-batch``
unlabeled images, then starts FixMatch / FlexMatch from it (the head starts fresh). The
pre-trained backbone is saved as ``simclr_backbone.pt`` and reused when the run resumes; its
CPU time counts in the run's.
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

from training.config import PRECISIONS
from training.data.fashion_mnist import load_fashion_mnist
from training.data.semisup import semisup_split
from training.devices import resolve_device
from training.finetune import FMNIST_ARCHS, Classifier, fmnist_classifier
from training.fixmatch import FixMatchConfig, describe, fixmatch
from training.inference import accuracy, predict_proba
from training.noise import OPS


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = FixMatchConfig()
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_fixmatch")
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the labeled draw (and of training)"
    )
    ap.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="seed of initialisation, batches and noise (default: --seed); members of an "
        "ensemble share --seed (the same 100 labels) and differ here",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist_fixmatch"))
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="bf16: the network trains under bfloat16 autocast (about 2x faster per step on "
        "CPUs with AVX512-BF16; bench/training_step.py); scoring stays float32",
    )
    ap.add_argument("--arch", choices=FMNIST_ARCHS, default="strided")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--mu", type=int, default=d.mu)
    ap.add_argument("--tau", type=float, default=d.tau)
    ap.add_argument("--lambda-u", type=float, default=d.lambda_u)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--ema", type=float, default=d.ema)
    ap.add_argument("--dist-align", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--flex", action="store_true", help="FlexMatch class-wise thresholds")
    ap.add_argument("--ema-teacher", action="store_true", help="pseudo-labels from the EMA weights")
    ap.add_argument(
        "--lambda-c",
        type=float,
        default=d.lambda_c,
        help="CoMatch graph-contrastive loss weight (0: off; training/comatch.py)",
    )
    ap.add_argument("--contrast-threshold", type=float, default=d.contrast_threshold)
    ap.add_argument("--contrast-temperature", type=float, default=d.contrast_temperature)
    ap.add_argument(
        "--smooth-alpha",
        type=float,
        default=d.smooth_alpha,
        help="CoMatch memory smoothing of the pseudo-labels (1: none)",
    )
    ap.add_argument("--queue-size", type=int, default=d.queue_size)
    ap.add_argument(
        "--ops",
        default=",".join(OPS),
        help="comma-separated RandAugment operations of the strong view (default: all)",
    )
    ap.add_argument("--magnitude", type=float, default=d.magnitude)
    ap.add_argument("--cutout", type=float, default=d.cutout)
    ap.add_argument(
        "--simclr-steps", type=int, default=0, help="SimCLR pre-training steps first (0: none)"
    )
    ap.add_argument("--simclr-batch", type=int, default=128, help="images per SimCLR step")
    ap.add_argument(
        "--simclr-threads",
        type=int,
        default=None,
        help="torch threads of the SimCLR stage (default: --threads); the thread count changes "
        "the float rounding, so an exact rerun of a run uses its own",
    )
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--test-curve", action="store_true", help="score test at every evaluation")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    return ap.parse_args(argv)


def build_model(args: argparse.Namespace) -> Classifier:
    return fmnist_classifier(10, args.dropout, args.width, arch=args.arch)


def simclr_init(
    model: Classifier, unlabeled: np.ndarray, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Pre-trains ``model.backbone`` in place with SimCLR on ``unlabeled`` (or loads the
    backbone an earlier, interrupted run of the same options saved); returns its record."""
    from training.selfsup import PretrainConfig, pretrain_simclr

    path = args.out / "simclr_backbone.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.backbone.load_state_dict(state["backbone"])
        print(f"SimCLR backbone loaded from {path}", flush=True)
        return dict(state["record"])
    cfg = PretrainConfig(
        steps=args.simclr_steps,
        batch_size=args.simclr_batch,
        warmup=max(1, args.simclr_steps // 20),
        seed=seed,
        progress=not args.no_progress,
    )
    threads = args.simclr_threads or args.threads
    torch.set_num_threads(threads)
    try:
        pre = pretrain_simclr(model.backbone, unlabeled, cfg)
    finally:
        torch.set_num_threads(args.threads)
    last = pre.history[-1]
    record = {
        "config": cfg.to_dict(),
        "final_loss": last["loss"],
        "final_contrastive_acc": last["acc"],
        "cpu_seconds": pre.cpu_seconds,
        "wall_seconds": pre.wall_seconds,
        "threads": threads,
    }
    print(
        f"SimCLR: {cfg.steps} steps x {cfg.batch_size} images, loss {last['loss']:.3f}, "
        f"contrastive acc {last['acc']:.3f}, {pre.cpu_seconds:.0f} CPU s",
        flush=True,
    )
    torch.save({"backbone": model.backbone.state_dict(), "record": record}, path)
    model.backbone.train()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = resolve_device(args.device)
        if args.threads < 1 or (args.simclr_threads is not None and args.simclr_threads < 1):
            raise ValueError("--threads and --simclr-threads must be >= 1")
        ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
        train_seed = args.seed if args.train_seed is None else args.train_seed
        cfg = FixMatchConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            mu=args.mu,
            precision=args.precision,
            tau=args.tau,
            lambda_u=args.lambda_u,
            lr=args.lr,
            weight_decay=args.weight_decay,
            ema=args.ema,
            dist_align=args.dist_align,
            flex=args.flex,
            ema_teacher=args.ema_teacher,
            lambda_c=args.lambda_c,
            contrast_threshold=args.contrast_threshold,
            contrast_temperature=args.contrast_temperature,
            smooth_alpha=args.smooth_alpha,
            queue_size=args.queue_size,
            ops=ops,
            magnitude=args.magnitude,
            cutout=args.cutout,
            eval_every=args.eval_every,
            seed=train_seed,
            progress=not args.no_progress,
        )
    except ValueError as e:  # a bad device or setting, before any data is loaded
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    root = {} if args.root is None else {"root": args.root}
    train = load_fashion_mnist(split="train", **root)
    test = load_fashion_mnist(split="test", **root)
    split = semisup_split(train.labels, per_class=10, n_val=5000, seed=args.seed)
    x, y = train.images, np.asarray(train.labels)
    # the unlabeled set: every training image but the 100 labeled ones (val included)
    unl = np.setdiff1d(np.arange(len(y)), split.labeled)
    truth = np.full(len(unl), -1, dtype=np.int64)
    is_val = np.isin(unl, split.val)
    truth[is_val] = y[unl[is_val]]
    torch.manual_seed(train_seed)
    model = build_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    simclr = simclr_init(model, x[unl], args, train_seed) if args.simclr_steps > 0 else None
    val = (x[split.val], y[split.val])
    xt, yt = test.images, np.asarray(test.labels)

    def on_eval(row: dict[str, Any], ema: Classifier) -> None:
        if args.test_curve:  # for the report's curve only: nothing is chosen on it
            row["test_acc_not_used_for_choices"] = accuracy(ema, xt, yt)
        if args.no_progress:
            print(describe(row), flush=True)

    res = fixmatch(
        model,
        x[split.labeled],
        y[split.labeled],
        x[unl],
        cfg,
        val=val,
        unlabeled_truth=truth,
        checkpoint=args.out / "checkpoint.pt",
        on_eval=on_eval,
        device=device,
    )
    test_acc = accuracy(res.model, xt, yt)
    # the chosen model's class probabilities, plain and horizontally flipped, for ensembles
    # and test-time augmentation chosen on validation (training.experiments.fmnist_ensemble)
    xv = val[0]
    np.savez_compressed(
        args.out / "predictions.npz",
        val=predict_proba(res.model, xv),
        val_flip=predict_proba(res.model, xv[..., ::-1]),
        test=predict_proba(res.model, xt),
        test_flip=predict_proba(res.model, xt[..., ::-1]),
    )
    out: dict[str, Any] = {
        "experiment": "fmnist-fixmatch",
        "command": "python -m training.experiments.fmnist_fixmatch "
        + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "seed": args.seed,
        "train_seed": train_seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": cfg.to_dict(),
        "data": {
            "labeled": len(split.labeled),
            "unlabeled": len(unl),
            "val": len(split.val),
            "test": len(yt),
        },
        "simclr": simclr,
        "history": res.history,
        "best_step": res.best_step,
        "val_acc": res.best_val_acc,
        "test_acc": test_acc,
        "fixmatch_cpu_seconds": res.cpu_seconds,
        "fixmatch_wall_seconds": res.wall_seconds,
        "cpu_seconds": time.process_time() - t_cpu,
        "wall_seconds": time.perf_counter() - t_wall,
        "threads": args.threads,
        "device": str(device),
    }
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| step | mask | pseudo precision (val imgs) | val acc |")
    print("|---|---|---|---|")
    for r in res.history:
        print(
            f"| {r['step']} | {r['mask']:.3f} | {r['pseudo_precision_known']:.3f} "
            f"| {r['val_acc']:.4f} |"
        )
    print(
        f"chosen step {res.best_step}: val {res.best_val_acc:.4f}, test {test_acc:.4f}; "
        f"{out['cpu_seconds']:.0f} CPU s, {out['wall_seconds']:.0f} wall s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
