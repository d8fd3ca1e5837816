"""Self-supervised pre-training on unlabeled images: the backbone it returns goes on to
``training.finetune.fit`` (``Classifier(backbone, ...)``) or to meta-training.

* Rotation prediction, RotNet (Gidaris, Singh & Komodakis 2018, "Unsupervised representation
  learning by predicting image rotations"): every image is shown at 0, 90, 180 and 270 degrees
  and a small head on the backbone's features predicts which (4-way cross-entropy).
* SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A simple framework for contrastive learning
  of visual representations"): two random views of each image, an MLP projection head, and the
  NT-Xent loss (each view must pick its partner among the other ``2B - 1`` views, cosine
  similarity over a temperature). The projection head is thrown away afterwards.

Pixels follow ``training.finetune``'s convention: uint8 in, ``x / 255`` in [0, 1] to the model.
Both loops train the backbone in place and leave it in eval mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.finetune import feature_dim_of, flip_translate
from training.inference import to_unit

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class PretrainConfig:
    """``steps`` optimiser steps of ``batch_size`` source images (RotNet trains on the
    ``4 * batch_size`` rotated copies). AdamW with a cosine schedule after ``warmup`` steps."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup: int = 0
    temperature: float = 0.2  # SimCLR only
    proj_dim: int = 64  # SimCLR projection size
    seed: int = 0
    log_every: int = 50
    num_threads: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1, batch_size >= 2: {self.steps}, {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup >= 0")
        if not self.temperature > 0 or self.proj_dim < 1 or self.log_every < 1:
            raise ValueError("temperature must be > 0, proj_dim and log_every >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainResult:
    backbone: nn.Module
    head: nn.Module  # rotation classifier or projection head (not needed downstream)
    feature_dim: int
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "acc"}
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


# -- pretext tasks ---------------------------------------------------------------------------
def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] (square) -> the 4B quarter-turned copies and their turn labels 0..3."""
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"rotation needs square [B, C, H, W] images, got {tuple(x.shape)}")
    views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    labels = torch.arange(4).repeat_interleave(x.shape[0])
    return torch.cat(views), labels


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) averaged over all 2B anchors; rows of ``z1`` and
    ``z2`` with the same index are the positive pairs."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(
            f"need two [B >= 2, D] projections, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def random_resized_crop(
    x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.4, 1.0)
) -> torch.Tensor:
    """Per-image crop of a random area fraction in ``scale`` and aspect ratio in [3/4, 4/3],
    resized back to the input size (bilinear)."""
    b = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=gen)
    log_r = (torch.rand(b, generator=gen) * 2 - 1) * math.log(4 / 3)
    sw = (area * log_r.exp()).sqrt().clamp(max=1.0)
    sh = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sh)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([sw, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def simclr_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SimCLR's view generator for grayscale: random resized crop, horizontal flip, random
    brightness/contrast (strength 0.4) and, with p = 0.5, a cut-out square of 8x8."""
    b = x.shape[0]
    x = random_resized_crop(x, gen)
    x = flip_translate(x, gen, pad=0)
    bright = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.4
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * bright
    h, w = x.shape[2:]
    cut = torch.rand(b, generator=gen) < 0.5
    cy = torch.randint(0, max(1, h - 8), (b,), generator=gen)
    cx = torch.randint(0, max(1, w - 8), (b,), generator=gen)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = (
        cut.view(b, 1, 1)
        & (rows >= cy.view(b, 1, 1))
        & (rows < cy.view(b, 1, 1) + 8)
        & (cols >= cx.view(b, 1, 1))
        & (cols < cx.view(b, 1, 1) + 8)
    )
    x = x.masked_fill(hole.unsqueeze(1), 0.0)
    return x.clamp(0.0, 1.0)


# -- loops -------------------------------------------------------------------------------------
def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden),
        nn.BatchNorm1d(d_hidden),
        nn.ReLU(True),
        nn.Linear(d_hidden, d_out),
    )


def _schedule(cfg: PretrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def _run(
    backbone: nn.Module,
    head: nn.Module,
    images: np.ndarray,
    cfg: PretrainConfig,
    step_loss: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, float]],
    name: str,
) -> PretrainResult:
    xs = to_unit(images)
    if xs.shape[0] < 2:
        raise ValueError("pre-training needs at least 2 images")
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    c0, t0 = time.process_time(), time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dim = feature_dim_of(backbone, tuple(xs.shape[1:]))  # type: ignore[arg-type]
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    backbone.train().requires_grad_(True)
    head.train()
    result = PretrainResult(backbone, head, dim)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=name, unit="step")
    bs = min(cfg.batch_size, xs.shape[0])
    perm, pos = torch.randperm(xs.shape[0], generator=gen), 0
    loss_sum = acc_sum = 0.0
    count = 0
    try:
        for step in range(cfg.steps):
            if pos + bs > xs.shape[0]:
                perm, pos = torch.randperm(xs.shape[0], generator=gen), 0
            xb = xs[perm[pos : pos + bs]]
            pos += bs
            loss, acc = step_loss(xb, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, acc_sum, count = loss_sum + float(loss.detach()), acc_sum + acc, count + 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {
                    "step": step + 1,
                    "loss": loss_sum / count,
                    "acc": acc_sum / count,
                    "cpu_seconds": time.process_time() - c0,
                }
                result.history.append(row)
                loss_sum = acc_sum = 0.0
                count = 0
                if bar is not None:
                    bar.set_postfix(loss=round(row["loss"], 4), acc=round(row["acc"], 4))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads)
    backbone.eval()
    head.eval()
    result.cpu_seconds = time.process_time() - c0
    result.wall_seconds = time.perf_counter() - t0
    return result


def pretrain_rotation(
    backbone: nn.Module,
    images: np.ndarray,
    cfg: PretrainConfig,
    *,
    augment: Augment | None = None,
) -> PretrainResult:
    """RotNet: trains ``backbone`` (and a 2-layer MLP head, 4 outputs) to predict the quarter
    turn of each of the 4 copies of every image; ``augment`` applies before rotating.
    ``history`` rows carry the rotation accuracy on the training batches."""
    shape = tuple(to_unit(images[:1]).shape[1:])
    dim = feature_dim_of(backbone, shape)  # type: ignore[arg-type]
    head = _mlp(dim, dim, 4)

    def step_loss(xb: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, float]:
        if augment is not None:
            xb = augment(xb, gen)
        xr, yr = rotate_batch(xb)
        logits = head(backbone(xr).flatten(1))
        acc = float((logits.detach().argmax(1) == yr).float().mean())
        return F.cross_entropy(logits, yr), acc

    return _run(backbone, head, images, cfg, step_loss, "rotnet")


def pretrain_simclr(
    backbone: nn.Module,
    images: np.ndarray,
    cfg: PretrainConfig,
    *,
    augment: Augment = simclr_augment,
) -> PretrainResult:
    """SimCLR: two ``augment`` views per image, MLP projection head to ``cfg.proj_dim``,
    NT-Xent at ``cfg.temperature``. ``history`` "acc" is how often a view's nearest other view
    is its partner (the contrastive top-1 accuracy)."""
    shape = tuple(to_unit(images[:1]).shape[1:])
    dim = feature_dim_of(backbone, shape)  # type: ignore[arg-type]
    head = _mlp(dim, dim, cfg.proj_dim)

    def step_loss(xb: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, float]:
        b = xb.shape[0]
        z = head(backbone(torch.cat([augment(xb, gen), augment(xb, gen)])).flatten(1))
        z1, z2 = z[:b], z[b:]
        with torch.no_grad():
            zn = F.normalize(z.detach(), dim=1)
            sim = (zn @ zn.T).fill_diagonal_(-2.0)
            partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
            acc = float((sim.argmax(1) == partner).float().mean())
        return nt_xent(z1, z2, cfg.temperature), acc

    return _run(backbone, head, images, cfg, step_loss, "simclr")
