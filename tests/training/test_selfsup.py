"""training.selfsup: the pretext tasks, NT-Xent by hand, both loops improve their objective,
and the pre-trained backbone goes on to fine-tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.backbones.small_vgg import SmallVGG
from training.finetune import Classifier, FitConfig, fit, flip_translate
from training.inference import accuracy
from training.selfsup import (
    PretrainConfig,
    nt_xent,
    pretrain_rotation,
    pretrain_simclr,
    random_resized_crop,
    rotate_batch,
    simclr_augment,
)


def oriented_images(n: int = 32, size: int = 12, seed: int = 0) -> np.ndarray:
    """Noisy images with an upright "L" (a bar down the left, a foot at the bottom) at a
    random place: their rotation is easy to tell."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (n, 1, size, size)).astype(np.uint8)
    for i in range(n):
        r, q = rng.integers(0, 3, 2)
        x[i, 0, r : r + 8, q : q + 2] = 255
        x[i, 0, r + 6 : r + 8, q : q + 6] = 255
    return x


def distinct_images(n: int = 32, seed: int = 0) -> np.ndarray:
    """Each image its own coarse random 4x4 pattern, blown up to 12x12: instances that stay
    recognisable under crops and flips."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8)
    return coarse.repeat(3, axis=2).repeat(3, axis=3)


def test_rotate_batch() -> None:
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    xr, yr = rotate_batch(x)
    assert xr.shape == (8, 1, 3, 3) and yr.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(xr[:2], x)
    assert torch.equal(xr[2], torch.rot90(x[0], 1, dims=(1, 2)))  # counter-clockwise
    assert torch.equal(torch.rot90(xr[6:], 1, dims=(2, 3)), x)  # 270 + 90 = 360
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 1, 3, 4))


def test_nt_xent_by_hand() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # anchor 0 (z1[0]): positive z2[0] (cos 1), negatives z1[1] and z2[1] (cos 0)
    one = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(one, rel=1e-6)  # all 4 anchors alike
    # the same through a plain softmax over the 2B - 1 others
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    logits = torch.stack([sim[0, [2, 1, 3]]])
    assert float(F.cross_entropy(logits, torch.tensor([0]))) == pytest.approx(one, rel=1e-6)
    # pairs swapped: every positive is orthogonal, the loss grows
    assert float(nt_xent(z1, z2.flip(0), t)) > one
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:1], t)


def test_simclr_views() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 12, 12)
    a, b = simclr_augment(x, gen), simclr_augment(x, gen)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, b)
    full = random_resized_crop(x, gen, scale=(1.0, 1.0))  # whole image, aspect ~1
    assert full.shape == x.shape


def test_rotation_pretraining_learns_and_fine_tunes() -> None:
    x = oriented_images()
    torch.manual_seed(0)
    backbone = SmallVGG(1, 4)
    cfg = PretrainConfig(steps=40, batch_size=16, lr=1e-2, log_every=10)
    res = pretrain_rotation(backbone, x, cfg)
    assert res.backbone is backbone and res.feature_dim == 16
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.history[-1]["acc"] > 0.5  # chance: 0.25
    assert res.cpu_seconds > 0 and not backbone.training
    # the pre-trained backbone goes on to fine-tuning (here: which way the "L" was turned)
    xr, yr = rotate_batch(torch.from_numpy(x[:16]))
    images = xr.numpy().astype(np.uint8)
    model = Classifier(res.backbone, res.feature_dim, 4)
    fit(model, images, yr.numpy(), FitConfig(mode="linear", epochs=4, batch_size=16, lr=0.05))
    assert accuracy(model, images, yr.numpy()) > 0.5


def test_simclr_pretraining_lowers_its_loss() -> None:
    """Instance discrimination on 32 distinct patterns, with flip + 1 px shift views (the
    default 28x28 views, cut-out included, would hide most of a 12x12 image)."""
    x = distinct_images(32)
    torch.manual_seed(0)
    cfg = PretrainConfig(steps=40, batch_size=16, lr=1e-2, log_every=10, proj_dim=16)
    res = pretrain_simclr(SmallVGG(1, 4), x, cfg, augment=lambda b, g: flip_translate(b, g, pad=1))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.5
    assert res.history[-1]["acc"] > 0.3  # a random partner among 2B - 1 would be 1 / 31


@pytest.mark.parametrize(
    "kw",
    [{"steps": 0}, {"batch_size": 1}, {"lr": 0.0}, {"temperature": 0.0}, {"num_threads": 0}],
)
def test_bad_configs(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PretrainConfig(**kw)  # type: ignore[arg-type]


def test_bad_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pretrain_rotation(SmallVGG(1, 4), np.zeros((4, 1, 8, 8), np.float32), PretrainConfig())


def test_fixmatch_experiment_starts_from_simclr_and_resumes_it(tmp_path) -> None:
    from training.experiments.fmnist_fixmatch import build_model, parse, simclr_init

    args = parse(["--out", str(tmp_path), "--simclr-steps", "3", "--simclr-batch", "8"])
    args.no_progress = True
    torch.manual_seed(0)
    model = build_model(args)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28)).astype(np.uint8)
    record = simclr_init(model, images, args, seed=0)
    assert record["config"]["steps"] == 3 and record["cpu_seconds"] > 0
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert (tmp_path / "simclr_backbone.pt").is_file()
    torch.manual_seed(1)
    again = build_model(args)
    assert simclr_init(again, images, args, seed=0) == record  # loaded, not retrained
    for k, v in again.backbone.state_dict().items():
        assert torch.equal(v, after[k])


def test_fixmatch_experiment_runs_simclr_on_its_own_thread_count(tmp_path) -> None:
    from training.experiments.fmnist_fixmatch import build_model, main, parse, simclr_init

    args = parse(["--out", str(tmp_path), "--simclr-steps", "2", "--simclr-batch", "8",
                  "--threads", "2", "--simclr-threads", "1"])  # fmt: skip
    args.no_progress = True
    images = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28)).astype(np.uint8)
    was = torch.get_num_threads()
    try:
        record = simclr_init(build_model(args), images, args, seed=0)
        assert record["threads"] == 1
        assert torch.get_num_threads() == 2  # the FixMatch stage gets --threads back
    finally:
        torch.set_num_threads(was)
    assert main(["--out", str(tmp_path / "x"), "--simclr-threads", "0"]) == 2
