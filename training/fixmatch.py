"""FixMatch (Sohn et al., "FixMatch: Simplifying semi-supervised learning with consistency and
confidence", NeurIPS 2020): online consistency training with few labels.

Every step draws ``batch_size`` labeled images and ``mu * batch_size`` unlabeled ones:

* labeled: cross-entropy of the model on a weakly augmented view (flip + shift);
* unlabeled: the model's prediction on the WEAK view (no gradient) gives a pseudo-label, its
  argmax, kept only where its top probability is >= ``tau``; the model's logits on a STRONG view
  (``training.noise``: RandAugment + Cutout) are trained with cross-entropy against it, weighted
  by ``lambda_u`` (loss averaged over all ``mu * batch_size`` rows, masked ones count 0);
* optional distribution alignment (ReMixMatch, Berthelot et al. 2020): the weak-view
  probabilities are multiplied by ``prior / running mean of the predictions`` and renormalised
  before thresholding, so the pseudo-labels cannot collapse onto a few classes (the prior is
  uniform unless given);
* optional CoMatch (``lambda_c > 0``, ``training.comatch``): a projection head, pseudo-labels
  smoothed over a memory of recent embeddings, and a graph-contrastive loss that pulls each
  strong view's embedding towards the weak views of the images its pseudo-label agrees with;
* an exponential moving average (EMA) of the weights is the model that is evaluated: every
  ``eval_every`` steps on the validation images, the best EMA weights by validation accuracy
  are kept and returned.

SGD with Nesterov momentum and FixMatch's cosine decay ``lr * cos(7 pi k / (16 K))``. The run is
seeded by one ``torch.Generator`` (batches and noise) plus ``torch.manual_seed`` (dropout), and
can be resumed from a checkpoint file written at every evaluation (``checkpoint=``).

The two pieces tests check exactly are pure functions: ``pseudo_labels`` (argmax, confidence,
mask) and ``ema_update``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.checkpoint import load_checkpoint, save_checkpoint
from training.comatch import CoMatch
from training.config import PRECISIONS
from training.devices import channels_last, full_precision
from training.finetune import Classifier
from training.flexmatch import ClassThresholds
from training.inference import accuracy, to_unit
from training.noise import OPS, rand_augment, weak_augment


@dataclass(frozen=True)
class FixMatchConfig:
    steps: int = 4000
    batch_size: int = 64  # labeled images per step
    mu: int = 7  # unlabeled images per step = mu * batch_size
    tau: float = 0.95  # confidence threshold of the pseudo-labels
    lambda_u: float = 1.0  # weight of the unlabeled loss
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    cosine: bool = True  # lr * cos(7 pi k / (16 K))
    ema: float = 0.999  # EMA decay of the evaluated weights (0: no EMA, the model itself)
    dist_align: bool = False  # ReMixMatch distribution alignment of the weak predictions
    align_momentum: float = 0.999  # running mean of the weak predictions for the alignment
    flex: bool = False  # FlexMatch class-wise thresholds (training/flexmatch.py)
    ema_teacher: bool = False  # pseudo-labels from the EMA weights instead of the raw model
    # CoMatch (training/comatch.py), on when lambda_c > 0: graph-contrastive loss weight, graph
    # threshold, embedding temperature, memory smoothing (1: none), queue rows, embedding size
    lambda_c: float = 0.0
    contrast_threshold: float = 0.8
    contrast_temperature: float = 0.2
    smooth_alpha: float = 0.9
    queue_size: int = 2560
    contrast_dim: int = 64
    # noise: weak = flip + shift; strong = weak, RandAugment (n_ops, magnitude 0..10), Cutout
    shift: int = 2
    n_ops: int = 2
    magnitude: float = 10.0
    cutout: float = 0.5
    ops: tuple[str, ...] = OPS  # the RandAugment operations the strong view draws from
    eval_every: int = 250
    seed: int = 0
    progress: bool = True
    # "bf16": the backbone trains under bfloat16 autocast (heads, softmax, losses float32)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.mu < 1 or self.eval_every < 1:
            raise ValueError(
                "steps, batch_size, mu and eval_every must be >= 1, got "
                f"{self.steps}, {self.batch_size}, {self.mu}, {self.eval_every}"
            )
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.lambda_u < 0 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(
                f"need lambda_u >= 0, lr > 0, weight_decay >= 0: "
                f"{self.lambda_u}, {self.lr}, {self.weight_decay}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.ema < 1.0 or not 0.0 <= self.align_momentum < 1.0:
            raise ValueError(f"ema and align_momentum must be in [0, 1): {self.ema}")
        if self.shift < 0 or self.n_ops < 0 or not 0.0 <= self.magnitude <= 10.0:
            raise ValueError("need shift >= 0, n_ops >= 0, magnitude in [0, 10]")
        if self.lambda_c < 0:
            raise ValueError(f"lambda_c must be >= 0, got {self.lambda_c}")
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"cutout must be in [0, 1], got {self.cutout}")
        bad = [op for op in self.ops if op not in OPS]
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {', '.join(OPS)}; got {bad}")
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = list(self.ops)
        return d


@dataclass
class FixMatchResult:
    model: Classifier  # the best EMA weights by validation accuracy (the last ones without val)
    best_step: int
    best_val_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


# -- pure pieces ---------------------------------------------------------------------------
def align(probs: torch.Tensor, mean: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Distribution alignment: ``p * prior / mean`` renormalised per row."""
    q = probs * (prior / mean.clamp_min(1e-6))
    return q / q.sum(1, keepdim=True)


def pseudo_labels(
    probs: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(label, confidence, mask)``: each row's argmax (ties: the lowest class), its top
    probability, and the float mask ``confidence >= tau``."""
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be [N, K], got {tuple(probs.shape)}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    conf, label = probs.max(1)
    return label, conf, (conf >= tau).to(probs.dtype)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers (batch-norm
    statistics, counters) are copied from ``model``."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def lr_at(step: int, cfg: FixMatchConfig) -> float:
    if not cfg.cosine:
        return cfg.lr
    return cfg.lr * math.cos(7 * math.pi * step / (16 * cfg.steps))


def fixmatch_loss(
    model: Classifier,
    xl: torch.Tensor,
    yl: torch.Tensor,
    xu_weak: torch.Tensor,
    xu_strong: torch.Tensor,
    cfg: FixMatchConfig,
    *,
    align_state: dict[str, torch.Tensor] | None = None,
    thresholds: torch.Tensor | None = None,
    teacher: Classifier | None = None,
    comatch: CoMatch | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One step's loss. The weak view is scored without gradient, by ``teacher`` when given
    (e.g. the EMA weights, in eval mode) else by ``model`` (train mode); the labeled and strong
    views go through one forward pass (shared batch-norm statistics). ``thresholds`` (per
    class) replaces the fixed ``cfg.tau`` (FlexMatch). ``comatch`` adds CoMatch's memory
    smoothing of the pseudo-labels and its graph-contrastive loss (``training.comatch``)."""
    scorer = model if teacher is None else teacher
    with torch.no_grad():
        fw = scorer.features(xu_weak)
        probs = F.softmax(scorer.head(scorer.dropout(fw)), 1)
        if align_state is not None:
            m = align_state["mean"]
            m.mul_(cfg.align_momentum).add_(probs.mean(0), alpha=1 - cfg.align_momentum)
            probs = align(probs, m, align_state["prior"])
        if comatch is not None:
            zw, own = comatch.embed(fw), probs
            probs = comatch.smooth(probs, zw)
        label, conf, mask = pseudo_labels(probs, cfg.tau)
        if thresholds is not None:
            mask = (conf >= thresholds[label]).to(probs.dtype)
    feats = model.features(torch.cat([xl, xu_strong]))
    logits = model.head(model.dropout(feats))
    ll, lu = logits[: len(xl)], logits[len(xl) :]
    loss_x = F.cross_entropy(ll, yl)
    loss_u = (F.cross_entropy(lu, label, reduction="none") * mask).mean()
    loss = loss_x + cfg.lambda_u * loss_u
    loss_c = torch.zeros(())
    if comatch is not None:
        loss_c = comatch.loss(comatch.embed(feats[len(xl) :]), zw, probs)
        loss = loss + cfg.lambda_c * loss_c
        with torch.no_grad():
            onehot = F.one_hot(yl, probs.shape[1]).to(probs.dtype)
            comatch.push(torch.cat([zw, comatch.embed(feats[: len(xl)])]), torch.cat([own, onehot]))
    stats = {
        "loss": float(loss.detach()),
        "loss_x": float(loss_x.detach()),
        "loss_u": float(loss_u.detach()),
        "loss_c": float(loss_c.detach()),
        "mask": float(mask.mean()),
        "label": label,
        "conf": conf,
        "kept": mask.bool(),
    }
    return loss, stats


def describe(row: dict[str, Any]) -> str:
    """One evaluation row as a line of text."""
    return (
        f"step {row['step']}: loss {row['loss']:.3f} (x {row['loss_x']:.3f}, "
        f"u {row['loss_u']:.3f}, c {row.get('loss_c', 0.0):.3f}) mask {row['mask']:.3f} "
        f"pseudo-label precision {row['pseudo_precision_known']:.3f} "
        f"val {row['val_acc']:.4f} (raw weights {row.get('val_acc_model', float('nan')):.4f}) "
        f"cpu {row['cpu_seconds']:.0f}s"
    )


# -- the loop ------------------------------------------------------------------------------
_STATS = ("loss", "loss_x", "loss_u", "loss_c", "mask")  # averaged per evaluation row


def _val_acc(model: Classifier, val: tuple[np.ndarray, np.ndarray] | None) -> float:
    with full_precision(model):  # scored as the exported model serves
        return float("nan") if val is None else accuracy(model, val[0], val[1])


def fixmatch(
    model: Classifier,
    x_labeled: np.ndarray,
    y_labeled: np.ndarray,
    x_unlabeled: np.ndarray,
    cfg: FixMatchConfig,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    unlabeled_truth: np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    on_eval: Callable[[dict[str, Any], Classifier], None] | None = None,
    device: torch.device | str = "cpu",
) -> FixMatchResult:
    """Train ``model`` in place with FixMatch; return the best EMA weights by val accuracy.

    Images are uint8 ``[N, C, H, W]``. ``unlabeled_truth`` (int [N_u], -1 where unknown) is for
    monitoring only: the precision of the kept pseudo-labels on the rows whose label is known
    (e.g. the validation images, which are among the unlabeled ones). ``checkpoint``: a file
    written at every evaluation and resumed from when it exists. ``on_eval(row, ema_model)``
    is called after every evaluation (e.g. to score the test set for a curve). ``device``:
    where the model trains and the images live; every random draw (batches, noise) comes from
    the same seeded CPU generator whatever the device, so only float rounding differs.
    """
    dev = torch.device(device)
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    xl_all = to_unit(x_labeled)
    yl_all = torch.as_tensor(np.asarray(y_labeled), dtype=torch.int64)
    if yl_all.shape != (len(xl_all),):
        raise ValueError(f"{len(xl_all)} labeled images but labels of shape {tuple(yl_all.shape)}")
    if len(xl_all) == 0 or len(x_unlabeled) == 0:
        raise ValueError("need at least one labeled and one unlabeled image")
    if yl_all.min() < 0 or yl_all.max() >= model.num_classes:
        raise ValueError(f"labels must be in [0, {model.num_classes})")
    xu_all = torch.from_numpy(np.ascontiguousarray(x_unlabeled))  # uint8, converted per batch
    to_unit(xu_all[:1])
    truth = None
    if unlabeled_truth is not None:
        truth = torch.as_tensor(np.asarray(unlabeled_truth), dtype=torch.int64)
        if truth.shape != (len(xu_all),):
            raise ValueError("unlabeled_truth must have one entry per unlabeled image")
    k = model.num_classes

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    comatch = (
        CoMatch(
            model.feature_dim,
            k,
            dim=cfg.contrast_dim,
            queue_size=cfg.queue_size,
            threshold=cfg.contrast_threshold,
            temperature=cfg.contrast_temperature,
            alpha=cfg.smooth_alpha,
        )
        if cfg.lambda_c > 0
        else None
    )
    model.to(dev, memory_format=torch.channels_last)  # 1.2-1.5x faster convolutions on the CPU
    model.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    if comatch is not None:
        comatch.to(dev).train()
    xl_all, yl_all, xu_all = xl_all.to(dev), yl_all.to(dev), xu_all.to(dev)
    opt = torch.optim.SGD(
        _param_groups(
            nn.ModuleList([model] if comatch is None else [model, comatch]), cfg.weight_decay
        ),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    ema = copy.deepcopy(model)
    ema.eval()
    align_state = (
        {
            "mean": torch.full((k,), 1.0 / k, device=dev),
            "prior": torch.full((k,), 1.0 / k, device=dev),
        }
        if cfg.dist_align
        else None
    )
    flex = ClassThresholds(len(xu_all), k) if cfg.flex else None
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"step": 0, "val_acc": -1.0, "state": copy.deepcopy(ema.state_dict())}
    start = 0
    prior_cpu = prior_wall = 0.0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        s = load_checkpoint(ckpt)
        if {**FixMatchConfig().to_dict(), **s["config"]} != cfg.to_dict():  # newer fields
            raise ValueError(f"checkpoint {ckpt} was written with another config")
        model.load_state_dict(s["model"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        if comatch is not None:
            comatch.load_state_dict(s["comatch"])
        gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        if align_state is not None:
            align_state = {key: v.to(dev) for key, v in s["align"].items()}
        if flex is not None:
            flex.load_state_dict(s["flex"])
        history, best, start = s["history"], s["best"], s["step"]
        prior_cpu, prior_wall = s["cpu_seconds"], s["wall_seconds"]

    def strong(x: torch.Tensor) -> torch.Tensor:
        x = weak_augment(x, gen, shift=cfg.shift)
        return rand_augment(
            x, gen, n_ops=cfg.n_ops, magnitude=cfg.magnitude, ops=cfg.ops, cutout_size=cfg.cutout
        )

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="fixmatch", unit="step")
    acc_stats = dict.fromkeys(_STATS, 0.0) | {"n": 0}
    kept_n = kept_right = 0
    class_counts = torch.zeros(k, dtype=torch.int64)
    model.train()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        il = torch.randint(len(xl_all), (cfg.batch_size,), generator=gen)
        iu = torch.randint(len(xu_all), (cfg.mu * cfg.batch_size,), generator=gen)
        xl = channels_last(weak_augment(xl_all[il], gen, shift=cfg.shift))
        xu = to_unit(xu_all[iu])
        xw = channels_last(weak_augment(xu, gen, shift=cfg.shift))
        xs = channels_last(strong(xu))
        thr = flex.thresholds(cfg.tau).to(dev) if flex is not None else None
        loss, st = fixmatch_loss(
            model,
            xl,
            yl_all[il],
            xw,
            xs,
            cfg,
            align_state=align_state,
            thresholds=thr,
            teacher=ema if cfg.ema_teacher else None,
            comatch=comatch,
        )
        st["label"], st["conf"], st["kept"] = (st[key].cpu() for key in ("label", "conf", "kept"))
        if flex is not None:
            flex.update(iu, st["label"], st["conf"], cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, cfg.ema)
        for key in _STATS:
            acc_stats[key] += st[key]
        acc_stats["n"] += 1
        class_counts += torch.bincount(st["label"][st["kept"]], minlength=k)
        if truth is not None:
            t = truth[iu]
            known = st["kept"] & (t >= 0)
            kept_n += int(known.sum())
            kept_right += int((st["label"][known] == t[known]).sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{st['loss']:.3f}", mask=f"{st['mask']:.2f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            n = max(acc_stats["n"], 1)
            row: dict[str, Any] = {
                "step": done,
                "lr": lr_at(step, cfg),
                **{key: acc_stats[key] / n for key in _STATS},
                "pseudo_per_class": class_counts.tolist(),
                "pseudo_precision_known": kept_right / kept_n if kept_n else float("nan"),
                "pseudo_known_kept": kept_n,
                "val_acc": _val_acc(ema, val),
                "val_acc_model": _val_acc(model, val),  # the raw weights, for monitoring
                "cpu_seconds": prior_cpu + time.process_time() - t_cpu,
                "wall_seconds": prior_wall + time.perf_counter() - t_wall,
            }
            if flex is not None:
                row["class_thresholds"] = [round(float(t), 4) for t in flex.thresholds(cfg.tau)]
            if row["val_acc"] > best["val_acc"] or val is None:
                best = {
                    "step": done,
                    "val_acc": row["val_acc"],
                    "state": copy.deepcopy(ema.state_dict()),
                }
            history.append(row)
            if on_eval is not None:
                on_eval(row, ema)
            if bar is not None:
                bar.write(describe(row))
            acc_stats = dict.fromkeys(_STATS, 0.0) | {"n": 0}
            kept_n = kept_right = 0
            class_counts.zero_()
            if ckpt is not None:
                save_checkpoint(
                    ckpt,
                    config=cfg.to_dict(),
                    model=model.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    comatch=comatch.state_dict() if comatch is not None else None,
                    gen=gen.get_state(),
                    torch_rng=torch.get_rng_state(),
                    align=align_state,
                    flex=flex.state_dict() if flex is not None else None,
                    history=history,
                    best=best,
                    step=done,
                    cpu_seconds=row["cpu_seconds"],
                    wall_seconds=row["wall_seconds"],
                )
    if bar is not None:
        bar.close()
    ema.load_state_dict(best["state"])
    ema.autocast_dtype = model.autocast_dtype = None  # the returned model predicts in float32
    return FixMatchResult(
        model=ema,
        best_step=int(best["step"]),
        best_val_acc=float(best["val_acc"]),
        history=history,
        cpu_seconds=prior_cpu + time.process_time() - t_cpu,
        wall_seconds=prior_wall + time.perf_counter() - t_wall,
    )


def best_weights(state: dict[str, Any]) -> dict[str, Any] | None:
    """The best-on-validation EMA weights (a ``Classifier`` state dict) of a loaded ``fixmatch``
    checkpoint; ``None`` when ``state`` is not one (e.g. a plain state dict)."""
    if "best" in state and "ema" in state and "config" in state:
        return dict(state["best"]["state"])
    return None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of rank >= 2 only (not on biases and batch-norm parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
