"""ShiftAverage: the mean over the 3x3 grid of shifted views, against a numpy reference, and
exported: onnxruntime serves the averaged embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from server.model_repo import load_model
from server.runtimes.onnx_rt import OnnxRuntime
from training.backbones.shift_average import ShiftAverage, rotation_taps


def reference(x: np.ndarray, embed: nn.Module, r: int) -> np.ndarray:
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    views = [
        padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w]
        for dy in (-r, 0, r)
        for dx in (-r, 0, r)
    ]
    with torch.no_grad():
        return np.mean([embed(torch.from_numpy(v)).numpy() for v in views], axis=0)


class Probe(nn.Module):
    """A position-sensitive embedding: any wrong crop or wrong averaging changes it."""

    def __init__(self, c: int, h: int, w: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(c * h * w, 5, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.weight)


def turned_reference(x: np.ndarray, embed: nn.Module, r: int) -> np.ndarray:
    """Views turned by -90, 0 and +90 degrees (exact on a square image), each shifted."""
    turns = [np.rot90(x, k, axes=(2, 3)).copy() for k in (-1, 0, 1)]
    return np.mean([reference(t, embed, r) for t in turns], axis=0)


@pytest.mark.parametrize("radius", [1, 2])
def test_mean_of_shifted_views(radius: int) -> None:
    x = np.random.default_rng(radius).normal(size=(3, 2, 7, 6)).astype(np.float32)
    probe = Probe(2, 7, 6)
    with torch.no_grad():
        got = ShiftAverage(probe, radius)(torch.from_numpy(x)).numpy()
        plain = probe(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, reference(x, probe, radius), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain, atol=1e-3)  # the shifts do something


def test_rotation_taps() -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 1, 6, 6)).astype(np.float32))

    def turn(img: torch.Tensor, degrees: float, h: int = 6, w: int = 6) -> torch.Tensor:
        index, weight = rotation_taps(h, w, degrees)
        flat = img.flatten(2)
        return (flat[:, :, index] * weight).sum(2).reshape(img.shape)

    torch.testing.assert_close(turn(x, 0.0), x)
    torch.testing.assert_close(turn(x, 90.0), torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise
    torch.testing.assert_close(turn(x, -90.0), torch.rot90(x, -1, dims=(2, 3)))
    index, weight = rotation_taps(5, 7, 10.0)
    assert index.shape == weight.shape == (4, 35) and int(index.min()) >= 0
    assert int(index.max()) < 35 and torch.allclose(weight.sum(0), torch.ones(35))
    flat = torch.full((1, 1, 5, 7), 0.25)  # a uniform image stays uniform (edges replicated)
    torch.testing.assert_close(turn(flat, 10.0, 5, 7), flat)


def test_mean_of_turned_and_shifted_views() -> None:
    x = np.random.default_rng(5).normal(size=(3, 1, 7, 7)).astype(np.float32)
    probe = Probe(1, 7, 7)
    avg = ShiftAverage(probe, 1, angles=(-90.0, 0.0, 90.0), size=(7, 7))
    assert avg.num_views == 27
    with torch.no_grad():
        got = avg(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, turned_reference(x, probe, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="built for"):
        avg(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="input size"):
        ShiftAverage(probe, 1, angles=(5.0,))


def test_rejects_bad_radius_and_input() -> None:
    with pytest.raises(ValueError, match="radius"):
        ShiftAverage(Probe(1, 4, 4), 0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        ShiftAverage(Probe(1, 4, 4))(torch.zeros(4, 4))


@pytest.mark.parametrize("angles", [(), (-90.0, 0.0, 90.0)])
def test_exported_tower_serves_the_average(tmp_path: Path, angles: tuple[float, ...]) -> None:
    """onnxruntime serves the same mean as the numpy reference: 9 shifts, or 3 turns x 9."""
    from training.export import export_image_backbone

    probe = Probe(1, 8, 8).eval()
    pre = {
        "size": [8, 8],
        "mean": [0.5],
        "std": [0.5],
        "channels": "L",
        "resize": "squash",
        "crop": "none",
        "interpolation": "box",
    }
    folder = export_image_backbone(
        ShiftAverage(probe, 1, angles=angles, size=(8, 8)).eval(),
        tmp_path / "m",
        preprocess=pre,
        architecture="probe",
        recipe="test",
    )
    x = np.random.default_rng(3).normal(size=(5, 1, 8, 8)).astype(np.float32)
    served = OnnxRuntime(load_model(folder.path)).encode_images(x)
    want = turned_reference(x, probe, 1) if angles else reference(x, probe, 1)
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-5)
