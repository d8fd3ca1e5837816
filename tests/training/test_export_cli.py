"""The ``protoserve train`` CLI end to end, and the export round trip of a trained Conv-4."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.cli import main as protoserve
from server.imaging import Preprocessor
from server.model_repo import load_model
from server.runtimes.onnx_rt import OnnxRuntime
from tests.training.glyphs import glyph
from training.config import TrainConfig, build_method
from training.data import ImageSet, split_classes
from training.data.pixels import pixels_from_images
from training.metatrain import CHECKPOINT, load_checkpoint, metatrain


def test_export_round_trip(tmp_path: Path, glyphs: ImageSet) -> None:
    """A trained Conv-4 ProtoNet exported: onnxruntime equals torch, on the same PNG bytes."""
    from training.export_checkpoint import export_checkpoint

    train, val = split_classes(glyphs, 0.25)
    cfg = TrainConfig(
        size=16,
        n_way=4,
        q_query=2,
        episodes=3,
        val_way=3,
        val_query=3,
        val_episodes=5,
        backbone_options={"hidden": 16},
    )
    metatrain(cfg, tmp_path / "run", data=(train, val), progress=False)
    folder = export_checkpoint(tmp_path / "run" / CHECKPOINT, tmp_path / "model")
    assert folder.manifest.scoring.metric == "l2" and folder.manifest.embedding_dim == 16
    assert folder.manifest.preprocess == glyphs.preprocess
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    method = build_method(cfg, 1, (16, 16))
    method.load_state_dict(state["model"])
    method.eval()

    images = [glyph(c, (2, 1), width=7) for c in range(6)]
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blobs.append(buf.getvalue())
    served = OnnxRuntime(load_model(tmp_path / "model")).encode_images(
        Preprocessor(folder.manifest.preprocess).preprocess_bytes(blobs)
    )
    ds = ImageSet(
        pixels_from_images(images, glyphs.preprocess),
        np.arange(6),
        [str(i) for i in range(6)],
        ["a"] * 6,
        glyphs.preprocess,
    )
    with torch.no_grad():
        ours = method.embed(ds.normalise(ds.batch(np.arange(6), np.zeros(6, int)))).numpy()
    np.testing.assert_allclose(served, ours, rtol=1e-4, atol=1e-5)

    # The served crop may differ from training's (a test-time choice), checked like a manifest.
    from training.export import ExportError

    inked = export_checkpoint(tmp_path / "run" / CHECKPOINT, tmp_path / "ink", crop="ink")
    assert inked.manifest.preprocess == {**glyphs.preprocess, "crop": "ink", "ink_margin": 0.15}
    assert "served with crop 'ink'" in inked.manifest.provenance.architecture
    with pytest.raises(ExportError, match="only with crop 'ink'"):
        export_checkpoint(tmp_path / "run" / CHECKPOINT, tmp_path / "x", ink_margin=0.2)
    with pytest.raises(ExportError, match="ink_margin"):
        export_checkpoint(tmp_path / "run" / CHECKPOINT, tmp_path / "x", crop="ink", ink_margin=-1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(8):
        (root / f"c{c}").mkdir()
        for i in range(6):
            shift = (int(rng.integers(-5, 6)), int(rng.integers(-5, 6)))
            glyph(c, shift).save(root / f"c{c}" / f"{i}.png")
    return root


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    assert protoserve(["train", *args, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_cli_train_evaluate_export(tmp_path: Path, image_folder: Path, capsys) -> None:
    data = ["--dataset", "folder", "--data", str(image_folder), "--size", "16"]
    run, model = tmp_path / "run", tmp_path / "model"
    assert (
        protoserve(
            [
                "train",
                "metatrain",
                *data,
                "--out",
                str(run),
                "--way",
                "3",
                "--query",
                "2",
                "--episodes",
                "4",
                "--hidden",
                "8",
                "--val-way",
                "2",
                "--val-query",
                "2",
                "--val-episodes",
                "5",
                "--val-fraction",
                "0.25",
                "--degrees",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "step 4:" in out and "validation 2-way 1-shot" in out
    log = json.loads((run / "log.json").read_text())
    assert log["command"].startswith("protoserve train metatrain --dataset folder")
    assert log["config"]["augment"] == {"degrees": 5.0}

    episodes = ["--way", "2", "--query", "2", "--episodes", "50"]
    by_ckpt = run_json(["evaluate", "--checkpoint", str(run / CHECKPOINT), *episodes], capsys)
    assert (
        protoserve(["train", "export", "--checkpoint", str(run / CHECKPOINT), "--out", str(model)])
        == 0
    )
    capsys.readouterr()
    manifest = load_model(model).manifest
    assert manifest.provenance.recipe == log["command"]
    assert manifest.preprocess["channels"] == "RGB" and manifest.preprocess["size"] == [16, 16]
    by_model = run_json(
        ["evaluate", "--model", str(model), *data, "--val-fraction", "0.25", *episodes], capsys
    )
    assert by_model == pytest.approx(by_ckpt)
    assert by_ckpt["episodes"] == 50 and 0 <= by_ckpt["acc"] <= 1

    export = ["train", "export", "--checkpoint", str(run / CHECKPOINT), "--out"]
    turned = tmp_path / "turned"
    args = [*export, str(turned), "--shift-average", "2", "--rotate-average", "10"]
    assert protoserve(args) == 0
    arch = load_model(turned).manifest.provenance.architecture
    assert arch.endswith("3x3 shifts of +-2 px x turns of -10, 0, +10 degrees")
    assert protoserve([*export, str(tmp_path / "bad"), "--rotate-average", "10"]) == 1
    assert "rotate_average needs shift_average" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        protoserve(["train", "--help"])
    assert e.value.code == 0
    assert "eval-runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        protoserve(["train", "metatrain", "--method", "nope"])
