"""Input noise for self-training students, on [0, 1] float batches ``[B, C, H, W]``.

- ``weak_augment``: random horizontal flip and an integer shift with zero padding (the "weak"
  view of FixMatch, Sohn et al. 2020).
- ``rand_augment``: RandAugment (Cubuk et al., "RandAugment: Practical automated data
  augmentation with a reduced search space", CVPR-W 2020), in the form Noisy Student (Xie et
  al. 2020) and FixMatch use: each image gets its own ``n_ops`` operations drawn uniformly from
  ``OPS``, each with its own magnitude drawn uniformly in ``[0, magnitude]`` (scale 0..10) and a
  random sign, then Cutout (DeVries & Taylor 2017) of one square.
- ``Noise``: a configured callable ``(x, gen) -> x`` combining them, the ``augment`` argument
  that ``training.finetune.fit`` expects.

Every random choice is drawn from the caller's ``torch.Generator`` on the CPU, so a seed
reproduces a batch exactly; the images themselves may live on any device (a CUDA batch is
augmented where it is, from the same draws). Background is 0 (Fashion-MNIST: light garments
on black); geometric ops pad with 0. Outputs are clamped to [0, 1] and keep the input shape
and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"noise expects a float [B, C, H, W] batch, got {x.dtype} {tuple(x.shape)}"
        )


def _rand(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def _signed(m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.where(_rand(m.numel(), gen) < 0.5, -m, m)


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# -- single operations: x [b, C, H, W], m [b] magnitude in [0, 1] ---------------------------
def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _geometric(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=m.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if name == "rotate":  # up to 30 degrees
        a = m * (30 * math.pi / 180)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
        theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    elif name == "shear_x":  # up to 0.3
        theta[:, 0, 1] = 0.3 * m
    elif name == "shear_y":
        theta[:, 1, 0] = 0.3 * m
    elif name == "translate_x":  # up to 30% of the side ([-1, 1] grid units: x 2)
        theta[:, 0, 2] = 0.6 * m
    else:  # translate_y
        theta[:, 1, 2] = 0.6 * m
    return _affine(x, theta)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: factor 0 gives ``b``, 1 gives ``a``, above 1 extrapolates."""
    return b + _view(factor) * (a - b)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel on 256 levels (as PIL ImageOps.equalize)."""
    b, c, h, w = x.shape
    q = (x.clamp(0, 1) * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device)
    hist.scatter_add_(1, q, torch.ones(b * c, h * w, device=x.device))
    cdf = hist.cumsum(1)
    first = torch.gather(cdf, 1, q.min(1, keepdim=True).values)  # count at the darkest level
    denom = (h * w - first).clamp_min(1.0)
    out = (torch.gather(cdf, 1, q) - first) / denom
    flat = (h * w - first) <= 0  # one grey level only: leave the image alone
    out = torch.where(flat, q.float() / 255, out)
    return out.view(b, c, h, w).to(x.dtype)


def _photometric(name: str, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if name == "equalize":
        return _equalize(x)
    if name == "solarize":  # threshold from 1 (no change) down to 0 (full inversion)
        t = _view(1.0 - m.abs())
        return torch.where(x >= t, 1.0 - x, x)
    if name == "posterize":  # 8 bits down to 4
        bits = (8 - (4 * m.abs()).round()).to(torch.int64)
        step = _view((2.0 ** (8 - bits)).to(x.dtype))
        return torch.floor(x * 255 / step) * step / 255
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), 1.0 + 0.9 * m)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), 1.0 + 0.9 * m)
    if name == "sharpness":
        k = torch.tensor(
            [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device
        ).div(13)
        c = x.shape[1]
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
        return _blend(x, smooth, 1.0 + 0.9 * m)
    raise ValueError(f"unknown RandAugment op {name!r} (choose from {', '.join(OPS)})")


def apply_op(name: str, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on every image of ``x``; ``magnitude`` [B] in [-1, 1] (signed)."""
    _check(x)
    if magnitude.shape != (x.shape[0],):
        raise ValueError(f"magnitude must be [{x.shape[0]}], got {tuple(magnitude.shape)}")
    m = magnitude.to(x.device)
    if name in _GEOMETRIC:
        return _geometric(name, x, m).clamp(0.0, 1.0)
    return _photometric(name, x, m).clamp(0.0, 1.0)


def cutout(x: torch.Tensor, gen: torch.Generator, size: float = 0.5) -> torch.Tensor:
    """Zero one square of side ``round(size * H)`` per image, centred anywhere (may overhang)."""
    _check(x)
    if not 0.0 <= size <= 1.0:
        raise ValueError(f"cutout size must be a fraction of the side in [0, 1], got {size}")
    b, _, h, w = x.shape
    s = round(size * h)
    if s == 0:
        return x
    cy = (torch.rand(b, generator=gen) * h).long().view(b, 1, 1).to(x.device)
    cx = (torch.rand(b, generator=gen) * w).long().view(b, 1, 1).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy).abs() * 2 < s) & ((xs - cx).abs() * 2 < s)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def weak_augment(
    x: torch.Tensor, gen: torch.Generator, *, flip: bool = True, shift: int = 2
) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and an integer shift in [-shift, shift] pixels."""
    _check(x)
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    b, _, h, w = x.shape
    out = x
    if flip:
        mask = _view(torch.rand(b, generator=gen) < 0.5).to(x.device)
        out = torch.where(mask, out.flip(3), out)
    if shift:
        d = torch.randint(-shift, shift + 1, (b, 2), generator=gen).to(x.device)
        padded = F.pad(out, (shift, shift, shift, shift))
        ar_h = torch.arange(h, device=x.device).view(1, h)
        ar_w = torch.arange(w, device=x.device).view(1, w)
        ys = (ar_h + shift - d[:, :1]).view(b, 1, h, 1).expand(-1, 1, h, w)
        xs = (ar_w + shift - d[:, 1:]).view(b, 1, 1, w).expand(-1, 1, h, w)
        idx = ys * (w + 2 * shift) + xs
        flat = padded.flatten(2)
        out = torch.gather(flat, 2, idx.flatten(2).expand(-1, x.shape[1], -1)).view_as(x)
    return out


def rand_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    n_ops: int = 2,
    magnitude: float = 10.0,
    ops: tuple[str, ...] = OPS,
    cutout_size: float = 0.5,
) -> torch.Tensor:
    """RandAugment with per-image ops and magnitudes ~ U[0, magnitude] (0..10), then Cutout."""
    _check(x)
    if n_ops < 0:
        raise ValueError(f"n_ops must be >= 0, got {n_ops}")
    if not 0.0 <= magnitude <= 10.0:
        raise ValueError(f"magnitude is on RandAugment's 0..10 scale, got {magnitude}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
    b = x.shape[0]
    out = x
    for _ in range(n_ops):
        choice = torch.randint(len(ops), (b,), generator=gen)
        mag = _signed(_rand(b, gen) * (magnitude / 10.0), gen)
        new = out.clone()
        for k, name in enumerate(ops):
            sel = (choice == k).nonzero().flatten()
            if sel.numel():
                new[sel] = apply_op(name, out[sel], mag[sel])
        out = new
    if cutout_size:
        out = cutout(out, gen, cutout_size)
    return out.clamp(0.0, 1.0)


@dataclass(frozen=True)
class Noise:
    """Student input noise as one callable ``(x, gen) -> x``: weak view, then RandAugment.

    ``strength`` names a preset: ``"none"``, ``"weak"`` (flip + shift) or ``"strong"``
    (weak, then RandAugment with ``n_ops``/``magnitude`` and Cutout of ``cutout_size``).
    """

    strength: str = "strong"
    n_ops: int = 2
    magnitude: float = 10.0
    cutout_size: float = 0.5
    flip: bool = True
    shift: int = 2

    def __post_init__(self) -> None:
        if self.strength not in ("none", "weak", "strong"):
            raise ValueError(f"strength must be none, weak or strong, got {self.strength!r}")
        if self.strength == "strong":  # fail early on bad RandAugment settings
            rand_augment(
                torch.zeros(1, 1, 4, 4),
                torch.Generator(),
                n_ops=self.n_ops,
                magnitude=self.magnitude,
                cutout_size=self.cutout_size,
            )
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0, got {self.shift}")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.strength == "none":
            _check(x)
            return x
        x = weak_augment(x, gen, flip=self.flip, shift=self.shift)
        if self.strength == "strong":
            x = rand_augment(
                x, gen, n_ops=self.n_ops, magnitude=self.magnitude, cutout_size=self.cutout_size
            )
        return x


NoiseFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
