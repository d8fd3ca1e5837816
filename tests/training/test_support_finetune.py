"""Test-time fine-tuning on the support set (training/experiments/omniglot_support_finetune.py)."""

import torch
from torch import nn

from training.config import AugmentConfig
from training.experiments.omniglot_support_finetune import finetune_on_support
from training.methods.protonet import PrototypicalNetworks


def _support() -> torch.Tensor:
    """Four 16x16 inverted-ink glyphs: a bar, a column, a box and a diagonal."""
    x = torch.zeros(4, 1, 16, 16)
    x[0, 0, 7:9, 3:13] = 1.0
    x[1, 0, 3:13, 7:9] = 1.0
    x[2, 0, 4:12, 4] = x[2, 0, 4:12, 11] = x[2, 0, 4, 4:12] = x[2, 0, 11, 4:12] = 1.0
    for i in range(3, 13):
        x[3, 0, i, i] = 1.0
    return x


def _protonet() -> PrototypicalNetworks:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    return PrototypicalNetworks(backbone, distance="l2")


def test_finetuning_lowers_the_pseudo_episode_loss_and_leaves_the_original() -> None:
    method = _protonet()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    aug = AugmentConfig(degrees=10.0, translate=0.05, shear=5.0, stroke=0.3, scale=(0.9, 1.1))
    losses: list[float] = []
    tuned = finetune_on_support(
        method, _support(), lambda x: (x - 0.1) / 0.3, aug, steps=60, lr=3e-3, queries=3,
        gen=torch.Generator().manual_seed(0), on_step=lambda _s, _m, loss: losses.append(loss),
    )  # fmt: skip
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    # a copy was tuned: the original's weights and BatchNorm statistics are unchanged ...
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k
    # ... and the copy kept the trained statistics (BatchNorm in eval mode) but moved its weights
    bn = next(m for m in tuned.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, before["backbone.1.running_mean"])
    assert not torch.equal(tuned.state_dict()["backbone.0.weight"], before["backbone.0.weight"])


def test_finetuning_is_reproducible_from_the_generator() -> None:
    aug = AugmentConfig(degrees=10.0, translate=0.05, stroke=0.3)
    runs = [
        finetune_on_support(
            _protonet(), _support(), lambda x: x, aug, 3, 1e-3, 2, torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    ]
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), k
