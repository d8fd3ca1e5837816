"""``protoserve train finetune`` on an ImageFolder tree: hold-out split, fit, export, and the
exported model classifies through a real server like the torch model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.finetune_cli import main, stratified_holdout


def test_stratified_holdout() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = stratified_holdout(labels, 0.2, None, seed=3)
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[tr], minlength=3).tolist() == [8, 4, 1]
    assert not set(tr) & set(va) and len(tr) + len(va) == labels.size
    tr2, va2 = stratified_holdout(labels, 0.2, 3, seed=3)
    assert np.array_equal(va2, va) and np.bincount(labels[tr2]).tolist() == [3, 3, 1]
    assert np.array_equal(stratified_holdout(labels, 0.2, None, seed=3)[0], tr)  # seeded
    with pytest.raises(ValueError, match="val-fraction"):
        stratified_holdout(labels, 1.0, None, seed=0)


def shapes_folder(root: Path, n: int, seed: int) -> Path:
    """Three classes of 16x16 grayscale drawings: horizontal bar, vertical bar, square."""
    rng = np.random.default_rng(seed)
    for name in ("hbar", "vbar", "square"):
        (root / name).mkdir(parents=True)
        for i in range(n):
            im = rng.integers(0, 40, (16, 16)).astype(np.uint8)
            a, b = rng.integers(2, 6, 2)
            if name == "hbar":
                im[a + 4 : a + 7, 2:14] = 255
            elif name == "vbar":
                im[2:14, b + 4 : b + 7] = 255
            else:
                im[a : a + 8, b : b + 8] = 255
            Image.fromarray(im).save(root / name / f"{i}.png")
    return root


def test_folder_fit_export_and_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = shapes_folder(tmp_path / "train", 24, seed=0)
    test = shapes_folder(tmp_path / "test", 10, seed=1)
    repo = tmp_path / "models"
    argv = ["--data", str(train), "--test", str(test), "--size", "16", "--channels", "L"]
    argv += ["--backbone", "small_vgg", "--option", "width=4", "--mode", "full"]
    argv += ["--epochs", "4", "--steps-per-epoch", "10", "--lr", "3e-3", "--no-augment"]
    argv += ["--export", str(repo / "shapes")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labeled"] == 3 * (24 - 5) and out["test_acc"] > 0.6  # chance is 1/3
    manifest = json.loads((repo / "shapes" / "protoserve.json").read_text())
    assert manifest["preprocess"]["size"] == [16, 16]

    from tests.grpc.support import Running

    running = Running(tmp_path / "data", model_repo=repo)
    try:
        target = f"127.0.0.1:{running.port}"
        assert main([*argv[:-2], "--export", str(repo / "shapes2"), "--server", target,
                     "--collection", "shapes", "--score-test"]) == 0  # fmt: skip
        out = json.loads(capsys.readouterr().out)
        assert out["registered"] == ["hbar", "square", "vbar"]
        assert out["served_test_acc"] > 0.6
    finally:
        running.close()
