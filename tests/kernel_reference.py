"""float64 numpy reference for the prototype kernels, shared by the tests."""

from __future__ import annotations

import numpy as np


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0)
    return x


def ref_scores(q: np.ndarray, p: np.ndarray, metric: str) -> np.ndarray:
    qq, pp = prepare(q, metric), prepare(p, metric)
    dots = qq @ pp.T
    if metric == "l2":
        return 2 * dots - (pp * pp).sum(1)[None, :] - (qq * qq).sum(1)[:, None]
    return dots


def ref_topk(q: np.ndarray, p: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    s = ref_scores(q, p, metric)
    k = min(k, p.shape[0])
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def tolerance(q: np.ndarray, p: np.ndarray, metric: str, rel: float = 2e-6) -> float:
    """Absolute error allowed for float32 accumulation over the dimension."""
    d = max(q.shape[1] if q.ndim == 2 else 1, 1)
    if q.size == 0 or p.size == 0:
        return 0.0
    if metric == "cosine":
        scale = 1.0
    else:
        scale = float(np.abs(q).max() * np.abs(p).max()) * d
        if metric == "l2":
            scale = max(
                scale,
                float((q.astype(np.float64) ** 2).sum(1).max()),
                float((p.astype(np.float64) ** 2).sum(1).max()),
            )
    return rel * scale * np.sqrt(d) + 1e-6


def check_topk(
    q: np.ndarray,
    p: np.ndarray,
    k: int,
    metric: str,
    scores: np.ndarray,
    index: np.ndarray,
    rel: float = 2e-6,
    score_rel: float | None = None,
) -> None:
    """Scores match the reference top-k; every index scores what it claims.

    ``score_rel`` loosens only the comparison with the reference ranking
    (a bf16 scan may swap near-equal candidates); the returned scores must
    still be the exact float32 scores of the returned indices.
    """
    ref = ref_scores(q, p, metric)
    rs, _ = ref_topk(q, p, k, metric)
    keff = min(k, p.shape[0])
    assert scores.shape == (q.shape[0], keff), scores.shape
    assert index.shape == (q.shape[0], keff)
    assert scores.dtype == np.float32 and index.dtype == np.int64
    tol = tolerance(q, p, metric, rel)
    rank_tol = tolerance(q, p, metric, score_rel) if score_rel else tol
    for i in range(q.shape[0]):
        assert len(set(index[i].tolist())) == keff, "duplicate indices"
        assert np.all(np.diff(scores[i]) <= tol), "not best first"
        np.testing.assert_allclose(ref[i, index[i]], scores[i], atol=tol, rtol=0)
        np.testing.assert_allclose(rs[i], scores[i], atol=rank_tol, rtol=0)
