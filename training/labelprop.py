"""Label propagation on a k-nearest-neighbour graph (Zhou et al., "Learning with local and
global consistency", NIPS 2004), in the form Iscen et al. use to pseudo-label for deep
semi-supervised learning ("Label Propagation for Deep Semi-supervised Learning", CVPR 2019).

Features are L2-normalised; each point keeps its ``k`` most cosine-similar neighbours with
weight ``max(s, 0) ** gamma``; ``W + W^T`` is normalised to ``D^-1/2 W D^-1/2`` and
``Z = (I - alpha S)^-1 Y`` is approximated by ``iters`` steps of ``Z <- alpha S Z + Y``, with
``Y`` the one-hot rows of the labeled points. Columns are normalised by their class mass (so a
class with many labeled points does not flood the graph), then rows into probabilities.
The neighbour search is exact (blocked matrix products), fine for ~10^5 points of ~100 dims.
"""

from __future__ import annotations

import numpy as np
import torch


def knn_graph(features: np.ndarray, k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [N, k], indices [N, k]) of each row's ``k`` nearest other rows (cosine)."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must be in [1, N - 1] = [1, {f.shape[0] - 1}], got {k}")
    t = torch.nn.functional.normalize(torch.from_numpy(f), dim=1)
    sims, idx = [], []
    for i in range(0, len(t), block):
        s = t[i : i + block] @ t.T
        s[torch.arange(s.shape[0]), torch.arange(i, i + s.shape[0])] = -float("inf")  # not self
        v, j = s.topk(k, dim=1)
        sims.append(v)
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


def label_propagation(
    features: np.ndarray,
    labeled: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    k: int = 30,
    alpha: float = 0.99,
    gamma: float = 3.0,
    iters: int = 20,
) -> np.ndarray:
    """Probabilities [N, num_classes] for every row of ``features``; ``labeled`` indexes the
    rows whose ``labels`` are known."""
    labeled = np.asarray(labeled, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if labeled.shape != labels.shape or labeled.ndim != 1 or labeled.size == 0:
        raise ValueError(f"labeled {labeled.shape} and labels {labels.shape}: same 1-D, non-empty")
    if not 0.0 < alpha < 1.0 or iters < 1 or gamma <= 0:
        raise ValueError(f"need 0 < alpha < 1, iters >= 1, gamma > 0: {alpha}, {iters}, {gamma}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    n = len(features)
    if labeled.min() < 0 or labeled.max() >= n:
        raise ValueError(f"labeled indices must be in [0, {n})")
    sims, idx = knn_graph(features, k)
    rows = torch.arange(n).repeat_interleave(k)
    w = torch.sparse_coo_tensor(
        torch.stack([rows, idx.flatten()]),
        sims.clamp_min(0).pow(gamma).flatten(),
        (n, n),
        check_invariants=False,
    )
    w = (w + w.t()).coalesce()
    d = torch.sparse.sum(w, 1).to_dense().clamp_min(1e-12).rsqrt()
    ij = w.indices()
    s = torch.sparse_coo_tensor(
        ij, w.values() * d[ij[0]] * d[ij[1]], (n, n), check_invariants=False
    ).coalesce()
    y = torch.zeros(n, num_classes)
    y[torch.from_numpy(labeled), torch.from_numpy(labels)] = 1.0
    z = y.clone()
    for _ in range(iters):
        z = alpha * torch.sparse.mm(s, z) + y
    z = z.clamp_min(0)
    z = z / z.sum(0, keepdim=True).clamp_min(1e-12)
    z = z / z.sum(1, keepdim=True).clamp_min(1e-12)
    empty = z.sum(1) == 0  # unreachable rows: uniform
    z[empty] = 1.0 / num_classes
    return z.numpy().astype(np.float32)
