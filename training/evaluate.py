"""N-way K-shot episode evaluation: mean accuracy with its 95% confidence interval.

``evaluate_method`` runs a method's own ``forward`` on every episode (any method, MAML
included). ``evaluate_embeddings`` is for embedding models (ProtoNet, or an exported model
folder): every image is embedded once and each episode is scored as the server scores it --
class prototype = mean support embedding, ``server.kernels.topk`` with the model's metric.

The 95% interval is ``1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof=1)
of the per-episode accuracies over ``n`` episodes (the convention of the few-shot literature).
The original 20-way one-shot run format is in ``runs.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.imageset import ImageSet
from training.data.sampler import Episode, EpisodeSampler

DEFAULT_EPISODES = 1000
EVAL_SEED = 12345  # episodes differ from any training seed's


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # mean over episodes, in [0, 1]
    ci95: float  # half-width of the 95% interval
    episodes: int
    n_way: int
    k_shot: int

    def __str__(self) -> str:
        return (
            f"{self.n_way}-way {self.k_shot}-shot: {100 * self.accuracy:.2f}% "
            f"+- {100 * self.ci95:.2f}% ({self.episodes} episodes)"
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "acc": self.accuracy,
            "ci95": self.ci95,
            "episodes": self.episodes,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
        }


def mean_ci95(accuracies: Any) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation, sample std) of per-episode accuracies."""
    acc = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("no accuracies to summarise")
    if acc.size == 1:
        return float(acc[0]), 0.0
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / math.sqrt(acc.size))


def _episodes(
    ds: ImageSet, n_way: int, k_shot: int, q_query: int, episodes: int, seed: int, **sampler: Any
) -> tuple[EpisodeSampler, range]:
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    return EpisodeSampler(ds, n_way, k_shot, q_query, seed=seed, **sampler), range(episodes)


def evaluate_method(
    method: Any,
    ds: ImageSet,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    episodes: int = DEFAULT_EPISODES,
    seed: int = EVAL_SEED,
    progress: bool = False,
    **sampler: Any,
) -> EvalResult:
    """Accuracy of ``method(support, support_labels, query)`` on seeded episodes of ``ds``."""
    import torch
    from tqdm import tqdm

    smp, steps = _episodes(ds, n_way, k_shot, q_query, episodes, seed, **sampler)
    was_training = method.training
    dev = next(method.parameters()).device
    method.eval()
    accs = []
    with torch.no_grad():
        for i in tqdm(steps, desc=f"eval {n_way}-way {k_shot}-shot", disable=not progress):
            ep = smp.episode(i)
            sx = ds.normalise(ds.batch(ep.support, ep.support_turns)).to(dev)
            qx = ds.normalise(ds.batch(ep.query, ep.query_turns)).to(dev)
            logits = method(sx, torch.from_numpy(ep.support_labels).to(dev), qx)
            accs.append(float((logits.argmax(1).cpu().numpy() == ep.query_labels).mean()))
    method.train(was_training)
    return EvalResult(*mean_ci95(accs), episodes, n_way, k_shot)


def embed_all(ds: ImageSet, encode: Callable[[Any], np.ndarray], batch: int = 256) -> np.ndarray:
    """Embeddings [R, N, D] of every image under each of ``ds.rotations`` (R of them);
    ``encode`` takes a normalised float32 torch batch [B, C, H, W]."""
    out = []
    for r in ds.rotations:
        rows = [
            encode(
                ds.normalise(
                    ds.batch(
                        np.arange(s, min(s + batch, len(ds))), np.full(min(batch, len(ds) - s), r)
                    )
                )
            )
            for s in range(0, len(ds), batch)
        ]
        out.append(np.concatenate(rows))
    return np.stack(out).astype(np.float32)


def score_episode(
    emb: np.ndarray, ds: ImageSet, ep: Episode, metric: str, transductive: float | None = None
) -> float:
    """Accuracy of nearest-prototype classification of one episode, as the server scores;
    ``transductive`` (the logit scale) refines the prototypes with the episode's queries first,
    as the server's ``transductive`` option does with a request's images."""
    from server import kernels

    turn = {r: j for j, r in enumerate(ds.rotations)}
    s = emb[[turn[int(t)] for t in ep.support_turns], ep.support]
    q = emb[[turn[int(t)] for t in ep.query_turns], ep.query]
    n_way = len(ep.classes)
    if transductive is not None:
        from server.transduction import refine_supports

        protos = refine_supports(s, ep.support_labels, n_way, q, metric, transductive)  # type: ignore[arg-type]
    else:
        protos = np.stack([s[ep.support_labels == c].mean(0) for c in range(n_way)])
    _, idx = kernels.topk(q, protos, 1, metric=metric)  # type: ignore[arg-type]
    return float((idx[:, 0] == ep.query_labels).mean())


def evaluate_embeddings(
    emb: np.ndarray,
    ds: ImageSet,
    metric: str,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    episodes: int = DEFAULT_EPISODES,
    seed: int = EVAL_SEED,
    transductive: float | None = None,
    **sampler: Any,
) -> EvalResult:
    """Nearest-prototype accuracy from precomputed ``embed_all`` embeddings (``transductive``:
    see ``score_episode``)."""
    if emb.ndim != 3 or emb.shape[:2] != (len(ds.rotations), len(ds)):
        raise ValueError(f"embeddings must be [{len(ds.rotations)}, {len(ds)}, D], got {emb.shape}")
    smp, steps = _episodes(ds, n_way, k_shot, q_query, episodes, seed, **sampler)
    accs = [score_episode(emb, ds, smp.episode(i), metric, transductive) for i in steps]
    return EvalResult(*mean_ci95(accs), episodes, n_way, k_shot)


def torch_encoder(method: Any) -> Callable[[Any], np.ndarray]:
    """``encode`` for ``embed_all`` from a method's backbone (eval mode, no grad)."""
    import torch

    def encode(x: Any) -> np.ndarray:
        method.eval()
        dev = next(method.parameters()).device
        with torch.no_grad():
            return np.asarray(method.embed(torch.as_tensor(x).to(dev)).cpu().numpy())

    return encode
