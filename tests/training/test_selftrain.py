"""Self-training: the pseudo-label step on hand-built probabilities, the noise functions, a
protoserve collection as a teacher through a real server, and one short noisy-student loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.data.pixels import png_bytes  # noqa: E402
from training.finetune import Classifier, FitConfig  # noqa: E402
from training.inference import accuracy  # noqa: E402
from training.labelprop import knn_graph, label_propagation  # noqa: E402
from training.noise import OPS, Noise, apply_op, cutout, rand_augment, weak_augment  # noqa: E402
from training.selftrain import (  # noqa: E402
    PseudoLabelConfig,
    SelfTrainConfig,
    balance_weights,
    noisy_student,
    pseudo_label,
    scores_to_probs,
    select_confident,
    server_teacher,
    sharpen,
    student_set,
)

# rows 0-7; argmax classes 0,0,0,1,1,2,0,1; confidences .9,.6,.8,.7,.95,.5,.99,.4
P = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.60, 0.30, 0.10],
        [0.80, 0.10, 0.10],
        [0.20, 0.70, 0.10],
        [0.02, 0.95, 0.03],
        [0.25, 0.25, 0.50],
        [0.99, 0.00, 0.01],
        [0.30, 0.40, 0.30],
    ]
)


# -- selection ----------------------------------------------------------------------------------
def test_threshold_keeps_rows_at_or_above_it() -> None:
    assert select_confident(P, 0.8).tolist() == [0, 2, 4, 6]
    assert select_confident(P, 0.0).tolist() == list(range(8))
    assert select_confident(P, 1.0).tolist() == []


def test_at_most_n_per_class_keeps_the_most_confident() -> None:
    # class 0 ranked: 6 (.99), 0 (.9), 2 (.8), 1 (.6); class 1: 4, 3, 7; class 2: 5
    assert select_confident(P, 0.0, max_per_class=2).tolist() == [0, 3, 4, 5, 6]
    assert select_confident(P, 0.0, max_per_class=1).tolist() == [4, 5, 6]
    assert select_confident(P, 0.75, max_per_class=1).tolist() == [4, 6]


def test_at_least_n_per_class_fills_below_the_threshold() -> None:
    # threshold 0.9 keeps 6, 0 (class 0) and 4 (class 1); class 2 gets its best row, 5
    assert select_confident(P, 0.9, min_per_class=1).tolist() == [0, 4, 5, 6]
    # class 1 filled with 3 (.7), class 2 has only one row
    assert select_confident(P, 0.9, min_per_class=2).tolist() == [0, 3, 4, 5, 6]


def test_ties_go_to_the_lower_class_and_the_lower_index() -> None:
    p = np.array([[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]])
    assert select_confident(p, 0.0, max_per_class=2).tolist() == [0, 2]
    assert pseudo_label(p, PseudoLabelConfig()).label.tolist() == [0, 0, 0]


def test_balance_weights_give_each_class_the_same_total() -> None:
    w = balance_weights(np.array([0, 0, 0, 1, 2, 2]), 4)  # 3 classes present
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2, 1, 1])
    assert w.mean() == pytest.approx(1.0)
    assert balance_weights(np.array([], dtype=np.int64), 3).shape == (0,)


def test_pseudo_label_hard_reweighted() -> None:
    pl = pseudo_label(P, PseudoLabelConfig(threshold=0.65, reweight=True))
    assert pl.index.tolist() == [0, 2, 3, 4, 6]
    assert pl.label.tolist() == [0, 0, 1, 1, 0]
    assert pl.targets.tolist() == [0, 0, 1, 1, 0] and pl.targets.dtype == np.int64
    np.testing.assert_allclose(pl.confidence, [0.9, 0.8, 0.7, 0.95, 0.99], rtol=1e-6)
    np.testing.assert_allclose(pl.weight, [5 / 6, 5 / 6, 5 / 4, 5 / 4, 5 / 6], rtol=1e-6)
    assert pl.per_class(3) == [3, 2, 0]


def test_pseudo_label_soft_and_sharpened() -> None:
    soft = pseudo_label(P, PseudoLabelConfig(threshold=0.9, soft=True))
    assert soft.index.tolist() == [0, 4, 6]
    np.testing.assert_allclose(soft.targets, P[[0, 4, 6]], atol=1e-6)
    np.testing.assert_allclose(soft.weight, 1.0)
    sharp = pseudo_label(P, PseudoLabelConfig(threshold=0.9, soft=True, temperature=0.5))
    q = P[[0, 4, 6]] ** 2
    np.testing.assert_allclose(sharp.targets, q / q.sum(1, keepdims=True), atol=1e-6)
    # sharpening keeps the argmax and raises the top probability
    assert (sharp.targets.argmax(1) == soft.label).all()
    assert (sharp.targets.max(1) > soft.targets.max(1)).all()


def test_sharpen_limits() -> None:
    np.testing.assert_allclose(sharpen(P, 1.0), P, atol=1e-12)
    assert (sharpen(P[:5], 1e-3).max(1) > 0.999).all()
    np.testing.assert_allclose(sharpen(P[:1], 1e3), [[1 / 3] * 3], atol=1e-2)


def test_student_set_puts_labels_first_and_repeats_them() -> None:
    x_lab = np.zeros((2, 1, 4, 4), np.uint8)
    x_unl = np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    pl = pseudo_label(P, PseudoLabelConfig(threshold=0.9, soft=True))
    x, y, w = student_set(x_lab, np.array([2, 1]), x_unl, pl, 3, labeled_repeat=2)
    assert x.shape == (7, 1, 4, 4) and x[4:, 0, 0, 0].tolist() == [0, 4, 6]
    np.testing.assert_allclose(y[:4], [[0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
    assert w.tolist() == [1.0] * 7


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: select_confident(P, 1.5), "threshold"),
        (lambda: select_confident(P, 0.5, max_per_class=-1), "max_per_class"),
        (lambda: select_confident(P, 0.5, max_per_class=1, min_per_class=2), "min_per_class"),
        (lambda: select_confident(P[:, 0], 0.5), r"\[N, K\]"),
        (lambda: select_confident(P * 2, 0.5), "sum to 1"),
        (lambda: select_confident(-P, 0.5), "non-negative"),
        (lambda: sharpen(P, 0.0), "temperature"),
        (lambda: PseudoLabelConfig(temperature=-1), "temperature"),
        (lambda: PseudoLabelConfig(threshold=2), "threshold"),
        (lambda: balance_weights(np.array([0, 3]), 3), "labels"),
        (lambda: SelfTrainConfig(iterations=0), "iterations"),
        (lambda: SelfTrainConfig(max_per_class=(10, -1)), "max_per_class"),
        (lambda: scores_to_probs([], ["a", "b"], temperature=0), "temperature"),
        (lambda: Noise("loud"), "strength"),
        (lambda: Noise(magnitude=11), "magnitude"),
        (lambda: rand_augment(torch.zeros(1, 1, 4, 4), torch.Generator(), ops=("blur",)), "ops"),
        (lambda: rand_augment(torch.zeros(1, 4, 4), torch.Generator()), r"\[B, C, H, W\]"),
        (lambda: cutout(torch.zeros(1, 1, 4, 4), torch.Generator(), 2.0), "cutout"),
        (lambda: apply_op("rotate", torch.zeros(2, 1, 4, 4), torch.zeros(3)), "magnitude"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_schedule_grows_max_per_class_and_repeats_its_last_value() -> None:
    cfg = SelfTrainConfig(iterations=4, max_per_class=(10, 50), pseudo=PseudoLabelConfig(0.5))
    assert [cfg.pseudo_for(i).max_per_class for i in (1, 2, 3, 4)] == [10, 50, 50, 50]
    assert cfg.pseudo_for(1).threshold == 0.5


# -- noise --------------------------------------------------------------------------------------
def batch(seed: int = 0, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", OPS)
def test_every_op_keeps_shape_and_range(op: str) -> None:
    x = batch()
    m = torch.linspace(-1, 1, x.shape[0])
    y = apply_op(op, x, m)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    if op == "identity":
        assert torch.equal(y, x)


def test_zero_magnitude_geometry_is_the_identity_and_solarize_inverts() -> None:
    x = batch()
    zero = torch.zeros(x.shape[0])
    for op in ("rotate", "shear_x", "translate_y", "contrast", "brightness", "sharpness"):
        torch.testing.assert_close(apply_op(op, x, zero), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_op("solarize", x, torch.ones(x.shape[0])), 1 - x)


def test_equalize_spreads_a_narrow_histogram() -> None:
    x = torch.linspace(0.4, 0.5, 144).view(1, 1, 12, 12)
    y = apply_op("equalize", x, torch.zeros(1))
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0


@pytest.mark.parametrize(
    "noise",
    [
        Noise("weak"),
        Noise("strong"),
        Noise("strong", n_ops=3, magnitude=5, cutout_size=0.25),
        lambda x, g: cutout(x, g, 0.5),
        lambda x, g: weak_augment(x, g, shift=3),
    ],
)
def test_noise_is_reproducible_with_a_seed_and_keeps_shape_and_range(noise: object) -> None:
    x = batch()
    a = noise(x, torch.Generator().manual_seed(3))  # type: ignore[operator]
    b = noise(x, torch.Generator().manual_seed(3))  # type: ignore[operator]
    c = noise(x, torch.Generator().manual_seed(4))  # type: ignore[operator]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_noise_is_per_image() -> None:
    x = batch(n=1).expand(64, -1, -1, -1).contiguous()
    y = Noise("strong")(x, torch.Generator().manual_seed(0))
    assert len({tuple(im.flatten().tolist()) for im in y}) == 64


def test_cutout_zeroes_one_square_and_weak_shift_moves_pixels() -> None:
    x = torch.ones(8, 1, 10, 10)
    y = cutout(x, torch.Generator().manual_seed(0), 0.4)  # a 4x4 square, maybe overhanging
    zeros = (y == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 16)).all()
    one = torch.zeros(1, 1, 5, 5)
    one[0, 0, 2, 2] = 1.0
    moved = weak_augment(one.expand(32, -1, -1, -1), torch.Generator().manual_seed(0), shift=1)
    assert (moved.flatten(1).sum(1) == 1).all()  # the pixel stays inside the image
    assert len({int(m.flatten().argmax()) for m in moved}) > 3


# -- the loop on tiny synthetic data ------------------------------------------------------------
def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 8x8 images: a bright bar at the top, the middle or the bottom."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 1, 8, 8))
    for i, c in enumerate(y):
        row = 1 + 3 * c
        x[i, 0, row : row + 2, 1:7] += 150 + rng.integers(0, 40)
    return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)


def tiny_model(_: int) -> Classifier:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d((4, 1)),
        torch.nn.Flatten(),
    )
    return Classifier(net, 32, 3, dropout=0.1)


def test_noisy_student_beats_its_teacher_on_held_out_tiny_data() -> None:
    x_lab, y_lab = blobs(6, 0)
    x_unl, _ = blobs(400, 1)
    x_test, y_test = blobs(300, 2)
    fit_cfg = FitConfig(epochs=4, batch_size=32, lr=0.1, steps_per_epoch=8, seed=0)
    teacher_fit = FitConfig(epochs=2, batch_size=6, lr=0.1, steps_per_epoch=4, seed=0)
    seen: list[float] = []

    def held_out(_: int, model: Classifier) -> dict[str, float]:
        seen.append(accuracy(model, x_test, y_test))
        return {"held_out_acc": seen[-1]}

    cfg = SelfTrainConfig(
        iterations=2,
        pseudo=PseudoLabelConfig(threshold=0.0, reweight=True),
        max_per_class=(50, 130),
        labeled_repeat=4,
    )
    res = noisy_student(
        tiny_model,
        x_lab,
        y_lab,
        x_unl,
        cfg,
        fit_cfg,
        teacher_fit=teacher_fit,
        noise=lambda x, g: weak_augment(x, g, flip=False, shift=1),
        on_generation=held_out,
    )
    assert [g.iteration for g in res.generations] == [0, 1, 2]
    assert res.generations[1].n_pseudo <= 150 and res.generations[2].n_pseudo > 150
    assert res.generations[2].extra["held_out_acc"] == seen[2]
    assert seen[0] < 0.9 < seen[2], seen  # the student beats its teacher
    assert res.model is not None and accuracy(res.model, x_test, y_test) == seen[2]


def test_a_function_teacher_with_soft_labels() -> None:
    """A teacher given as a function (as ``server_teacher`` is) and soft targets."""
    x_lab, y_lab = blobs(6, 0)
    x_unl, y_unl = blobs(120, 1)
    calls: list[int] = []

    def oracle(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        p = np.full((len(x), 3), 0.1)
        p[np.arange(len(x)), y_unl[: len(x)]] = 0.8
        return p

    fit_cfg = FitConfig(epochs=3, batch_size=32, lr=0.1, steps_per_epoch=8, seed=0)
    cfg = SelfTrainConfig(iterations=1, pseudo=PseudoLabelConfig(soft=True, temperature=0.5))
    res = noisy_student(tiny_model, x_lab, y_lab, x_unl, cfg, fit_cfg, teacher=oracle)
    assert calls == [120] and [g.iteration for g in res.generations] == [1]
    assert res.generations[0].n_pseudo == 120
    x_test, y_test = blobs(200, 2)
    assert accuracy(res.model, x_test, y_test) > 0.9


def test_teacher_with_the_wrong_class_count_is_refused() -> None:
    x_lab, y_lab = blobs(6, 0)
    x_unl, _ = blobs(20, 1)
    fit_cfg = FitConfig(epochs=1, batch_size=8, steps_per_epoch=1)

    def two(x: np.ndarray) -> np.ndarray:
        return np.full((len(x), 2), 0.5)

    with pytest.raises(ValueError, match="classes"):
        noisy_student(tiny_model, x_lab, y_lab, x_unl, SelfTrainConfig(1), fit_cfg, teacher=two)


def test_make_teacher_turns_every_model_into_the_next_teacher() -> None:
    x_lab, y_lab = blobs(6, 0)
    x_unl, y_unl = blobs(60, 1)
    made: list[int] = []

    def oracle_for(model: Classifier) -> object:
        made.append(id(model))
        return lambda x: np.eye(3)[y_unl[: len(x)]] * 0.97 + 0.01

    fit_cfg = FitConfig(epochs=1, batch_size=16, lr=0.1, steps_per_epoch=2)
    res = noisy_student(
        tiny_model, x_lab, y_lab, x_unl, SelfTrainConfig(2), fit_cfg, make_teacher=oracle_for
    )
    assert len(made) == 3 and made[-1] == id(res.model)  # teacher, student 1, student 2
    assert res.generations[1].n_pseudo == 60


# -- label propagation --------------------------------------------------------------------------
def test_knn_graph_finds_the_nearest_other_points() -> None:
    f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    sims, idx = knn_graph(f, 1)
    assert idx[:, 0].tolist() == [1, 0, 3, 2]
    assert float(sims[0, 0]) == pytest.approx(0.9 / np.hypot(0.9, 0.1))


def test_label_propagation_spreads_one_label_along_each_cluster() -> None:
    # two arcs of 20 unit vectors, far apart in angle; one labeled point at each arc's end
    a = np.linspace(0.0, 0.5, 20)
    b = np.linspace(2.0, 2.5, 20)
    f = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([np.cos(b), np.sin(b)], 1)])
    p = label_propagation(f, np.array([0, 39]), np.array([1, 0]), 3, k=3, iters=50)
    assert p.shape == (40, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert p[:20].argmax(1).tolist() == [1] * 20 and p[20:].argmax(1).tolist() == [0] * 20
    assert (p[:, 2] == 0).all()  # a class nobody labeled gets nothing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must"),
        ({"alpha": 1.0}, "alpha"),
        ({"labeled": np.array([0, 50])}, "labeled indices"),
        ({"labels": np.array([0, 3])}, "labels must"),
    ],
)
def test_label_propagation_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"labeled": np.array([0, 1]), "labels": np.array([0, 1]), "k": 3}
    args.update(kwargs)
    f = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match=match):
        label_propagation(f, args.pop("labeled"), args.pop("labels"), 3, **args)  # type: ignore[arg-type]


# -- a protoserve collection as the teacher, through a real server --------------------------------
def test_server_teacher_turns_the_served_scores_into_probabilities(tmp_path: Path) -> None:
    from server.client import ProtoserveClient
    from server.config import ServerConfig
    from server.grpc.app import build_server
    from tests.grpc.support import MODEL, ROOT

    if not (ROOT / "models" / MODEL).is_dir():
        pytest.skip(f"no bundled model {MODEL}")
    cfg = ServerConfig(port=0, data_dir=tmp_path, model_repo=ROOT / "models", workers=2)
    server, port = build_server(cfg)
    server.start()
    try:
        with ProtoserveClient(f"127.0.0.1:{port}") as client:
            client.create_collection("bars", MODEL)
            x, y = blobs(30, 5)
            big = x.repeat(4, 2).repeat(4, 3)  # 32x32: the model resizes anyway
            names = ["top", "middle", "bottom"]
            for c, name in enumerate(names):
                client.register("bars", name, [png_bytes(im) for im in big[y == c][:3]])
            teach = server_teacher(client, "bars", classes=names, batch_size=7)
            p = teach(big)
            assert p.shape == (30, 3) and p.dtype == np.float32
            np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
            direct = client.classify("bars", [png_bytes(im) for im in big], top_k=3)
            for i, r in enumerate(direct):
                for pred in r.predictions:
                    assert p[i, names.index(pred.label)] == pytest.approx(pred.probability, 1e-4)
            assert (p.argmax(1) == y).mean() > 0.8  # prototypes of clear bars classify well
            # scores with a temperature: softmax(score / T), in the given column order
            t = server_teacher(client, "bars", classes=names[::-1], temperature=2.0)(big[:4])
            for i, r in enumerate(direct[:4]):
                s = np.array([next(q.score for q in r.predictions if q.label == n) for n in names])
                e = np.exp((s - s.max()) / 2.0)
                np.testing.assert_allclose(t[i], (e / e.sum())[::-1], atol=1e-5)
            # default columns: the collection's classes as listed
            listed = [c.label for c in client.list_classes("bars")]
            assert server_teacher(client, "bars")(big[:2]).shape == (2, len(listed))
    finally:
        server.stop(grace=5)
