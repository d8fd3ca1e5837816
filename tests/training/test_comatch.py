from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from tests.training.test_fixmatch import (  # noqa: E402
    _tiny_model,
    interrupted_and_resumed,
    toy_semisup,
)
from training.comatch import (  # noqa: E402
    CoMatch,
    graph_contrastive_loss,
    graph_targets,
    smooth,
)
from training.fixmatch import FixMatchConfig, fixmatch  # noqa: E402


def test_graph_targets_link_confident_agreeing_rows_only() -> None:
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.8, 0.2]])
    w = graph_targets(probs, 0.8)
    # p3 . p0 = 0.9 >= 0.8 and p3 . p4 = 0.74 < 0.8; p4 . p0 = 0.8 (inclusive)
    raw = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.9, 0.8],
            [1.0, 1.0, 0.0, 0.9, 0.8],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.9, 0.9, 0.0, 1.0, 0.0],
            [0.8, 0.8, 0.0, 0.0, 1.0],
        ]
    )
    assert torch.allclose(w, raw / raw.sum(1, keepdim=True))
    # the diagonal survives any threshold: a row is never empty
    assert torch.allclose(graph_targets(torch.full((3, 2), 0.5), 1.0), torch.eye(3))


def test_graph_contrastive_loss_by_hand() -> None:
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zw = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # row 0 logits [2, 1.2]; row 1 logits [0, 1.6]
    lse0 = math.log(math.exp(2.0) + math.exp(1.2))
    lse1 = math.log(1.0 + math.exp(1.6))
    want = ((lse0 - 2.0) + 0.5 * (lse1 - 0.0) + 0.5 * (lse1 - 1.6)) / 2
    assert graph_contrastive_loss(zs, zw, targets, t).item() == pytest.approx(want, rel=1e-6)


def test_memory_smoothing_by_hand() -> None:
    probs = torch.tensor([[0.6, 0.4]])
    z = torch.tensor([[1.0, 0.0]])
    bank_z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank_p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a0 = math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 1.0)  # softmax of [2, 0]
    got = smooth(probs, z, bank_z, bank_p, alpha=0.75, temperature=0.5)
    want = [0.75 * 0.6 + 0.25 * a0, 0.75 * 0.4 + 0.25 * (1 - a0)]
    assert got[0].tolist() == pytest.approx(want)
    assert torch.equal(smooth(probs, z, bank_z[:0], bank_p[:0], 0.75, 0.5), probs)
    assert torch.equal(smooth(probs, z, bank_z, bank_p, 1.0, 0.5), probs)


def test_queue_keeps_the_newest_rows() -> None:
    cm = CoMatch(4, 2, dim=2, queue_size=3)
    assert len(cm.smooth(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]))) == 1
    row = lambda v: torch.tensor([[float(v), 0.0]])  # noqa: E731
    cm.push(torch.cat([row(1), row(2)]), torch.eye(2))
    assert int(cm.filled) == 2 and int(cm.ptr) == 2
    cm.push(torch.cat([row(3), row(4)]), torch.eye(2))
    assert int(cm.filled) == 3 and int(cm.ptr) == 1
    assert cm.bank_z[:, 0].tolist() == [4.0, 2.0, 3.0]
    cm.push(torch.cat([row(v) for v in range(5, 10)]), torch.zeros(5, 2))  # more than fits
    assert sorted(cm.bank_z[:, 0].tolist()) == [7.0, 8.0, 9.0]
    with pytest.raises(ValueError):
        CoMatch(4, 2, temperature=0.0)
    with pytest.raises(ValueError):
        CoMatch(4, 2, alpha=1.5)


def test_fixmatch_with_comatch_lowers_its_losses_and_resumes(tmp_path) -> None:
    xl, yl, xu, (xv, yv) = toy_semisup()
    cfg = FixMatchConfig(
        steps=60, batch_size=8, mu=2, lr=0.05, ema=0.9, eval_every=20, progress=False,
        tau=0.8, shift=1, magnitude=3.0, cutout=0.25, lambda_c=1.0, queue_size=40,
        contrast_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    res = fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv))
    first, last = res.history[0], res.history[-1]
    assert first["loss_c"] > 0
    assert last["loss_c"] < first["loss_c"]
    assert res.best_val_acc >= 0.8
    # the projection head and the queue are in the checkpoint: an interrupted run resumes
    # exactly
    resumed = interrupted_and_resumed(cfg, xl, yl, xu, (xv, yv), tmp_path / "ck.pt", at=40)
    keys = ("step", "loss", "loss_c", "mask", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [
        [r[k] for k in keys] for r in res.history
    ]
    with pytest.raises(ValueError):
        FixMatchConfig(lambda_c=-1.0)
