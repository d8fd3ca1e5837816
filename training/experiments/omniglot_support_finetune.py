"""Test-time fine-tuning on the support set (P>M>F: Hu et al., "Pushing the Limits of Simple
Pipelines for Few-Shot Learning", CVPR 2022), measured on the held-out within-alphabet proxy
(docs/omniglot-model/not-kept.md, "Test-time fine-tuning on the support set").

For every episode a copy of the backbone is fine-tuned on pseudo-episodes built from the
episode's own support images alone: each step draws ``1 + queries`` augmented copies of every
support (the recipe's own augmentation), the first copy is the pseudo-support and the others
its pseudo-queries, under the checkpoint's own few-shot loss (for the default model the
ProtoNet's squared euclidean distance). BatchNorm keeps its trained statistics. The episode
is then scored with the 27-view average embedding as served, before fine-tuning and after
each step count asked for. A research script: it needs torch, so it could only ever be an
offline path, never the torch-free server's.

    python -m training.experiments.omniglot_support_finetune CKPT --split-seed S \
        [--episodes 200] [--lr 1e-4] [--steps 10,20,40] [--queries 3]

(20-way 1-shot within-alphabet episodes, support and query by different drawers, one query
per class as in the original runs, episode seed 12345; one torch thread.)
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from training.augment import AugmentConfig, augment
from training.methods.base import FewShotClassifier


def finetune_on_support(
    method: FewShotClassifier,
    support: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    aug: AugmentConfig,
    steps: int,
    lr: float,
    queries: int,
    gen: torch.Generator,
    on_step: Callable[[int, FewShotClassifier, float], None] | None = None,
) -> FewShotClassifier:
    """A fine-tuned copy of ``method`` (the original is untouched), trained with its own
    ``forward`` and ``loss``. ``support`` is one [0, 1] image per class, [N, C, H, W];
    ``on_step(step, model, loss)`` runs after each step."""
    model = copy.deepcopy(method).eval()  # eval: BatchNorm keeps its trained statistics
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(support)
    labels = torch.arange(n)
    for step in range(1, steps + 1):
        copies = normalise(augment(support.repeat(1 + queries, 1, 1, 1), aug, gen))  # copy-major
        loss = model.loss(model(copies[:n], labels, copies[n:]), labels.repeat(queries))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, model, float(loss.detach()))
    return model


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.experiments.omniglot_support_finetune")
    ap.add_argument("checkpoint", help="a protoserve train metatrain checkpoint.pt")
    ap.add_argument("--split-seed", type=int, required=True, help="the held-out split's seed")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    ap.add_argument("--steps", default="10,20,40", help="step counts to score after")
    ap.add_argument("--queries", type=int, default=3, help="pseudo-queries per support, per step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        args.marks = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        ap.error(f"--steps takes comma-separated step counts, got {args.steps!r}")
    if args.marks[0] < 1 or args.episodes < 1 or args.queries < 1 or args.lr <= 0:
        ap.error("--steps, --episodes and --queries must be >= 1 and --lr > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from training.backbones.shift_average import ShiftAverage
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig, build_data, build_method
    from training.data.sampler import EpisodeSampler

    args = _parse(argv)
    torch.set_num_threads(args.threads)
    marks = args.marks
    state = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict({**state["config"], "split_seed": args.split_seed})
    _, ds = build_data(cfg, state["preprocess"])
    method = build_method(cfg, ds.num_channels, ds.size)
    method.load_state_dict(state["model"])
    method.eval()
    aug = AugmentConfig(**cfg.augment_kwargs())
    sampler = EpisodeSampler(ds, 20, 1, 1, seed=12345, within_superclass=True, split_drawers=True)

    def accuracy(bb: nn.Module, sx: torch.Tensor, qx: torch.Tensor, ql: np.ndarray) -> float:
        views = ShiftAverage(bb, 3, (-10.0, 0.0, 10.0), tuple(ds.size)).eval()
        with torch.no_grad():
            s, q = views(ds.normalise(sx)), views(ds.normalise(qx))
        return float((torch.cdist(q, s).argmin(1).numpy() == ql).mean())

    scores: dict[int, list[float]] = {0: []} | {m: [] for m in marks}
    t0 = time.time()
    for i in range(args.episodes):
        ep = sampler.episode(i)
        sx, qx = ds.batch(ep.support, ep.support_turns), ds.batch(ep.query, ep.query_turns)
        scores[0].append(accuracy(method.backbone, sx, qx, ep.query_labels))

        def score(step: int, model: FewShotClassifier, _loss: float) -> None:
            if step in scores:
                scores[step].append(accuracy(model.backbone, sx, qx, ep.query_labels))  # noqa: B023

        gen = torch.Generator().manual_seed(1000 + i)
        finetune_on_support(
            method, sx, ds.normalise, aug, marks[-1], args.lr, args.queries, gen, score
        )
        if (i + 1) % 25 == 0:
            means = {k: round(100 * float(np.mean(v)), 2) for k, v in scores.items()}
            print(f"{i + 1} episodes, {time.time() - t0:.0f} s: {means}", flush=True)
    for k, v in scores.items():
        a = np.asarray(v)
        ci = 196 * a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
        print(f"{k:3d} steps: {100 * a.mean():.2f}% +- {ci:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
