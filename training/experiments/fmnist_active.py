"""Experiment 4: active learning vs random sampling on Fashion-MNIST, 100 -> 1,000 labels.

Start from the 100 labels of ``semisup_split`` (seed ``--seed``); each round, every strategy of
``training.active`` (random, least-confidence, margin, entropy, BALD by MC dropout, diverse)
scores the whole unlabeled pool with the current model and labels its top 100; the model is then
retrained from scratch (same initialisation seed) on all labels so far, and its test accuracy
recorded. Nine rounds: 100, 200, ..., 1,000 labels.

- Pool: the 60,000 training images minus the 100 start labels minus the split's 5,000
  validation images (54,900). The validation labels chose the recipe (``--tune``, before any
  loop ran) and, with ``--val-stop N``, each fit's best epoch (on N of them); they are never
  labeled by a strategy. Without ``--val-stop`` each fit keeps its last weights.
- Model: ``training.finetune.fmnist_classifier``: ``StridedCNN`` (the default) or, with
  ``--arch small_vgg``, SmallVGG, with dropout before the linear head; a fixed number of AdamW steps
  per fit (cosine schedule), so each round costs the same. MC dropout samples that head
  dropout (backbone features computed once), ``--mc-samples`` passes over the whole pool.
- The test set is only scored (once per round), never used for a choice.

    python -m training.experiments.fmnist_active --tune --arch strided --seed 0 --out DIR
    python -m training.experiments.fmnist_active --seed 0 --out DIR
    python -m training.experiments.fmnist_active --summarize --seeds 0 1 2 --out DIR

Results and every command: docs/results/active.md.

One run per (seed, strategy) is written to ``OUT/seed{S}/{strategy}.json`` as it finishes
(an existing one is skipped, so an interrupted run resumes); ``--summarize`` averages the seeds
into a table (labels x strategy), ``OUT/active.json`` and a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.active import NEEDS, STRATEGIES, simulate

START, BUDGET, ROUNDS = 100, 100, 9
ARCHS = ("strided", "small_vgg")  # training.finetune.FMNIST_ARCHS (no torch import for --help)


@dataclass(frozen=True)
class Recipe:
    """How every round's model is trained and scored (chosen on the validation split)."""

    arch: str = "strided"
    width: int = 32
    dropout: float = 0.3
    lr: float = 3e-3
    epochs: int = 20
    steps_per_epoch: int = 20
    batch_size: int = 64
    weight_decay: float = 5e-4
    augment: bool = True
    mc_samples: int = 20
    threads: int = 1
    val_stop: int = 0  # > 0: this many val images choose each fit's best epoch


def fit_model(
    recipe: Recipe,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> Any:
    """A fresh model trained on (x, y); with ``val``, the epoch with the best validation
    accuracy is restored (early stopping by checkpoint choice, ``FitConfig`` patience off)."""
    import torch

    from training.finetune import FitConfig, fit, fmnist_augment, fmnist_classifier

    torch.manual_seed(seed)
    model = fmnist_classifier(10, dropout=recipe.dropout, width=recipe.width, arch=recipe.arch)
    cfg = FitConfig(
        mode="full",
        epochs=recipe.epochs,
        steps_per_epoch=recipe.steps_per_epoch,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        seed=seed,
        num_threads=recipe.threads,
    )
    fit(model, x, y, cfg, val=val, augment=fmnist_augment if recipe.augment else None)
    return model


def score_model(
    recipe: Recipe, model: Any, x: np.ndarray, needs: frozenset[str], seed: int = 0
) -> dict[str, np.ndarray]:
    """What a strategy needs from the model on images ``x``: one backbone pass per need."""
    import torch

    from training.inference import embed, predict_proba

    out: dict[str, np.ndarray] = {}
    if "embeddings" in needs:
        out["embeddings"] = embed(model, x)
        if "probs" in needs:  # the head on the same features (eval mode: dropout is identity)
            with torch.no_grad():
                logits = model.head(torch.from_numpy(out["embeddings"]))
            out["probs"] = torch.softmax(logits, 1).numpy()
    elif "probs" in needs:
        out["probs"] = predict_proba(model, x)
    if "mc_probs" in needs:
        out["mc_probs"] = predict_proba(model, x, mc_samples=recipe.mc_samples, seed=seed)
    return out


def load(seed: int, root: str | None = None) -> tuple[Any, Any, Any]:
    from training.data.fashion_mnist import load_fashion_mnist
    from training.data.semisup import semisup_split

    kw = {"root": root} if root else {}
    train = load_fashion_mnist(split="train", **kw)
    test = load_fashion_mnist(split="test", **kw)
    return train, test, semisup_split(train.labels, per_class=10, n_val=5000, seed=seed)


class Memo:
    """Round 0 is the same fit for every strategy (same labels, same seed): the first fit a
    Memo sees is kept, with its evaluation, and reused when the same labeled set (bytes),
    recipe and seed come again; every other fit is fresh."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.model: Any = None
        self.result: Any = None

    def fit(
        self,
        recipe: Recipe,
        x: np.ndarray,
        y: np.ndarray,
        seed: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Any:
        key = hashlib.sha1(x.tobytes() + y.tobytes() + repr((recipe, seed)).encode()).hexdigest()
        if self.key is None:
            self.key, self.model = key, fit_model(recipe, x, y, seed, val)
            return self.model
        return self.model if key == self.key else fit_model(recipe, x, y, seed, val)

    def evaluate(self, model: Any, fn: Any) -> Any:
        """``fn(model)``, computed once for the kept model."""
        if model is not self.model:
            return fn(model)
        if self.result is None:
            self.result = fn(model)
        return self.result

    def accuracy(self, model: Any, x: np.ndarray, y: np.ndarray) -> float:
        from training.inference import accuracy

        return float(self.evaluate(model, lambda m: accuracy(m, x, y)))


def run_strategy(
    strategy: str,
    seed: int,
    recipe: Recipe,
    data: tuple[Any, Any, Any],
    rounds: int,
    memo: Memo | None = None,
) -> dict[str, Any]:
    from training.inference import accuracy

    train, test, split = data
    memo = memo or Memo()
    xv, yv = train.images[split.val], train.labels[split.val]
    stop = None
    if recipe.val_stop:
        pick = np.sort(np.random.default_rng(seed).choice(split.val.size, recipe.val_stop, False))
        stop = (xv[pick], yv[pick])
    val_acc: list[float] = []

    def evaluate(m: Any) -> float:
        """Test accuracy (recorded); val accuracy on all 5,000 kept alongside."""
        test_acc, v = memo.evaluate(
            m, lambda m: (accuracy(m, test.images, test.labels), accuracy(m, xv, yv))
        )
        val_acc.append(v)
        return test_acc

    c0, t0 = time.process_time(), time.perf_counter()

    def on_round(r: Any) -> None:
        print(
            f"seed {seed} {strategy:16s} {r.n_labeled:5d} labels: test {r.accuracy:.4f} "
            f"val {val_acc[-1]:.4f} (fit {r.fit_cpu_s:.0f} + select {r.select_cpu_s:.0f} CPU s)",
            flush=True,
        )

    sim = simulate(
        strategy,
        train.images,
        train.labels,
        split.labeled,
        BUDGET,
        rounds,
        fit_fn=lambda x, y: memo.fit(recipe, x, y, seed, stop),
        eval_fn=evaluate,
        score_fn=lambda m, x, needs: score_model(recipe, m, x, needs, seed),
        exclude=split.val,
        seed=seed,
        on_round=on_round,
    )
    return {
        **sim.to_json(),
        "val_accuracy": val_acc,
        "seed": seed,
        "recipe": asdict(recipe),
        "pool": int(len(train) - split.labeled.size - split.val.size),
        "needs": sorted(NEEDS[strategy]),
        "cpu_seconds": time.process_time() - c0,
        "wall_seconds": time.perf_counter() - t0,
    }


# -- choosing the recipe on the validation split ------------------------------------------
TUNE_GRID = {
    "small_vgg": {"width": (8, 16), "augment": (False, True), "lr": (1e-3, 3e-3)},
    "strided": {"width": (32,), "augment": (False, True), "lr": (1e-3, 3e-3)},
}


def tune(seed: int, base: Recipe, data: tuple[Any, Any, Any]) -> dict[str, Any]:
    """Each grid recipe trained on the 100 start labels and on 1,000 (the 100 plus 900 random
    pool images); the best mean validation accuracy over the two wins."""
    from training.inference import accuracy

    train, _, split = data
    pool = np.setdiff1d(split.unlabeled, split.val)
    extra = np.random.default_rng(seed).choice(pool, size=900, replace=False)
    sets = {100: split.labeled, 1000: np.concatenate([split.labeled, extra])}
    xv, yv = train.images[split.val], train.labels[split.val]
    rows = []
    grid = TUNE_GRID[base.arch]
    for width in grid["width"]:
        for aug in grid["augment"]:
            for lr in grid["lr"]:
                r = replace(base, width=width, augment=aug, lr=lr)
                row: dict[str, Any] = {"arch": base.arch, "width": width, "augment": aug, "lr": lr}
                c0 = time.process_time()
                for n, idx in sets.items():
                    m = fit_model(r, train.images[idx], train.labels[idx], seed)
                    row[f"val_{n}"] = accuracy(m, xv, yv)
                row["val_mean"] = (row["val_100"] + row["val_1000"]) / 2
                row["cpu_s"] = time.process_time() - c0
                print(json.dumps(row), flush=True)
                rows.append(row)
    best = max(rows, key=lambda r: r["val_mean"])
    return {"seed": seed, "base": asdict(base), "rows": rows, "best": best}


# -- summary: table, labels saved, plot -----------------------------------------------------
def collect(out: Path, seeds: Sequence[int]) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for s in STRATEGIES:
        for seed in seeds:
            p = out / f"seed{seed}" / f"{s}.json"
            if p.is_file():
                runs.setdefault(s, {})[seed] = json.loads(p.read_text())
    return runs


def labels_to_reach(n: list[int], acc: list[float], target: float) -> int | None:
    """The fewest labels (on the round grid) whose accuracy is >= target."""
    for k, a in zip(n, acc, strict=True):
        if a >= target:
            return k
    return None


def class_balance(labeled: Sequence[int], labels: np.ndarray, classes: int = 10) -> list[int]:
    """How many of the labeled images fall in each class."""
    return np.bincount(labels[np.asarray(labeled, dtype=np.int64)], minlength=classes).tolist()


def summarize(
    out: Path, seeds: Sequence[int], plot: Path | None, labels: np.ndarray | None = None
) -> dict[str, Any]:
    """Table, labels-to-reach and plot over the seeds that have every strategy; with the
    training ``labels``, also each strategy's final per-class label counts (min/max)."""
    runs = collect(out, seeds)
    if "random" not in runs:
        raise SystemExit(f"no random runs under {out} for seeds {list(seeds)}")
    common = sorted(set.intersection(*(set(v) for v in runs.values())))
    if not common:
        raise SystemExit("no seed has every strategy: run them first")
    n = runs["random"][common[0]]["n_labeled"]
    mean = {s: np.mean([runs[s][k]["accuracy"] for k in common], axis=0) for s in runs}
    std = {s: np.std([runs[s][k]["accuracy"] for k in common], axis=0) for s in runs}
    target = float(mean["random"][-1])
    reach = {s: labels_to_reach(n, mean[s].tolist(), target) for s in runs}
    per_seed_reach = {
        s: {
            k: labels_to_reach(n, runs[s][k]["accuracy"], runs["random"][k]["accuracy"][-1])
            for k in common
        }
        for s in runs
    }
    cpu = sum(r["cpu_seconds"] for v in runs.values() for k, r in v.items() if k in common)
    order = [s for s in STRATEGIES if s in runs]
    header = "| labels | " + " | ".join(order) + " |"
    lines = [header, "|" + "---|" * (len(order) + 1)]
    for i, k in enumerate(n):
        cells = []
        for s in order:
            best = max(mean[t][i] for t in order)
            v = f"{100 * mean[s][i]:.2f}"
            if len(common) > 1:
                v += f" ± {100 * std[s][i]:.2f}"
            cells.append(f"**{v}**" if mean[s][i] == best else v)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"random at {n[-1]} labels: {100 * target:.2f}% (mean of seeds {common})")
    for s in order:
        r = reach[s]
        saved = f"{1 - r / n[-1]:.0%} fewer labels" if r else f"never within {n[-1]}"
        print(f"  {s:16s} reaches it at {r} labels ({saved}); per seed {per_seed_reach[s]}")
    balance: dict[str, dict[str, list[int]]] = {}
    if labels is not None:
        for s in order:
            counts = {str(k): class_balance(runs[s][k]["labeled"], labels) for k in common}
            balance[s] = counts
            lo = [min(c) for c in counts.values()]
            hi = [max(c) for c in counts.values()]
            print(f"  {s:16s} final labels per class: min {lo}, max {hi} (seeds {common})")
    print(f"CPU: {cpu:.0f} s over {len(common)} seed(s)")
    summary = {
        "experiment": "fmnist_active",
        "seeds": common,
        "n_labeled": n,
        "mean_accuracy": {s: mean[s].tolist() for s in order},
        "std_accuracy": {s: std[s].tolist() for s in order},
        "random_final": target,
        "labels_to_reach_random_final": reach,
        "labels_to_reach_per_seed": per_seed_reach,
        "cpu_seconds": cpu,
        "wall_seconds": sum(
            r["wall_seconds"] for v in runs.values() for k, r in v.items() if k in common
        ),
        "recipe": runs["random"][common[0]]["recipe"],
        "pool": runs["random"][common[0]]["pool"],
        "table": table,
        "runs": {s: {str(k): runs[s][k]["accuracy"] for k in common} for s in order},
        "class_counts_final": balance,
        "mean_val_accuracy": {
            s: np.mean([runs[s][k]["val_accuracy"] for k in common], axis=0).tolist()
            for s in order
            if all("val_accuracy" in runs[s][k] for k in common)
        },
    }
    (out / "active.json").write_text(json.dumps(summary, indent=1) + "\n")
    if plot is not None:
        draw(plot, n, mean, std, order, target, len(common))
    return summary


def draw(
    path: Path,
    n: list[int],
    mean: dict[str, np.ndarray],
    std: dict[str, np.ndarray],
    order: list[str],
    target: float,
    n_seeds: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for s in order:
        style = {"color": "black", "linestyle": "--"} if s == "random" else {}
        (line,) = ax.plot(n, 100 * mean[s], marker="o", markersize=3, label=s, **style)
        if n_seeds > 1:
            lo, hi = 100 * (mean[s] - std[s]), 100 * (mean[s] + std[s])
            ax.fill_between(n, lo, hi, alpha=0.12, color=line.get_color(), linewidth=0)
    ax.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test accuracy (%)")
    seeds = f"mean of {n_seeds} seeds, band ±1 std" if n_seeds > 1 else "one seed"
    ax.set_title(f"Fashion-MNIST active learning, rounds of 100 ({seeds})")
    ax.set_xticks(n)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_active")
    ap.add_argument("--seed", type=int, default=None, help="one seed (split, init, random)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist_active"))
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--arch", choices=ARCHS, default=Recipe.arch)
    ap.add_argument("--width", type=int, default=Recipe.width)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--mc-samples", type=int, default=Recipe.mc_samples)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--val-stop",
        type=int,
        default=Recipe.val_stop,
        help="> 0: each fit keeps its best epoch on this many val images (0: the last epoch)",
    )
    ap.add_argument("--tune", action="store_true", help="choose the recipe on val, then stop")
    ap.add_argument("--summarize", action="store_true", help="only the table and plot")
    ap.add_argument("--plot", type=Path, default=None, help="default OUT/active.png")
    args = ap.parse_args(argv)
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    recipe = Recipe(
        arch=args.arch,
        width=args.width,
        lr=args.lr,
        augment=not args.no_augment,
        mc_samples=args.mc_samples,
        threads=args.threads,
        val_stop=args.val_stop,
    )
    plot = args.plot or args.out / "active.png"
    if args.summarize:
        from training.data.fashion_mnist import load_fashion_mnist

        kw = {"root": args.root} if args.root else {}
        summarize(args.out, seeds, plot, load_fashion_mnist(split="train", **kw).labels)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    command = "python -m training.experiments.fmnist_active " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    for seed in seeds:
        data = load(seed, args.root)
        memo = Memo()
        if args.tune:
            c0 = time.process_time()
            res = tune(seed, recipe, data)
            res.update(command=command, cpu_seconds=time.process_time() - c0)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"tune_seed{seed}_{args.arch}.json").write_text(
                json.dumps(res, indent=1) + "\n"
            )
            print("best:", res["best"])
            continue
        for s in args.strategies:
            path = args.out / f"seed{seed}" / f"{s}.json"
            if path.is_file():
                print(f"{path} exists: skipped")
                continue
            res = run_strategy(s, seed, recipe, data, args.rounds, memo)
            res["command"] = command
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=1) + "\n")
    if not args.tune:
        summarize(args.out, seeds, plot, data[0].labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
