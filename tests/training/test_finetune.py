"""training.finetune: each mode learns a tiny separable set, two-stage freezes then unfreezes,
discriminative LRs, early stopping, MC dropout, bad arguments; export and registration into a
real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.backbones.small_vgg import SmallVGG
from training.finetune import (
    Classifier,
    FitConfig,
    fit,
    flip_translate,
    fmnist_augment,
    fmnist_classifier,
    make_optimizer,
)
from training.inference import accuracy, embed, predict_proba, to_unit

C, SIZE = 3, 12


def tiny_set(n_per_class: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright square of side 2 + 3c at a random place in a noisy 12x12 image
    (separable by position-free, globally pooled features too)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (C * n_per_class, 1, SIZE, SIZE)).astype(np.uint8)
    y = np.repeat(np.arange(C), n_per_class)
    for i, c in enumerate(y):
        side = 2 + 3 * c
        r, q = rng.integers(0, SIZE - side + 1, 2)
        x[i, 0, r : r + side, q : q + side] = 250
    return x, y.astype(np.int64)


def tiny_model(dropout: float = 0.0, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(SmallVGG(1, 4), 16, C, dropout)


def calibrated(m: Classifier, x: np.ndarray) -> Classifier:
    """Batch-norm statistics measured on ``x`` (a stand-in for a pre-trained backbone: frozen
    default statistics shrink a random net's features to almost nothing)."""
    bns = [b for b in m.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average
    with torch.no_grad():
        m.backbone.train()(to_unit(x))
    for b in bns:
        b.momentum = 0.1
    return m


def cfg(**kw: Any) -> FitConfig:
    base: dict[str, Any] = {"epochs": 6, "batch_size": 12, "lr": 1e-2, "steps_per_epoch": 4}
    return FitConfig(**{**base, **kw})


def params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "linear", "two-stage"])
def test_each_mode_learns(mode: str) -> None:
    x, y = tiny_set()
    m = calibrated(tiny_model(), x)
    before = accuracy(m, x, y)
    res = fit(
        m, x, y, cfg(mode=mode, head_epochs=2, epochs=8, lr=0.1 if mode == "linear" else 3e-2)
    )
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert accuracy(m, x, y) > max(0.6, before)
    assert res.cpu_seconds > 0 and len(res.history) == 8 and res.best_epoch == 7


def test_linear_probe_keeps_the_backbone() -> None:
    x, y = tiny_set()
    m = tiny_model()
    b0, h0 = params(m.backbone), params(m.head)
    fit(m, x, y, cfg(mode="linear", epochs=2))
    assert all(torch.equal(b0[k], v) for k, v in m.backbone.state_dict().items())  # BN stats too
    assert not torch.equal(h0["weight"], m.head.weight)


def test_two_stage_freezes_then_unfreezes() -> None:
    x, y = tiny_set()
    m = tiny_model()
    calls: list[tuple[bool, bool]] = []
    first = next(m.backbone.parameters())
    m.backbone.register_forward_hook(
        lambda mod, i, o: calls.append((mod.training, first.requires_grad and o.requires_grad))
    )
    res = fit(m, x, y, cfg(mode="two-stage", epochs=3, head_epochs=2))
    assert [r["stage"] for r in res.history] == ["head", "head", "full"]
    assert set(res.history[0]["lr"]) == {"head"} and set(res.history[2]["lr"]) == {
        "head",
        "backbone",
    }
    steps = 4
    assert calls[: 2 * steps] == [(False, False)] * (2 * steps)  # eval mode, no gradient
    assert calls[2 * steps :] == [(True, True)] * steps


def test_two_stage_backbone_moves_only_after_the_head_stage() -> None:
    x, y = tiny_set()
    m0 = tiny_model()
    b0 = params(m0.backbone)
    m1 = tiny_model()
    fit(m1, x, y, cfg(mode="two-stage", epochs=3, head_epochs=2, schedule="constant"))
    assert any(not torch.equal(b0[k], v) for k, v in m1.backbone.state_dict().items())
    m2 = tiny_model()
    fit(m2, x, y, cfg(mode="linear", epochs=2, schedule="constant"))
    assert all(torch.equal(b0[k], v) for k, v in m2.backbone.state_dict().items())
    assert all(p.requires_grad for p in m1.parameters())  # unfrozen after fit


def test_discriminative_learning_rates() -> None:
    m = tiny_model()
    opt = make_optimizer(m, cfg(lr=0.02, backbone_lr_mult=0.1), train_backbone=True)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.02)
    assert groups["backbone"]["lr"] == pytest.approx(0.002)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters()}  # every parameter, exactly once
    x, y = tiny_set()
    res = fit(m, x, y, cfg(epochs=1, lr=0.02, backbone_lr_mult=0.1, schedule="constant"))
    assert res.history[0]["lr"] == pytest.approx({"head": 0.02, "backbone": 0.002})


def test_early_stopping_restores_the_best_weights() -> None:
    x, y = tiny_set()
    wrong = (y + 1) % C  # validation labels that training can only get worse at
    c = cfg(epochs=6, patience=2, schedule="constant", lr=3e-2)
    m = tiny_model()
    res = fit(m, x, y, c, val=(x, wrong))
    assert len(res.history) < 6  # stopped early
    best = res.best_epoch
    assert res.best_val_acc == max(r["val_acc"] for r in res.history)
    assert len(res.history) == best + 1 + 2
    assert accuracy(m, x, wrong) == pytest.approx(res.best_val_acc)
    ref = tiny_model()  # the same run cut at the best epoch
    fit(ref, x, y, FitConfig(**{**c.to_dict(), "epochs": best + 1, "patience": None}))
    for k, v in ref.state_dict().items():
        assert torch.allclose(v.float(), m.state_dict()[k].float(), atol=1e-6), k


def test_soft_labels_and_sample_weights() -> None:
    x, y = tiny_set()
    soft = np.eye(C, dtype=np.float32)[y] * 0.9 + 0.1 / C
    m = tiny_model()
    res = fit(m, x, soft, cfg(lr=3e-2))
    assert res.history[-1]["loss"] < res.history[0]["loss"] and accuracy(m, x, y) > 0.6
    # weight 0 on every image of class 2 mislabelled as 0: the model learns class 2 anyway
    bad = y.copy()
    bad[y == 2] = 0
    xs = np.concatenate([x, x[y == 2]])
    ys = np.concatenate([bad, y[y == 2]])
    w = np.concatenate([np.where(y == 2, 0.0, 1.0), np.ones((y == 2).sum())])
    m = tiny_model()
    fit(m, xs, ys, cfg(lr=3e-2, epochs=8), sample_weight=w)
    assert accuracy(m, x[y == 2], y[y == 2]) > 0.8


def test_mc_dropout_varies_and_is_reproducible() -> None:
    x, _ = tiny_set()
    m = tiny_model(dropout=0.5)
    stats = params(m.backbone)
    p = predict_proba(m, x, mc_samples=4, seed=3)
    assert p.shape == (4, len(x), C) and p.dtype == np.float32
    assert np.allclose(p.sum(-1), 1, atol=1e-5)
    assert not np.allclose(p[0], p[1])
    assert np.array_equal(p, predict_proba(m, x, mc_samples=4, seed=3))
    plain = predict_proba(m, x)
    assert plain.shape == (len(x), C) and np.array_equal(plain, predict_proba(m, x))
    assert all(torch.equal(stats[k], v) for k, v in m.backbone.state_dict().items())
    with pytest.raises(ValueError, match="dropout"):
        predict_proba(tiny_model(), x, mc_samples=2)


def test_embed_and_default_model() -> None:
    x, _ = tiny_set()
    assert embed(tiny_model(), x).shape == (len(x), 16)
    m = fmnist_classifier(width=4)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and m.feature_dim == 16


def test_augmentation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = fmnist_augment(x, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # 2 px shifts keep the square
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4
    again = fmnist_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(flip_translate(x, gen, pad=0, flip=False), x)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "finetune"}, "mode"),
        ({"mode": "two-stage", "head_epochs": 0}, "head_epochs"),
        ({"mode": "two-stage", "head_epochs": 6, "epochs": 6}, "head_epochs"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"patience": 0}, "patience"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"optimizer": "lion"}, "optimizer"),
    ],
)
def test_bad_configs(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_bad_inputs() -> None:
    x, y = tiny_set()
    m = tiny_model()
    c = cfg(epochs=1)
    with pytest.raises(ValueError, match="uint8"):
        fit(m, x.astype(np.float32), y, c)
    with pytest.raises(ValueError, match="targets"):
        fit(m, x, y[:-1], c)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        fit(m, x, y + 1, c)
    with pytest.raises(ValueError, match="soft labels"):
        fit(m, x, np.ones((len(y), C), np.float32), c)
    with pytest.raises(ValueError, match="sample_weight"):
        fit(m, x, y, c, sample_weight=-np.ones(len(y)))
    with pytest.raises(ValueError, match="val"):
        fit(m, x, y, c, val=(x, y[:-1]))
    with pytest.raises(ValueError, match="mc_samples"):
        predict_proba(m, x, mc_samples=-1)
    with pytest.raises(ValueError, match="dropout"):
        Classifier(SmallVGG(1, 4), 16, C, dropout=1.0)
    with pytest.raises(ValueError, match="features"):
        Classifier(SmallVGG(1, 4), 15, C)(torch.zeros(2, 1, SIZE, SIZE))


def test_export_and_register_into_a_running_server(tmp_path: Path) -> None:
    """Fine-tune, export the backbone to a model repository, register the classes on a real
    server, and classify training images through gRPC."""
    from server.client import ProtoserveClient
    from server.config import ServerConfig
    from server.grpc.app import build_server
    from training.data.pixels import png_bytes
    from training.finetune_export import export_finetuned, register_classes, served_accuracy

    x, y = tiny_set(6)
    pre = _fmnist_pre(SIZE)  # Fashion-MNIST's preprocess config at 12x12
    m = tiny_model()
    fit(m, x, y, cfg(lr=3e-2))
    folder = export_finetuned(
        m, tmp_path / "models" / "tiny", preprocess=pre, architecture="small_vgg 4", recipe="test"
    )
    assert folder.manifest.embedding_dim == 16
    server, port = build_server(
        ServerConfig(port=0, data_dir=tmp_path / "data", model_repo=tmp_path / "models", workers=2)
    )
    server.start()
    try:
        with ProtoserveClient(f"127.0.0.1:{port}") as client:
            out = register_classes(client, "tiny", "tiny", x, y, ["a", "b", "c"])
            assert sorted(out) == ["a", "b", "c"]
            served = client.classify("tiny", [png_bytes(im) for im in x], top_k=1)
            served_acc = served_accuracy(client, "tiny", x, [["a", "b", "c"][i] for i in y], 5)
    finally:
        server.stop(grace=2)
    # the server ranks by cosine to each class's mean embedding: the same, computed here
    f = embed(m, x)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    protos = np.stack([f[y == c].mean(0) for c in range(C)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    local = (f @ protos.T).argmax(1)
    assert [r.top.label for r in served] == [["a", "b", "c"][i] for i in local]
    assert (local == y).mean() > 0.5 and served_acc == pytest.approx((local == y).mean())


def _fmnist_pre(size: int) -> dict[str, Any]:
    return {
        "size": [size, size],
        "resize": "squash",
        "crop": "none",
        "interpolation": "bilinear",
        "mean": [0.0],
        "std": [1.0],
        "channels": "L",
        "invert": False,
        "fill": 0,
    }


def test_backbone_from_our_own_checkpoint(tmp_path: Path) -> None:
    from training.finetune_export import load_backbone

    src = SmallVGG(1, 4)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    got = load_backbone("small_vgg", tmp_path / "backbone.pt", width=4)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg99")


def test_cli_fine_tunes_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from training.data.fashion_mnist import DEFAULT_ROOT
    from training.finetune_cli import main

    if not DEFAULT_ROOT.is_dir():
        pytest.skip(f"no Fashion-MNIST at {DEFAULT_ROOT}")
    src = SmallVGG(1, 4)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    argv = ["--option", "width=4", "--checkpoint", str(tmp_path / "backbone.pt")]
    argv += ["--epochs", "2", "--head-epochs", "1", "--steps-per-epoch", "3"]
    assert main([*argv, "--export", str(tmp_path / "m")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["val_acc"] <= 1 and 0 <= out["test_acc"] <= 1 and out["best_epoch"] in (0, 1)
    assert (tmp_path / "m" / "image" / "1" / "model.onnx").is_file()
