"""Scoring variants over the 27 per-view embeddings of a metatrain checkpoint, on the held-out
within-alphabet proxy (docs/omniglot-model.md, "Transductive refinement"): view averaging as
served, nearest views, a symmetric Chamfer distance over views, and soft k-means refinement of
the prototypes with the episode's queries at several temperatures. A research script: the
server's own option is measured with ``protoserve train evaluate --transductive``.

    python -m training.experiments.omniglot_scoring_variants CKPT SPLIT_SEED [EPISODES [QUERIES]]

(20-way 1-shot, split drawers, episode seed 12345; one torch thread.)
"""

import sys
import time

import numpy as np
import torch

from server.transduction import refine
from training.backbones.shift_average import ShiftAverage
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, build_data, build_method
from training.data.sampler import EpisodeSampler

CENTER = 13
NINE = slice(9, 18)


def sqd(a, b):
    return (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2 * a @ b.T


def acc_from(d, ql):
    return float((d.argmin(1) == ql).mean())


def softkm(p, q, iters, temp=1.0):
    """Soft k-means at temperature ``temp`` on squared distances: the server's refinement
    (``server.transduction.refine``) at logit scale 1 / temp, one support per class."""
    return refine(p, np.ones(len(p)), q, "l2", 1.0 / temp, iters)


def main() -> None:
    torch.set_num_threads(1)
    ckpt, split_seed = sys.argv[1], int(sys.argv[2])
    episodes = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    queries = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    state = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(state["config"])
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "split_seed": split_seed})
    pre = state["preprocess"]
    _, ds = build_data(cfg, pre)
    method = build_method(cfg, ds.num_channels, ds.size)
    method.load_state_dict(state["model"])
    method.eval()
    sa = ShiftAverage(method.backbone, 3, (-10.0, 0.0, 10.0), tuple(ds.size)).eval()
    print(len(ds), "images", len(ds.classes), "classes", ds.rotations, flush=True)
    t0 = time.time()
    rows = []
    with torch.no_grad():
        for s in range(0, len(ds), 128):
            idx = np.arange(s, min(s + 128, len(ds)))
            x = ds.normalise(ds.batch(idx, np.zeros(len(idx), dtype=int)))
            v = method.backbone(sa.views(torch.as_tensor(x)))
            rows.append(v.reshape(27, len(idx), -1).permute(1, 0, 2).numpy())
    E = np.concatenate(rows).astype(np.float64)  # [N, 27, D]
    print("embedded", E.shape, f"{time.time() - t0:.0f}s", flush=True)

    smp = EpisodeSampler(ds, 20, 1, queries, seed=12345, within_superclass=True, split_drawers=True)
    res: dict[str, list[float]] = {}
    for i in range(episodes):
        ep = smp.episode(i)
        assert (ep.support_turns == 0).all() and (ep.query_turns == 0).all()
        S, Q, ql = E[ep.support], E[ep.query], ep.query_labels  # support class-major, 1 shot
        sm, qm = S.mean(1), Q.mean(1)
        out = {}
        out["plain"] = acc_from(sqd(Q[:, CENTER], S[:, CENTER]), ql)
        out["mean27"] = acc_from(sqd(qm, sm), ql)
        out["mean9"] = acc_from(sqd(Q[:, NINE].mean(1), S[:, NINE].mean(1)), ql)
        n, v, dd = S.shape
        # query centre vs every support view: min over support views
        dc = sqd(Q[:, CENTER], S.reshape(n * v, dd)).reshape(len(Q), n, v)
        out["min_sview"] = acc_from(dc.min(2), ql)
        # query mean vs support views
        dm = sqd(qm, S.reshape(n * v, dd)).reshape(len(Q), n, v)
        out["qmean_min_sview"] = acc_from(dm.min(2), ql)
        # all pairs
        dall = sqd(Q.reshape(-1, dd), S.reshape(-1, dd)).reshape(len(Q), v, n, v)
        out["min_pairs"] = acc_from(dall.min((1, 3)), ql)
        out["mean_pairs"] = acc_from(dall.mean((1, 3)), ql)
        # symmetric: mean over query views of min over support views, plus the converse
        a = dall.min(3).mean(1)
        b = dall.min(1).mean(2)
        out["chamfer"] = acc_from(a + b, ql)
        out["chamfer_q"] = acc_from(a, ql)
        out["chamfer_s"] = acc_from(b, ql)
        d9 = dall[:, NINE][:, :, :, NINE]
        out["chamfer9"] = acc_from(d9.min(3).mean(1) + d9.min(1).mean(2), ql)
        for t in (0.25, 0.5):
            sc = dall.min(3)  # [q, v, n]
            out[f"softmin_mix{t}"] = acc_from((1 - t) * sqd(qm, sm) + t * sc.mean(1), ql)
        for it in (1, 2):
            for temp in (0.3, 1.0, 3.0):
                out[f"softkm{it}_T{temp:g}"] = acc_from(sqd(qm, softkm(sm, qm, it, temp)), ql)
        for k, val in out.items():
            res.setdefault(k, []).append(val)
        if (i + 1) % 100 == 0:
            print(i + 1, {k: round(100 * np.mean(x), 2) for k, x in res.items()}, flush=True)
    for k, x in res.items():
        x = np.asarray(x)
        print(f"{k:20s} {100 * x.mean():.2f} +- {196 * x.std(ddof=1) / np.sqrt(len(x)):.2f}")


if __name__ == "__main__":
    main()
