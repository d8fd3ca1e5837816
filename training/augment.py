"""Episode augmentation on [0, 1] pixel batches: random affine, elastic distortion and
stroke-width jitter.

Each acts per image with a caller-supplied ``torch.Generator`` (reproducible, resumable).
``background`` is the pixel value of empty paper (0 for inverted Omniglot ink, 1 for dark
ink on white); the affine pads with it and the stroke jitter treats the other end as ink.
Stroke width: each image gets ``s ~ U(-stroke, stroke)``; ``s > 0`` moves pixels a fraction
``s`` of the way to their 3x3 grey dilation (thicker strokes), ``s < 0`` towards the erosion.
Elastic distortion (Simard et al. 2003, "Best practices for convolutional neural networks
applied to visual document analysis"): every image gets its own smooth random displacement
field, a ``ELASTIC_GRID`` x ``ELASTIC_GRID`` lattice of Gaussian offsets (std ``elastic``, a
fraction of the image side) upsampled bicubically over the image, added to the affine's sampling
grid so the image is resampled once. Strokes bend locally, as one drawer's copy of a character
differs from another's, where the affine moves the whole drawing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


ELASTIC_GRID = 4  # control points per side of the displacement lattice


def elastic_field(n: int, h: int, w: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    """[n, h, w, 2] smooth displacements in ``grid_sample``'s [-1, 1] units, std ``strength``
    of the side at the control points (a side is 2 units)."""
    coarse = torch.randn(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=gen) * (2.0 * strength)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def random_warp(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One resampling: the random affine of ``cfg`` (identity where it has none) plus its
    elastic field, if any."""
    n = x.shape[0]
    rot = _uniform(n, -cfg.degrees, cfg.degrees, gen) * (math.pi / 180)
    shear = _uniform(n, -cfg.shear, cfg.shear, gen) * (math.pi / 180)
    zoom = _uniform(n, cfg.scale[0], cfg.scale[1], gen)
    shift = _uniform(2 * n, -cfg.translate, cfg.translate, gen).view(n, 2) * 2  # [-1, 1] units
    cos, sin, tan = rot.cos(), rot.sin(), shear.tan()
    # sampling grid = R(rot) @ [[1, tan], [0, 1]] / zoom, plus shift
    theta = torch.stack(
        [
            torch.stack([cos, cos * tan - sin, shift[:, 0]], 1),
            torch.stack([sin, sin * tan + cos, shift[:, 1]], 1),
        ],
        1,
    )
    theta[:, :, :2] /= zoom.view(n, 1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if cfg.elastic:
        grid = grid + elastic_field(n, x.shape[2], x.shape[3], cfg.elastic, gen)
    out = F.grid_sample(x - cfg.background, grid, padding_mode="zeros", align_corners=False)
    return out + cfg.background


def stroke_jitter(
    x: torch.Tensor, strength: float, background: float, gen: torch.Generator
) -> torch.Tensor:
    sign = 1.0 if background < 0.5 else -1.0
    ink = (x - background) * sign
    s = _uniform(x.shape[0], -strength, strength, gen).view(-1, 1, 1, 1)
    dilated = F.max_pool2d(ink, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-ink, 3, stride=1, padding=1)
    ink = ink + s.clamp_min(0) * (dilated - ink) + (-s).clamp_min(0) * (eroded - ink)
    return ink * sign + background


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> the same, augmented (unchanged when nothing is enabled)."""
    if cfg.stroke:
        x = stroke_jitter(x, cfg.stroke, cfg.background, gen)
    if cfg.warps:
        x = random_warp(x, cfg, gen)
    return x.clamp(0.0, 1.0)
