"""Episode augmentation (training/augment.py): the elastic field and how augment() composes."""

import argparse

import pytest
import torch

from training.augment import ELASTIC_GRID, augment, elastic_field
from training.cli_args import config_from_args, metatrain_args
from training.config import AugmentConfig


def _strokes() -> torch.Tensor:
    """Two 32x32 inverted-ink images (0 paper, 1 ink): a cross and a box."""
    x = torch.zeros(2, 1, 32, 32)
    x[0, 0, 15:17, 6:26] = 1.0
    x[0, 0, 6:26, 15:17] = 1.0
    x[1, 0, 8:24, 8:10] = 1.0
    x[1, 0, 8:24, 22:24] = 1.0
    x[1, 0, 8:10, 8:24] = 1.0
    x[1, 0, 22:24, 8:24] = 1.0
    return x


def test_elastic_field_is_smooth_with_the_requested_spread() -> None:
    f = elastic_field(4000, 32, 32, 0.05, torch.Generator().manual_seed(0))
    assert f.shape == (4000, 32, 32, 2)
    # the corners are control points (bicubic, align_corners): Gaussian with std 2 * 0.05
    corners = f[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.std().item() == pytest.approx(0.1, rel=0.05)
    assert corners.mean().abs().item() < 0.005
    # smooth: one pixel apart, displacements differ by a small part of their size (white
    # noise of the same spread would differ by more than the size itself)
    size = f.abs().mean().item()
    assert (f[:, 1:] - f[:, :-1]).abs().mean().item() < 0.25 * size
    assert (f[:, :, 1:] - f[:, :, :-1]).abs().mean().item() < 0.25 * size
    assert ELASTIC_GRID >= 2


def test_elastic_moves_strokes_by_about_its_strength() -> None:
    x = _strokes()
    gen = torch.Generator().manual_seed(1)
    weak = augment(x, AugmentConfig(elastic=0.002), gen)
    assert (weak - x).abs().max().item() < 0.25  # a fraction of a pixel
    strong = augment(x, AugmentConfig(elastic=0.05), torch.Generator().manual_seed(1))
    assert (strong - x).abs().sum().item() > 10 * (weak - x).abs().sum().item()
    # the drawing bends, it does not vanish or smear over the page
    ink, moved = x.sum((1, 2, 3)), strong.sum((1, 2, 3))
    assert torch.allclose(moved, ink, rtol=0.35)
    assert ((strong > 0.05).sum() < 2.5 * (x > 0).sum()).item()


def test_augment_is_seeded_and_identity_when_off() -> None:
    x = _strokes()
    assert torch.equal(augment(x, AugmentConfig(), torch.Generator().manual_seed(0)), x)
    cfg = AugmentConfig(degrees=10, translate=0.05, stroke=0.3, elastic=0.03)
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    c = augment(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_elastic_draws_after_the_affine() -> None:
    """An affine-only config draws exactly what it drew before elastic existed: the field's
    numbers come after, so runs without ``--elastic`` reproduce bit for bit."""
    x = _strokes()
    affine = AugmentConfig(degrees=10, translate=0.05)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment(x, affine, g1)
    augment(x, AugmentConfig(degrees=10, translate=0.05, elastic=0.03), g2)
    n = x.shape[0]
    torch.randn(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=g1)  # what the field drew
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_cli_flag_reaches_the_config() -> None:
    p = argparse.ArgumentParser()
    metatrain_args(p)
    on = config_from_args(p.parse_args(["--out", "x", "--elastic", "0.04"]))
    assert on.augment["elastic"] == 0.04
    assert AugmentConfig(**on.augment_kwargs()).warps
    off = config_from_args(p.parse_args(["--out", "x"]))
    assert "elastic" not in off.augment  # old checkpoints' configs stay equal
