"""Fashion-MNIST ensembles of self-trained models (experiment 2): averages the class
probabilities that ``fmnist_fixmatch`` saved (``predictions.npz``: validation and test, plain and
horizontally flipped) over the first 1..N member runs, with and without the flipped view, and
lets the validation split choose among those; the test set scores the choice once.

    python -m training.experiments.fmnist_ensemble runs/fm_a runs/fm_b runs/fm_c --out ens.json

Members should share ``--seed`` (the same 100 labeled images and validation split) and differ
in ``--train-seed``; a member with another split is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.fashion_mnist import load_fashion_mnist
from training.data.semisup import semisup_split


def load_member(run: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    pred, res = run / "predictions.npz", run / "results.json"
    if not pred.is_file() or not res.is_file():
        raise ValueError(
            f"{run}: no predictions.npz / results.json (a finished fmnist_fixmatch run?)"
        )
    with np.load(pred) as d:
        return {k: d[k] for k in ("val", "val_flip", "test", "test_flip")}, json.loads(
            res.read_text()
        )


def combine(members: list[dict[str, np.ndarray]], part: str, flip: bool) -> np.ndarray:
    """Mean class probabilities of the members on ``part`` (val or test), averaged with the
    flipped view when ``flip``."""
    views = [m[part] for m in members] + ([m[f"{part}_flip"] for m in members] if flip else [])
    return np.mean(views, axis=0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.fmnist_ensemble")
    ap.add_argument("runs", nargs="+", type=Path, help="fmnist_fixmatch --out folders")
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    try:
        loaded = [load_member(r) for r in args.runs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = {res["seed"] for _, res in loaded}
    if len(seeds) != 1:
        print(f"error: members were trained on different labeled draws (--seed {sorted(seeds)})",
              file=sys.stderr)  # fmt: skip
        return 2
    seed = seeds.pop()
    root = {} if args.root is None else {"root": args.root}
    train = load_fashion_mnist(split="train", **root)
    yv = np.asarray(train.labels)[
        semisup_split(train.labels, per_class=10, n_val=5000, seed=seed).val
    ]
    yt = np.asarray(load_fashion_mnist(split="test", **root).labels)
    rows = []
    for n in range(1, len(loaded) + 1):
        members = [p for p, _ in loaded[:n]]
        for flip in (False, True):
            rows.append({
                "members": n, "flip": flip,
                "val_acc": float((combine(members, "val", flip).argmax(1) == yv).mean()),
                "test_acc": float((combine(members, "test", flip).argmax(1) == yt).mean()),
            })  # fmt: skip
    best = max(rows, key=lambda r: (r["val_acc"], -r["members"], not r["flip"]))
    print("| members | flip | val acc | test acc |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['members']} | {r['flip']} | {r['val_acc']:.4f} | {r['test_acc']:.4f} |")
    print(f"validation chose {best['members']} member(s), flip {best['flip']}: "
          f"val {best['val_acc']:.4f}, test {best['test_acc']:.4f}")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = {"seed": seed, "runs": [str(r) for r in args.runs], "rows": rows, "chosen": best}
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
