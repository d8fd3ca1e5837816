"""Meta-training: resuming equals an uninterrupted run; logs, curve and config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, build_method
from training.data import ImageSet, split_classes
from training.metatrain import CHECKPOINT, load_checkpoint, lr_lambda, metatrain


def tiny_config(**kw: object) -> TrainConfig:
    base = dict(
        size=16,
        n_way=4,
        k_shot=1,
        q_query=2,
        episodes=6,
        backbone_options={"hidden": 8},
        augment={"degrees": 10, "translate": 0.1, "stroke": 0.5},
        val_episodes=20,
        val_way=3,
        val_query=3,
        lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data(glyphs: ImageSet) -> tuple[ImageSet, ImageSet]:
    train, val = split_classes(glyphs, 0.25, seed=0)
    return train.with_rotations([0, 1, 2, 3]), val


@pytest.mark.parametrize(("method", "aux"), [("protonet", 0.0), ("maml", 0.0), ("protonet", 0.5)])
def test_resume_equals_uninterrupted(tmp_path: Path, data, method: str, aux: float) -> None:
    cfg = tiny_config(method=method, n_way=3, aux_weight=aux)  # MAML validates at 3 ways
    kw = {"progress": False, "data": data, "checkpoint_every": 2, "log_every": 1}
    straight = metatrain(cfg, tmp_path / "a", **kw)
    first = metatrain(cfg, tmp_path / "b", stop_after=3, **kw)
    assert first["step"] == 3
    resumed = metatrain(cfg, tmp_path / "b", **kw)
    assert resumed["step"] == straight["step"] == 6
    a = load_checkpoint(tmp_path / "a" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["loss"] for r in straight["train"]] == [r["loss"] for r in resumed["train"]]
    assert a["log"]["val"] == b["log"]["val"]
    assert a["sampler"] == b["sampler"] == {"seed": 0, "next": 6}
    if aux:
        for name, tensor in a["aux_head"].items():
            assert torch.equal(tensor, b["aux_head"][name]), name
    else:
        assert a["aux_head"] is None


def test_aux_classifier_learns_and_changes_only_training(tmp_path: Path, data) -> None:
    """The all-class classifier's loss falls, it is logged apart from the episode's loss, and
    the checkpoint's model (what is exported) has the same keys as without it."""
    cfg = tiny_config(episodes=60, aux_weight=1.0, augment={}, lr=1e-2)
    out = metatrain(cfg, tmp_path / "aux", progress=False, data=data, log_every=10)
    aux = [r["aux_loss"] for r in out["train"]]
    assert aux[-1] < 0.8 * aux[0], aux
    plain = metatrain(
        tiny_config(episodes=1), tmp_path / "plain", progress=False, data=data, log_every=1
    )
    assert "aux_loss" not in plain["train"][0]
    a = load_checkpoint(tmp_path / "aux" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "plain" / CHECKPOINT)
    assert a["model"].keys() == b["model"].keys()
    assert a["aux_head"]["weight"].shape == (data[0].num_classes, 8 * 1)  # hidden 8, 1x1 map


def test_checkpoint_from_before_a_new_config_field_resumes(tmp_path: Path, data) -> None:
    """A run checkpointed before ``aux_weight`` existed resumes: fields it lacks take their
    defaults before the configs are compared."""
    cfg = tiny_config()
    metatrain(cfg, tmp_path, stop_after=3, progress=False, data=data, checkpoint_every=3)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    del state["config"]["aux_weight"]
    torch.save(state, tmp_path / CHECKPOINT)
    assert metatrain(cfg, tmp_path, progress=False, data=data)["step"] == 6


def test_bf16_trains_and_keeps_float32_weights_and_distances(tmp_path: Path, data) -> None:
    """``precision="bf16"``: the loss falls as in float32, the checkpoint holds float32 weights
    (what export reads), the features reach the distance as float32 and stay close to the
    float32 pass, and the run resumes exactly."""
    cfg = tiny_config(episodes=60, augment={}, lr=1e-2, precision="bf16")
    kw = {"progress": False, "data": data, "log_every": 10}
    out = metatrain(cfg, tmp_path / "a", **kw)
    losses = [r["loss"] for r in out["train"]]
    assert losses[-1] < 0.6 * losses[0], losses
    state = load_checkpoint(tmp_path / "a" / CHECKPOINT)
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    method = build_method(cfg, data[0].num_channels, data[0].size)
    method.load_state_dict(state["model"])
    method.eval()
    x = data[1].normalise(data[1].batch(range(12), [0] * 12))
    full = method.embed(x)
    method.autocast_dtype = torch.bfloat16
    half = method.embed(x)
    assert half.dtype == torch.float32
    assert (half - full).norm() < 0.05 * full.norm()
    short = tiny_config(episodes=6, precision="bf16")
    kw = {**kw, "log_every": 1, "checkpoint_every": 2}
    straight = metatrain(short, tmp_path / "b", **kw)
    metatrain(short, tmp_path / "c", stop_after=3, **kw)
    resumed = metatrain(short, tmp_path / "c", **kw)
    assert [r["loss"] for r in straight["train"]] == [r["loss"] for r in resumed["train"]]


def test_aux_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="aux_weight must be >= 0"):
        TrainConfig(aux_weight=-1.0)
    with pytest.raises(ValueError, match="aux_weight is for protonet, not 'maml'"):
        TrainConfig(method="maml", aux_weight=0.5)


def test_precision_is_checked() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision 'bf16' is not for 'maml'"):
        TrainConfig(method="maml", precision="bf16")


def test_run_folder_contents(tmp_path: Path, data) -> None:
    cfg = tiny_config(val_every=2)
    out = metatrain(cfg, tmp_path, progress=False, data=data, command="protoserve train x")
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["config"] == cfg.to_dict() and log["command"] == "protoserve train x"
    assert [r["step"] for r in log["train"]] == [6]  # log_every=10 > 6 episodes: one line
    assert [v["step"] for v in log["val"]] == [2, 4, 6]
    assert all(0 <= v["acc"] <= 1 and v["n_way"] == 3 for v in log["val"])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert set(state) >= {
        "config",
        "step",
        "model",
        "optimizer",
        "scheduler",
        "sampler",
        "torch_rng",
        "log",
        "preprocess",
    }
    assert state["preprocess"] == data[0].preprocess and out["step"] == 6
    with pytest.raises(ValueError, match="another config"):
        metatrain(tiny_config(lr=1e-2), tmp_path, progress=False, data=data)


def test_lr_schedules() -> None:
    cos = lr_lambda(TrainConfig(episodes=100, warmup=10))
    assert cos(0) == pytest.approx(0.1) and cos(10) == 1.0 and cos(55) == pytest.approx(0.5)
    step = lr_lambda(TrainConfig(schedule="step", step_every=10, gamma=0.5))
    assert [step(i) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(TypeError):
        TrainConfig(augment={"blur": 1.0})


def test_device_names_are_checked() -> None:
    from training.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{max(1, torch.cuda.device_count())}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_cuda_training_resumes_on_cpu(tmp_path: Path, data, method: str) -> None:
    """A run trained on the GPU validates, checkpoints onto the CPU and resumes on the CPU;
    its losses track a CPU run of the same episodes (float rounding apart)."""
    cfg = tiny_config(method=method, n_way=3, val_every=2)
    kw = {"progress": False, "data": data, "checkpoint_every": 2, "log_every": 1}
    cpu = metatrain(cfg, tmp_path / "cpu", device="cpu", **kw)
    metatrain(cfg, tmp_path / "gpu", device="cuda", stop_after=3, **kw)
    gpu = metatrain(cfg, tmp_path / "gpu", device="cpu", **kw)
    assert gpu["step"] == 6 and len(gpu["val"]) == len(cpu["val"])
    state = load_checkpoint(tmp_path / "gpu" / CHECKPOINT)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    for a, b in zip(cpu["train"], gpu["train"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2, abs=2e-3)
