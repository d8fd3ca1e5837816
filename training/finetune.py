"""Transfer learning: a classifier head on any backbone, trained as a linear probe, fully
fine-tuned, or in two stages (head first, then everything at a lower backbone learning rate).

``fit`` takes uint8 ``[N, C, H, W]`` arrays and feeds the model ``x / 255``: the pixel convention
written down in ``training.inference`` (which also predicts, scores and embeds). ``augment``
callables act on those [0, 1] float batches, ``[B, C, H, W]``, with a caller-seeded
``torch.Generator``.

Methods: linear probing of frozen features (e.g. Kornblith, Shlens & Le 2019), full
fine-tuning with discriminative learning rates (Howard & Ruder 2018, ULMFiT), and the two-stage
"linear probe, then fine-tune" recipe (Kumar et al. 2022, LP-FT). Early stopping watches the
validation accuracy and restores the best weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.devices import autocast_call
from training.inference import accuracy, to_unit

MODES = ("full", "linear", "two-stage")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# -- model -------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``backbone`` ([N, C, H, W] -> [N, feature_dim]) + dropout + a linear head."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if feature_dim < 1 or num_classes < 2:
            raise ValueError(
                f"need feature_dim >= 1, num_classes >= 2: {feature_dim}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        # torch.bfloat16: the backbone runs under autocast, its features return as float32
        # (the head, softmax and losses stay float32); a training setting, not saved
        self.autocast_dtype: torch.dtype | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f: torch.Tensor = autocast_call(self.backbone, x, self.autocast_dtype)
        f = f.flatten(1) if f.ndim > 2 else f
        if f.shape[1] != self.feature_dim:
            raise ValueError(
                f"backbone gave {f.shape[1]} features, head expects {self.feature_dim}"
            )
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dropout(self.features(x)))
        return out

    @classmethod
    def for_backbone(
        cls,
        backbone: nn.Module,
        num_classes: int,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        dropout: float = 0.0,
    ) -> Classifier:
        """A classifier whose ``feature_dim`` is measured by one forward pass."""
        return cls(backbone, feature_dim_of(backbone, input_shape), num_classes, dropout)


def feature_dim_of(backbone: nn.Module, input_shape: tuple[int, int, int]) -> int:
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, *input_shape))
    backbone.train(was)
    return int(out.flatten(1).shape[1])


FMNIST_ARCHS = ("small_vgg", "strided")


def fmnist_classifier(
    num_classes: int = 10, dropout: float = 0.0, width: int = 32, arch: str = "small_vgg"
) -> Classifier:
    """A small CNN for 28x28 grayscale: ``SmallVGG`` (default, ``4 * width`` features) or the
    cheaper LeNet-sized ``StridedCNN`` (128 features)."""
    from training.backbones import small_vgg, strided

    if arch == "small_vgg":
        return Classifier(small_vgg.SmallVGG(1, width), 4 * width, num_classes, dropout)
    if arch == "strided":
        return Classifier(strided.StridedCNN(1, width), strided.FEATURES, num_classes, dropout)
    raise ValueError(f"arch must be one of {FMNIST_ARCHS}, got {arch!r}")


# -- augmentation ------------------------------------------------------------------------
def flip_translate(
    x: torch.Tensor, gen: torch.Generator, *, pad: int = 2, flip: bool = True, fill: float = 0.0
) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and random translation by up to ``pad`` pixels each
    way (pad with ``fill``, crop back at a random offset), per image, seeded by ``gen``."""
    b, _, h, w = x.shape
    if flip:
        flips = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), value=fill)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
        x = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2).contiguous()
    return x


def fmnist_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The default weak augmentation for Fashion-MNIST: flip + up to 2 px translation."""
    return flip_translate(x, gen, pad=2)


# -- configuration and result ------------------------------------------------------------
@dataclass
class FitConfig:
    """``mode``: "full" (everything trains), "linear" (frozen backbone in eval mode, head
    only), "two-stage" (``head_epochs`` of linear, then full). Backbone parameters train at
    ``lr * backbone_lr_mult``. An epoch is one pass over the data, or ``steps_per_epoch``
    reshuffled steps where given (useful for 100 images); ``max_steps_per_epoch`` caps it.
    ``patience``: stop after that many epochs without a better validation accuracy (None:
    never); the best epoch's weights are restored whenever ``val`` is given."""

    mode: str = "full"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0
    head_epochs: int = 0
    weight_decay: float = 5e-4
    patience: int | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    progress: bool = False
    num_threads: int | None = None
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9, nesterov)
    schedule: str = "cosine"  # "cosine" (per stage) | "constant"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.backbone_lr_mult >= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0, backbone_lr_mult and weight_decay >= 0")
        if self.mode == "two-stage" and not 1 <= self.head_epochs < self.epochs:
            raise ValueError(
                f"two-stage needs 1 <= head_epochs < epochs, got {self.head_epochs}, {self.epochs}"
            )
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("max_steps_per_epoch", "steps_per_epoch", "num_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.optimizer not in ("adamw", "sgd") or self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown optimizer/schedule {self.optimizer!r}/{self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1  # 0-based; the last epoch when there is no validation set
    best_val_acc: float | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


# -- inputs ------------------------------------------------------------------------------
def _check_targets(targets: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
    t = np.asarray(targets)
    if t.shape[:1] != (n,):
        raise ValueError(f"{n} images but targets of shape {t.shape}")
    if t.ndim == 1:
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"hard labels must be integers, got {t.dtype}")
        if t.size and not 0 <= t.min() <= t.max() < num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got {t.min()}..{t.max()}")
        return torch.from_numpy(t.astype(np.int64))
    if t.ndim == 2 and t.shape[1] == num_classes:
        if (t < 0).any() or not np.allclose(t.sum(1), 1.0, atol=1e-3):
            raise ValueError("soft labels must be non-negative rows summing to 1")
        return torch.from_numpy(t.astype(np.float32))
    raise ValueError(f"targets must be [N] labels or [N, {num_classes}] probabilities: {t.shape}")


def _check_weights(w: np.ndarray | None, n: int) -> torch.Tensor | None:
    if w is None:
        return None
    arr = np.asarray(w, dtype=np.float32)
    if arr.shape != (n,) or (arr < 0).any() or not arr.sum() > 0:
        raise ValueError(f"sample_weight must be [{n}] non-negative with a positive sum")
    return torch.from_numpy(arr)


# -- optimiser -----------------------------------------------------------------------------
def head_params(model: Classifier) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("backbone.")]


def make_optimizer(
    model: Classifier, cfg: FitConfig, train_backbone: bool
) -> torch.optim.Optimizer:
    """Groups named "head" (lr) and, when the backbone trains, "backbone" (lr * mult)."""
    groups: list[dict[str, Any]] = [{"params": head_params(model), "lr": cfg.lr, "name": "head"}]
    if train_backbone:
        groups.append(
            {
                "params": list(model.backbone.parameters()),
                "lr": cfg.lr * cfg.backbone_lr_mult,
                "name": "backbone",
            }
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_backbone_trainable(model: Classifier, trainable: bool) -> None:
    """Frozen: no gradients and eval mode (batch-norm statistics stay as they are)."""
    model.backbone.requires_grad_(trainable)
    model.backbone.train(trainable)


# -- training ------------------------------------------------------------------------------
def _batches(n: int, cfg: FitConfig, gen: torch.Generator) -> Iterator[torch.Tensor]:
    bs = min(cfg.batch_size, n)
    per_pass = max(1, n // bs)  # drop the ragged last batch (batch norm on 1 image fails)
    steps = cfg.steps_per_epoch or per_pass
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(min(per_pass, steps - done)):
            yield perm[i * bs : (i + 1) * bs]
        done += min(per_pass, steps - done)


def _stages(cfg: FitConfig) -> list[tuple[str, int, bool]]:
    if cfg.mode == "linear":
        return [("linear", cfg.epochs, False)]
    if cfg.mode == "full":
        return [("full", cfg.epochs, True)]
    return [("head", cfg.head_epochs, False), ("full", cfg.epochs - cfg.head_epochs, True)]


def fit(
    model: Classifier,
    x: np.ndarray,
    targets: np.ndarray,
    cfg: FitConfig,
    *,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    augment: Augment | None = None,
    sample_weight: np.ndarray | None = None,
) -> FitResult:
    """Trains ``model`` in place on uint8 images and hard ([N] int) or soft ([N, C]) targets;
    returns the per-epoch history. With ``val`` (images, int labels) the best epoch by
    validation accuracy is restored at the end (and ``patience`` may stop early)."""
    xs = to_unit(x)
    ys = _check_targets(targets, xs.shape[0], model.num_classes)
    ws = _check_weights(sample_weight, xs.shape[0])
    if xs.shape[0] < 2:
        raise ValueError("fit needs at least 2 images")
    if val is not None:
        if len(val) != 2 or np.asarray(val[1]).shape != (np.asarray(val[0]).shape[0],):
            raise ValueError("val must be (uint8 images [M, C, H, W], int labels [M])")
        to_unit(val[0][:1])
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t0, c0 = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout masks (this reseeds torch's global generator)
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    epoch = 0
    bar = _progress(cfg)
    try:
        for stage, n_epochs, train_backbone in _stages(cfg):
            set_backbone_trainable(model, train_backbone)
            model.head.train()
            model.dropout.train()
            opt = make_optimizer(model, cfg, train_backbone)
            steps = n_epochs * _steps_per_epoch(xs.shape[0], cfg)
            sched = (
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
                if cfg.schedule == "cosine"
                else None
            )
            since_best = 0
            for _ in range(n_epochs):
                row = _train_epoch(model, xs, ys, ws, cfg, opt, sched, augment, gen, train_backbone)
                row.update(epoch=epoch, stage=stage)
                if val is not None:
                    row["val_acc"] = accuracy(model, val[0], val[1])
                    set_backbone_trainable(model, train_backbone)
                    model.head.train()
                    model.dropout.train()
                    if result.best_val_acc is None or row["val_acc"] > result.best_val_acc:
                        result.best_val_acc, result.best_epoch = row["val_acc"], epoch
                        best_state = copy.deepcopy(model.state_dict())
                        since_best = 0
                    else:
                        since_best += 1
                row["cpu_seconds"] = time.process_time() - c0
                row["seconds"] = time.perf_counter() - t0
                result.history.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: round(v, 4) for k, v in row.items() if k in _SHOWN})
                epoch += 1
                stop = cfg.patience is not None and since_best >= cfg.patience
                if stop and (stage != "head"):
                    break
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads)
        model.backbone.requires_grad_(True)  # unfrozen again, even after an error
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = epoch - 1
    model.eval()
    result.cpu_seconds = time.process_time() - c0
    result.wall_seconds = time.perf_counter() - t0
    return result


_SHOWN = ("loss", "train_acc", "val_acc")


def _progress(cfg: FitConfig) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.epochs, desc=f"fit {cfg.mode}", unit="epoch")


def _steps_per_epoch(n: int, cfg: FitConfig) -> int:
    steps = cfg.steps_per_epoch or max(1, n // min(cfg.batch_size, n))
    return min(steps, cfg.max_steps_per_epoch or steps)


def _train_epoch(
    model: Classifier,
    xs: torch.Tensor,
    ys: torch.Tensor,
    ws: torch.Tensor | None,
    cfg: FitConfig,
    opt: torch.optim.Optimizer,
    sched: Any,
    augment: Augment | None,
    gen: torch.Generator,
    train_backbone: bool,
) -> dict[str, Any]:
    total = correct = seen = 0.0
    for idx in _batches(xs.shape[0], cfg, gen):
        xb, yb = xs[idx], ys[idx]
        if augment is not None:
            xb = augment(xb, gen)
        if train_backbone:
            feats = model.features(xb)
        else:
            with torch.no_grad():
                feats = model.features(xb)
        logits = model.head(model.dropout(feats))
        loss_each = F.cross_entropy(
            logits, yb, reduction="none", label_smoothing=cfg.label_smoothing
        )
        if ws is not None:
            wb = ws[idx]
            loss = (loss_each * wb).sum() / wb.sum().clamp_min(1e-12)
        else:
            loss = loss_each.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        hard = yb if yb.ndim == 1 else yb.argmax(1)
        total += float(loss.detach()) * len(idx)
        correct += float((logits.detach().argmax(1) == hard).sum())
        seen += len(idx)
    return {
        "loss": total / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "lr": {g["name"]: g["lr"] for g in opt.param_groups},
        "steps": int(seen // max(1, min(cfg.batch_size, xs.shape[0]))),
    }
