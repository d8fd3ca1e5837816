"""Inference for ``training.finetune.Classifier`` models: class probabilities (optionally MC
dropout), accuracy and backbone embeddings, in batches, on whatever device the model lives.

Pixel convention (the one place it is written down): ``fit``, ``predict_proba``, ``accuracy``
and ``embed`` take uint8 ``[N, C, H, W]`` arrays (``ImageSet.images``) and feed the model
``x / 255`` as float32 in [0, 1], with no further normalisation: exactly what the server gives
a model whose preprocess config has ``mean [0], std [1]`` (Fashion-MNIST's, see
``training.data.fashion_mnist``). A backbone that wants other statistics normalises inside
itself (its first batch-norm layer does this for ours).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.devices import model_device

if TYPE_CHECKING:
    from training.finetune import Classifier


def to_unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1] (the pixel convention above)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {t.dtype} {tuple(t.shape)}")
    return t.float().div_(255.0)


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _chunks(x: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    to_unit(x[:1]) if len(x) else None
    for i in range(0, len(x), batch_size):
        yield to_unit(x[i : i + batch_size])


@torch.no_grad()
def predict_proba(
    model: Classifier, x: np.ndarray, *, batch_size: int = 1024, mc_samples: int = 0, seed: int = 0
) -> np.ndarray:
    """Softmax probabilities [N, C] in eval mode; with ``mc_samples = S > 0``, [S, N, C] with
    dropout active and batch norm in eval mode (MC dropout, Gal & Ghahramani 2016)."""
    if mc_samples < 0:
        raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
    if mc_samples and not _has_dropout(model):
        raise ValueError("mc_samples needs a model with dropout (Classifier(dropout > 0))")
    was = model.training
    model.eval()
    try:
        if not mc_samples:
            dev = model_device(model)
            out = [F.softmax(model(xb.to(dev)), 1) for xb in _chunks(x, batch_size)]
            return _cat(out, 0, model.num_classes)
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()
        backbone_dropout = _has_dropout(model.backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples: list[list[torch.Tensor]] = [[] for _ in range(mc_samples)]
            dev = model_device(model)
            for xb in _chunks(x, batch_size):
                xb = xb.to(dev)
                feats = None if backbone_dropout else model.features(xb)
                for s in range(mc_samples):
                    logits = model(xb) if feats is None else model.head(model.dropout(feats))
                    samples[s].append(F.softmax(logits, 1))
        return np.stack([_cat(s, 0, model.num_classes) for s in samples])
    finally:
        model.train(was)


def _cat(parts: list[torch.Tensor], dim: int, c: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, c), dtype=np.float32)
    return torch.cat(parts, dim).cpu().numpy().astype(np.float32)


def accuracy(model: Classifier, x: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y)
    if y.shape != (len(x),):
        raise ValueError(f"{len(x)} images but labels of shape {y.shape}")
    if not len(x):
        return float("nan")
    return float((predict_proba(model, x).argmax(1) == y).mean())


@torch.no_grad()
def embed(model: Classifier, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Backbone features [N, feature_dim] in eval mode."""
    was = model.training
    model.eval()
    try:
        dev = model_device(model)
        feats = [model.features(xb.to(dev)) for xb in _chunks(x, batch_size)]
        return _cat(feats, 0, model.feature_dim)
    finally:
        model.train(was)
