"""``fmnist-ensemble``: member probabilities averaged over 1..N members and the flipped view,
the choice made on validation, against a hand-built case on a small IDX dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.data.semisup import semisup_split
from training.experiments.fmnist_ensemble import combine, main

from .test_data import idx_bytes


def _onehot(labels: np.ndarray, weight_truth: float) -> np.ndarray:
    """``weight_truth`` on each label, the rest on the next class."""
    p = np.zeros((len(labels), 10), dtype=np.float32)
    p[np.arange(len(labels)), labels] = weight_truth
    p[np.arange(len(labels)), (labels + 1) % 10] += 1.0 - weight_truth
    return p


def _member(folder: Path, seed: int, probs: dict[str, np.ndarray]) -> Path:
    folder.mkdir()
    np.savez(folder / "predictions.npz", **probs)
    (folder / "results.json").write_text(json.dumps({"seed": seed}))
    return folder


def test_ensemble_table_and_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fmnist"
    root.mkdir()
    train_y, test_y = np.arange(5200) % 10, np.arange(20) % 10
    for stem, arr in (
        ("train-images-idx3-ubyte", np.zeros((5200, 28, 28))),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", np.zeros((20, 28, 28))),
        ("t10k-labels-idx1-ubyte", test_y),
    ):
        (root / stem).write_bytes(idx_bytes(arr))
    yv = train_y[semisup_split(train_y, per_class=10, n_val=5000, seed=3).val]

    def probs(y: np.ndarray, odd: float, even: float) -> np.ndarray:
        is_even = np.arange(len(y)) % 2 == 0
        return np.where(is_even[:, None], _onehot(y, even), _onehot(y, odd))

    # member 1: right on even rows, wrong (0.4 on the truth) on odd rows; its flipped view is
    # always right, so plain + flip is right everywhere (odd rows: 0.7 against 0.3)
    m1 = {f"{part}{v}": (probs(y, 0.4, 1.0) if not v else _onehot(y, 1.0))
          for part, y in (("val", yv), ("test", test_y)) for v in ("", "_flip")}  # fmt: skip
    # member 2: 0.1 on the truth everywhere; with member 1, plain: even right, odd wrong
    m2 = {f"{part}{v}": _onehot(y, 0.1)
          for part, y in (("val", yv), ("test", test_y)) for v in ("", "_flip")}  # fmt: skip
    a, b = _member(tmp_path / "a", 3, m1), _member(tmp_path / "b", 3, m2)
    np.testing.assert_allclose(combine([m1, m2], "test", False), (m1["test"] + m2["test"]) / 2)
    out = tmp_path / "ens.json"
    assert main([str(a), str(b), "--root", str(root), "--out", str(out)]) == 0
    rows = {(r["members"], r["flip"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[1, False]["val_acc"] == pytest.approx(0.5)
    assert rows[1, True]["val_acc"] == rows[1, True]["test_acc"] == 1.0
    assert rows[2, False]["test_acc"] == pytest.approx(0.5)
    assert json.loads(out.read_text())["chosen"] == rows[1, True]
    assert "validation chose 1 member(s), flip True" in capsys.readouterr().out
    # members drawn on another labeled split, or a folder that is not a run: refused
    c = _member(tmp_path / "c", 4, m2)
    assert main([str(a), str(c), "--root", str(root)]) == 2
    assert "different labeled draws (--seed [3, 4])" in capsys.readouterr().err
    assert main([str(a), str(tmp_path), "--root", str(root)]) == 2
    assert "no predictions.npz" in capsys.readouterr().err
