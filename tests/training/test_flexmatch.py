from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests.training.test_fixmatch import _tiny_model, linear_case, toy_semisup  # noqa: E402
from training.fixmatch import FixMatchConfig, fixmatch, fixmatch_loss  # noqa: E402
from training.flexmatch import ClassThresholds, convex_map  # noqa: E402
from training.inference import accuracy  # noqa: E402


def test_convex_map_exact() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    assert convex_map(x).tolist() == pytest.approx([0.0, 1 / 3, 1.0])


def test_thresholds_by_hand() -> None:
    ct = ClassThresholds(n_unlabeled=10, n_classes=3)
    # nothing selected yet: every class counts as unlearnt, threshold 0
    assert ct.thresholds(0.9).tolist() == [0.0, 0.0, 0.0]
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    label = torch.tensor([0, 0, 0, 1, 2, 2])
    conf = torch.tensor([0.99, 0.97, 0.96, 0.99, 0.5, 0.99])
    ct.update(idx, label, conf, tau=0.95)  # image 4 is not confident: stays unused
    assert ct.selected.tolist() == [0, 0, 0, 1, -1, 2, -1, -1, -1, -1]
    # sigma = [3, 1, 1], unused = 5 > max sigma: warm-up denominator 5
    assert ct.learning_effect().tolist() == pytest.approx([0.6, 0.2, 0.2])
    want = [0.6 / 1.4 * 0.9, 0.2 / 1.8 * 0.9, 0.2 / 1.8 * 0.9]
    assert ct.thresholds(0.9).tolist() == pytest.approx(want)
    # without warm-up the best-learnt class is the reference
    cold = ClassThresholds(10, 3, warmup=False)
    cold.update(idx, label, conf, tau=0.95)
    assert cold.learning_effect().tolist() == pytest.approx([1.0, 1 / 3, 1 / 3])
    # a later confident prediction replaces an image's class
    ct.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.99]), tau=0.95)
    assert ct.selected[0].item() == 1
    state = ct.state_dict()
    other = ClassThresholds(10, 3)
    other.load_state_dict(state)
    assert torch.equal(other.selected, ct.selected)
    with pytest.raises(ValueError):
        ClassThresholds(11, 3).load_state_dict(state)
    with pytest.raises(ValueError):
        ClassThresholds(0, 3)


def test_loss_uses_the_class_thresholds() -> None:
    model, xl, yl, xu = linear_case(6)
    cfg = FixMatchConfig(tau=1.0)
    _, fixed = fixmatch_loss(model, xl, yl, xu, xu, cfg)
    assert fixed["mask"] == 0.0  # nothing reaches probability 1
    _, low = fixmatch_loss(model, xl, yl, xu, xu, cfg, thresholds=torch.zeros(3))
    assert low["mask"] == 1.0
    # only the rows whose predicted class has a threshold below their confidence are kept
    thr = torch.tensor([0.0, 1.0, 1.0])
    _, some = fixmatch_loss(model, xl, yl, xu, xu, cfg, thresholds=thr)
    assert some["kept"].tolist() == (some["label"] == 0).tolist()


def test_flex_run_learns_and_resumes(tmp_path) -> None:
    xl, yl, xu, (xv, yv) = toy_semisup()
    cfg = FixMatchConfig(
        steps=40, batch_size=8, mu=2, lr=0.05, ema=0.9, eval_every=20, progress=False,
        tau=0.8, flex=True, shift=1, magnitude=3.0, cutout=0.25,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _tiny_model()
    before = accuracy(model, xv, yv)
    res = fixmatch(model, xl, yl, xu, cfg, val=(xv, yv))
    assert res.best_val_acc >= 0.8 > before or res.best_val_acc >= 0.9
    assert all(len(r["class_thresholds"]) == 2 for r in res.history)
    assert all(0.0 <= t <= 0.8 for r in res.history for t in r["class_thresholds"])

    class Stop(Exception):
        pass

    def stop(row: dict, ema: nn.Module) -> None:
        if row["step"] == 40:
            raise Stop

    ck = tmp_path / "ck.pt"
    torch.manual_seed(0)
    with pytest.raises(Stop):
        fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv), checkpoint=ck, on_eval=stop)
    resumed = fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv), checkpoint=ck)
    keys = ("step", "loss", "mask", "val_acc", "class_thresholds")
    assert [[r[k] for k in keys] for r in resumed.history] == [
        [r[k] for k in keys] for r in res.history
    ]
