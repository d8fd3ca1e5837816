from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from training.checkpoint import load_checkpoint  # noqa: E402
from training.finetune import Classifier  # noqa: E402
from training.fixmatch import (  # noqa: E402
    FixMatchConfig,
    FixMatchResult,
    align,
    best_weights,
    ema_update,
    fixmatch,
    fixmatch_loss,
    lr_at,
    pseudo_labels,
)
from training.inference import accuracy  # noqa: E402


def test_pseudo_labels_mask_and_threshold_exact() -> None:
    logits = torch.tensor(
        [
            [4.0, 0.0, 0.0],  # p0 = e^4 / (e^4 + 2) = 0.9647...: kept at 0.95
            [0.0, 2.0, 0.0],  # p1 = 0.787: dropped
            [1.0, 1.0, -5.0],  # tie: lowest class, p = 0.4988: dropped
            [0.0, 0.0, 10.0],  # kept
        ]
    )
    probs = torch.softmax(logits, 1)
    label, conf, mask = pseudo_labels(probs, 0.95)
    assert label.tolist() == [0, 1, 0, 2]
    assert conf[0].item() == pytest.approx(np.exp(4) / (np.exp(4) + 2))
    assert mask.tolist() == [1.0, 0.0, 0.0, 1.0]
    # the threshold is inclusive
    exact = torch.tensor([[0.95, 0.05], [0.9499, 0.0501]])
    assert pseudo_labels(exact, 0.95)[2].tolist() == [1.0, 0.0]
    assert pseudo_labels(exact, 0.0)[2].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        pseudo_labels(probs, 1.5)


def linear_case(n_unlabeled: int) -> tuple[Classifier, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 3-class linear model on 2x2 images, 2 labeled and ``n_unlabeled`` unlabeled ones."""
    torch.manual_seed(0)
    model = Classifier(nn.Flatten(), 4, 3)
    xl, yl = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    return model, xl, yl, torch.randn(n_unlabeled, 1, 2, 2)


def test_masked_rows_do_not_contribute_to_the_unlabeled_loss() -> None:
    model, xl, yl, xu = linear_case(5)
    cfg = FixMatchConfig(tau=1.0, lambda_u=1.0)  # nothing reaches probability 1
    loss, st = fixmatch_loss(model, xl, yl, xu, xu, cfg)
    assert st["mask"] == 0.0 and st["loss_u"] == 0.0
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(model(xl), yl).item())
    _, st0 = fixmatch_loss(model, xl, yl, xu, xu, FixMatchConfig(tau=0.0))
    assert st0["mask"] == 1.0 and st0["loss_u"] > 0


def test_distribution_alignment_exact() -> None:
    p = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    mean = torch.tensor([0.8, 0.2])
    prior = torch.tensor([0.5, 0.5])
    q = align(p, mean, prior)
    # row 0: [0.5/0.8, 0.5/0.2] = [0.625, 2.5] -> [0.2, 0.8]; row 1: [1, 1] -> [0.5, 0.5]
    assert torch.allclose(q, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))


def test_ema_update_exact_on_a_tiny_model() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        model[0].bias.fill_(3.0)
        ema[0].weight.copy_(torch.tensor([[0.0, 4.0]]))
        ema[0].bias.fill_(-1.0)
        model[1].running_mean.fill_(7.0)
    ema_update(ema, model, 0.75)
    assert ema[0].weight.tolist() == [[0.25, 3.5]]  # 0.75 * [0, 4] + 0.25 * [1, 2]
    assert ema[0].bias.tolist() == [0.0]  # 0.75 * -1 + 0.25 * 3
    assert ema[1].running_mean.tolist() == [7.0]  # buffers copied
    ema_update(ema, model, 0.0)
    assert ema[0].weight.tolist() == [[1.0, 2.0]]


def test_cosine_schedule() -> None:
    cfg = FixMatchConfig(steps=16, lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(16, cfg) == pytest.approx(0.1 * np.cos(7 * np.pi / 16))
    assert lr_at(5, FixMatchConfig(steps=16, lr=0.1, cosine=False)) == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"mu": 0},
        {"tau": 1.2},
        {"lambda_u": -1.0},
        {"lr": 0.0},
        {"ema": 1.0},
        {"magnitude": 11.0},
        {"cutout": 2.0},
        {"momentum": 1.0},
        {"precision": "fp16"},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FixMatchConfig(**kwargs)


def _toy(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 8x8 images: a bright top half or a bright bottom half."""
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 1, 8, 8))
    for i, c in enumerate(y):
        rows = slice(0, 4) if c == 0 else slice(4, 8)
        x[i, 0, rows] += 180
    return x.astype(np.uint8), y


def toy_semisup() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """8 labeled, 200 unlabeled and 100 validation toy images (seed 0)."""
    rng = np.random.default_rng(0)
    xl, yl = _toy(8, rng)
    xu, _ = _toy(200, rng)
    return xl, yl, xu, _toy(100, rng)


def _tiny_model() -> Classifier:
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8)
    )
    return Classifier(backbone, 8, 2)


def interrupted_and_resumed(
    cfg: FixMatchConfig,
    xl: np.ndarray,
    yl: np.ndarray,
    xu: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    ck: Path,
    at: int,
) -> FixMatchResult:
    """A ``fixmatch`` run (seed 0, ``_tiny_model``) stopped at the evaluation of step ``at``,
    after the checkpoint of the evaluation before it, then resumed from that checkpoint."""

    class Stop(Exception):
        pass

    def stop(row: dict, ema: nn.Module) -> None:
        if row["step"] == at:  # after the previous evaluation's checkpoint, before this one's
            raise Stop

    torch.manual_seed(0)
    with pytest.raises(Stop):
        fixmatch(_tiny_model(), xl, yl, xu, cfg, val=val, checkpoint=ck, on_eval=stop)
    assert torch.load(ck, weights_only=False)["step"] == at - cfg.eval_every
    return fixmatch(_tiny_model(), xl, yl, xu, cfg, val=val, checkpoint=ck)


def test_a_few_steps_learn_tiny_data_and_resume(tmp_path) -> None:
    rng = np.random.default_rng(0)
    xl, yl = _toy(8, rng)
    xu, yu = _toy(200, rng)
    xv, yv = _toy(100, rng)
    torch.manual_seed(0)
    model = _tiny_model()
    before = accuracy(model, xv, yv)
    cfg = FixMatchConfig(
        steps=40, batch_size=8, mu=2, lr=0.05, ema=0.9, eval_every=20, progress=False,
        tau=0.8, dist_align=True, shift=1, magnitude=3.0, cutout=0.25,
    )  # fmt: skip
    truth = np.where(np.arange(200) < 100, yu, -1)
    res = fixmatch(model, xl, yl, xu, cfg, val=(xv, yv), unlabeled_truth=truth)
    assert [r["step"] for r in res.history] == [20, 40]
    assert res.history[-1]["loss_x"] < res.history[0]["loss_x"] or res.best_val_acc > 0.9
    assert res.best_val_acc >= 0.8 > before or res.best_val_acc >= 0.9
    assert accuracy(res.model, xv, yv) == pytest.approx(res.best_val_acc)
    assert res.best_step in (20, 40)
    # resumable: a run interrupted after its first evaluation and resumed from the
    # checkpoint of step 20 ends exactly like an uninterrupted one
    torch.manual_seed(0)
    full = fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv))
    ck = tmp_path / "ck.pt"
    resumed = interrupted_and_resumed(cfg, xl, yl, xu, (xv, yv), ck, at=40)
    keys = ("step", "loss", "mask", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [
        [r[k] for k in keys] for r in full.history
    ]
    with pytest.raises(ValueError, match="another config"):
        fixmatch(_tiny_model(), xl, yl, xu, FixMatchConfig(steps=41), checkpoint=ck)
    # the file holds the val-chosen EMA weights the run returned
    weights = best_weights(load_checkpoint(ck))
    assert weights is not None
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(weights[name], value), name
    assert best_weights(dict(resumed.model.state_dict())) is None  # a plain state dict


def test_bf16_learns_resumes_and_returns_a_float32_model(tmp_path) -> None:
    """``precision="bf16"``: the tiny task is learnt as in float32, validation and the returned
    model score in float32, and a checkpoint written before the field existed resumes."""
    xl, yl, xu, (xv, yv) = toy_semisup()
    cfg = FixMatchConfig(
        steps=40, batch_size=8, mu=2, lr=0.05, ema=0.9, eval_every=20, progress=False,
        tau=0.8, shift=1, magnitude=3.0, cutout=0.25, precision="bf16",
    )  # fmt: skip
    torch.manual_seed(0)
    res = fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv))
    assert res.best_val_acc >= 0.9
    assert res.model.autocast_dtype is None
    assert res.model(torch.rand(3, 1, 8, 8)).dtype == torch.float32
    assert accuracy(res.model, xv, yv) == pytest.approx(res.best_val_acc)
    ck = tmp_path / "ck.pt"
    resumed = interrupted_and_resumed(cfg, xl, yl, xu, (xv, yv), ck, at=40)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in res.history]
    plain = FixMatchConfig(**{**cfg.to_dict(), "precision": "fp32", "steps": 20})
    torch.manual_seed(0)
    fixmatch(_tiny_model(), xl, yl, xu, plain, val=(xv, yv), checkpoint=tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=False)
    del state["config"]["precision"]  # written before the field existed
    torch.save(state, tmp_path / "old.pt")
    again = fixmatch(_tiny_model(), xl, yl, xu, plain, checkpoint=tmp_path / "old.pt")
    assert again.best_step == 20


def test_bad_inputs_raise() -> None:
    rng = np.random.default_rng(0)
    xl, yl = _toy(4, rng)
    cfg = FixMatchConfig(steps=1, progress=False)
    with pytest.raises(ValueError):
        fixmatch(_tiny_model(), xl, yl[:3], xl, cfg)
    with pytest.raises(ValueError):
        fixmatch(_tiny_model(), xl, yl + 5, xl, cfg)
    with pytest.raises(ValueError):
        fixmatch(_tiny_model(), xl.astype(np.float32), yl, xl, cfg)


def test_ema_teacher_labels_the_weak_view() -> None:
    """With a teacher, the pseudo-labels are the teacher's argmax, not the model's."""
    torch.manual_seed(0)
    model, teacher = _tiny_model(), _tiny_model()
    teacher.eval()
    rng = np.random.default_rng(0)
    xu = torch.from_numpy(_toy(16, rng)[0]).float() / 255
    cfg = FixMatchConfig(tau=0.0, progress=False)
    xl, yl = xu[:2], torch.tensor([0, 1])
    _, st = fixmatch_loss(model, xl, yl, xu, xu, cfg, teacher=teacher)
    with torch.no_grad():
        assert torch.equal(st["label"], teacher(xu).argmax(1))
    _, st = fixmatch_loss(model, xl, yl, xu, xu, cfg)
    with torch.no_grad():
        assert torch.equal(st["label"], model(xu).argmax(1))


def test_strong_view_ops_are_checked_and_recorded() -> None:
    cfg = FixMatchConfig(ops=["rotate", "shear_x"])  # a list from a CLI is kept as a tuple
    assert cfg.ops == ("rotate", "shear_x")
    assert cfg.to_dict()["ops"] == ["rotate", "shear_x"]
    for bad in ((), ("rotate", "blur")):
        with pytest.raises(ValueError, match="ops"):
            FixMatchConfig(ops=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_draws_the_cpu_runs_batches() -> None:
    """The same seed gives the same noise on either device, and a CUDA run tracks the CPU run
    (only float rounding differs)."""
    from training.noise import rand_augment, weak_augment

    x = torch.rand(32, 1, 12, 12)
    views = []
    for dev in ("cpu", "cuda"):
        g = torch.Generator().manual_seed(3)
        views.append(rand_augment(weak_augment(x.to(dev), g), g, magnitude=7.0).cpu())
    assert torch.allclose(views[0], views[1], atol=1e-4)
    rng = np.random.default_rng(0)
    xl, yl = _toy(8, rng)
    xu, _ = _toy(120, rng)
    xv, yv = _toy(60, rng)
    cfg = FixMatchConfig(
        steps=20, batch_size=8, mu=2, lr=0.05, ema=0.9, eval_every=10, progress=False,
        tau=0.8, dist_align=True, flex=True, ema_teacher=True, shift=1, magnitude=3.0,
    )  # fmt: skip
    runs = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        runs.append(fixmatch(_tiny_model(), xl, yl, xu, cfg, val=(xv, yv), device=dev))
    cpu, cuda = runs
    assert next(cuda.model.parameters()).device.type == "cuda"
    for a, b in zip(cpu.history, cuda.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05, abs=0.02)
    assert cuda.best_val_acc == pytest.approx(cpu.best_val_acc, abs=0.1)
