"""Self-training with a noisy student (Xie, Luong, Hovy & Le, "Self-training with Noisy Student
improves ImageNet classification", CVPR 2020).

1. A teacher is trained on the labeled images (or given: a ``Classifier``, or any function
   ``uint8 [N, C, H, W] -> probabilities [N, K]``, e.g. ``server_teacher`` for a zero-shot CLIP
   collection on a protoserve server, so CLIP's pseudo-labels are distilled into a small net).
2. It pseudo-labels the unlabeled images: ``pseudo_label`` keeps the confident ones
   (``threshold``), balances classes (at most / at least ``n`` per class, most confident
   first, or reweighting so each class weighs the same) and gives hard labels or soft ones
   (the teacher's distribution, optionally sharpened by a temperature).
3. A student, equal or larger, is trained WITH noise (``training.noise``: RandAugment and
   Cutout on the inputs, dropout in the ``Classifier``) on labeled + pseudo-labeled images,
   through ``training.finetune.fit`` (the one training loop).
4. The student becomes the teacher (through ``make_teacher``: its softmax by default, or e.g.
   label propagation on its features, ``training.labelprop``); repeat ``iterations`` times.
   ``max_per_class`` may grow per iteration (a curriculum, as in Cascante-Bonilla et al.,
   "Curriculum Labeling", AAAI 2021): few, very confident pseudo-labels first, more later.

The pseudo-label step is made of pure numpy functions (``select_confident``,
``balance_weights``, ``sharpen``, ``pseudo_label``) so tests check them on hand-built arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from training.data.pixels import png_bytes

Teacher = Callable[[np.ndarray], np.ndarray]  # uint8 [N, C, H, W] -> probabilities [N, K]


# -- the pseudo-label step (pure numpy) ---------------------------------------------------------
def check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be [N, K] with K >= 2, got shape {p.shape}")
    if p.size and (not np.isfinite(p).all() or (p < 0).any()):
        raise ValueError("probabilities must be finite and non-negative")
    if p.size and not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("each row of probabilities must sum to 1")
    return p


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1 / T)`` renormalised per row (MixMatch's sharpening): ``T < 1`` sharpens,
    ``T = 1`` is the identity, ``T > 1`` flattens."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = check_probs(probs)
    logp = np.log(np.clip(p, 1e-30, None)) / temperature
    logp -= logp.max(1, keepdims=True)
    q = np.exp(logp) * (p > 0)
    return q / q.sum(1, keepdims=True)


def select_confident(
    probs: np.ndarray,
    threshold: float = 0.0,
    *,
    max_per_class: int | None = None,
    min_per_class: int = 0,
) -> np.ndarray:
    """Indices (ascending) of the rows to pseudo-label.

    Each row's class is its argmax (ties: the lowest class) and its confidence the max. Per
    class, rows are ranked by confidence (ties: lower index first); those with confidence >=
    ``threshold`` are kept, at most the first ``max_per_class``; a class with fewer than
    ``min_per_class`` kept rows is filled up with its next most confident rows, below the
    threshold. A class no row predicts stays empty.
    """
    p = check_probs(probs)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if max_per_class is not None and max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0 or None, got {max_per_class}")
    if min_per_class < 0:
        raise ValueError(f"min_per_class must be >= 0, got {min_per_class}")
    if max_per_class is not None and min_per_class > max_per_class:
        raise ValueError(f"min_per_class {min_per_class} > max_per_class {max_per_class}")
    label, conf = p.argmax(1), p.max(1)
    keep: list[np.ndarray] = []
    for c in range(p.shape[1]):
        rows = np.flatnonzero(label == c)
        ranked = rows[np.argsort(-conf[rows], kind="stable")]
        n = int((conf[ranked] >= threshold).sum())
        if max_per_class is not None:
            n = min(n, max_per_class)
        n = max(n, min(min_per_class, ranked.size))
        keep.append(ranked[:n])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def balance_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row weights giving every present class the same total weight, mean weight 1:
    ``w = n / (classes present * count of the row's class)``."""
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and not 0 <= y.min() <= y.max() < num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    counts = np.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    if not y.size:
        return np.zeros(0, dtype=np.float32)
    return (y.size / (present * counts[y])).astype(np.float32)


@dataclass(frozen=True)
class PseudoLabelConfig:
    """How ``pseudo_label`` turns teacher probabilities into training targets."""

    threshold: float = 0.0  # keep rows whose top probability is >= this
    max_per_class: int | None = None  # at most this many per predicted class, most confident
    min_per_class: int = 0  # at least this many per class (filled below the threshold)
    reweight: bool = False  # weight rows so that every class weighs the same in the loss
    soft: bool = False  # soft targets (teacher distribution) instead of the argmax
    temperature: float = 1.0  # soft targets: sharpen with p ** (1 / T)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_per_class is not None and self.max_per_class < 0:
            raise ValueError(f"max_per_class must be >= 0 or None, got {self.max_per_class}")
        if self.min_per_class < 0:
            raise ValueError(f"min_per_class must be >= 0, got {self.min_per_class}")


@dataclass
class PseudoLabels:
    index: np.ndarray  # int64 [M], rows of the unlabeled set kept (ascending)
    label: np.ndarray  # int64 [M], the teacher's argmax
    confidence: np.ndarray  # float32 [M], the teacher's top probability
    targets: np.ndarray  # int64 [M] (hard) or float32 [M, K] (soft)
    weight: np.ndarray  # float32 [M], loss weights (all 1 unless reweighting)

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.label, minlength=num_classes).tolist()


def pseudo_label(probs: np.ndarray, cfg: PseudoLabelConfig) -> PseudoLabels:
    """Selected rows, their hard or soft targets and loss weights (see ``PseudoLabelConfig``)."""
    p = check_probs(probs)
    idx = select_confident(
        p, cfg.threshold, max_per_class=cfg.max_per_class, min_per_class=cfg.min_per_class
    )
    label = p[idx].argmax(1).astype(np.int64)
    targets = sharpen(p[idx], cfg.temperature).astype(np.float32) if cfg.soft else label
    weight = balance_weights(label, p.shape[1]) if cfg.reweight else np.ones(idx.size, np.float32)
    return PseudoLabels(idx, label, p[idx].max(1).astype(np.float32), targets, weight)


# -- teachers ------------------------------------------------------------------------------------
def model_teacher(model: Any, *, flip_tta: bool = False, batch_size: int = 1024) -> Teacher:
    """A ``Classifier`` as a teacher (eval mode, no noise: Noisy Student's un-noised teacher).
    ``flip_tta`` averages the probabilities of each image and its mirror image."""
    from training.inference import predict_proba

    def teach(x: np.ndarray) -> np.ndarray:
        p = predict_proba(model, x, batch_size=batch_size)
        if flip_tta:
            p = (p + predict_proba(model, x[..., ::-1].copy(), batch_size=batch_size)) / 2
        return p

    return teach


def scores_to_probs(
    results: Sequence[Any], classes: Sequence[str], temperature: float | None = None
) -> np.ndarray:
    """Server ``ImageResult``s -> probabilities [N, len(classes)], columns in ``classes``
    order. ``temperature None``: the server's own softmax probabilities, renormalised over
    the classes it returned; else ``softmax(score / temperature)`` over those classes. A class
    missing from an image's predictions (beyond ``top_k``) gets probability 0."""
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 or None, got {temperature}")
    col = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(results), len(classes)), dtype=np.float64)
    for r, res in enumerate(results):
        logits = np.full(len(classes), -np.inf)
        for pred in res.predictions:
            if pred.label not in col:
                raise ValueError(f"server returned class {pred.label!r}, not among {classes}")
            if temperature is None:
                out[r, col[pred.label]] = pred.probability
            else:
                logits[col[pred.label]] = pred.score / temperature
        if temperature is not None:
            e = np.exp(logits - logits.max())
            out[r] = e / e.sum()
        elif out[r].sum() > 0:
            out[r] /= out[r].sum()
        else:
            raise ValueError(f"image {r}: the server returned no probabilities")
    return out.astype(np.float32)


def server_teacher(
    client: Any,
    collection: str,
    *,
    classes: Sequence[str] | None = None,
    temperature: float | None = None,
    batch_size: int = 64,
) -> Teacher:
    """A protoserve collection (e.g. zero-shot CLIP) as a teacher: images go through
    ``server.client.ProtoserveClient.classify`` as PNGs, all classes requested, and the
    per-class answers become probabilities (``scores_to_probs``). ``classes`` fixes the column
    order (default: the collection's classes as the server lists them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(classes) if classes is not None else None

    def teach(x: np.ndarray) -> np.ndarray:
        nonlocal names
        if names is None:
            names = [c.label for c in client.list_classes(collection)]
        if len(names) < 2:
            raise ValueError(f"collection {collection!r} needs >= 2 classes, has {names}")
        parts = []
        for i in range(0, len(x), batch_size):
            imgs = [png_bytes(im) for im in x[i : i + batch_size]]
            res = client.classify(collection, imgs, top_k=len(names))
            parts.append(scores_to_probs(res, names, temperature))
        return np.concatenate(parts) if parts else np.zeros((0, len(names)), np.float32)

    return teach


# -- the loop ------------------------------------------------------------------------------------
@dataclass
class SelfTrainConfig:
    """``iterations`` student generations. ``max_per_class``: per iteration (the last value
    repeats), overriding ``pseudo.max_per_class`` (a growing curriculum); empty: use
    ``pseudo``. ``labeled_repeat``: each labeled image appears this many times in a
    student's training set (100 labels among 50,000 pseudo-labels would vanish otherwise).
    ``warm_start``: the student starts from the teacher's weights (same architecture only)
    instead of from scratch as in the paper."""

    iterations: int = 3
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    max_per_class: tuple[int, ...] = ()
    labeled_repeat: int = 1
    flip_tta: bool = False
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.labeled_repeat < 0:
            raise ValueError(f"labeled_repeat must be >= 0, got {self.labeled_repeat}")
        if any(k < 0 for k in self.max_per_class):
            raise ValueError(f"max_per_class must be >= 0, got {self.max_per_class}")

    def pseudo_for(self, iteration: int) -> PseudoLabelConfig:
        """The pseudo-label config of iteration ``iteration`` (1-based)."""
        if not self.max_per_class:
            return self.pseudo
        k = self.max_per_class[min(iteration, len(self.max_per_class)) - 1]
        return replace(
            self.pseudo, max_per_class=k, min_per_class=min(self.pseudo.min_per_class, k)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    iteration: int  # 0: the teacher trained on the labels
    n_pseudo: int = 0
    per_class: list[int] = field(default_factory=list)
    mean_confidence: float | None = None
    best_val_acc: float | None = None
    best_epoch: int = -1
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfTrainResult:
    model: Any  # the last student (a Classifier), or None when iterations produced none
    generations: list[Generation]

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(g) for g in self.generations]


def _one_hot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((y.size, k), dtype=np.float32)
    out[np.arange(y.size), y] = 1.0
    return out


def student_set(
    x_lab: np.ndarray,
    y_lab: np.ndarray,
    x_unl: np.ndarray,
    pl: PseudoLabels,
    num_classes: int,
    labeled_repeat: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, targets, weights): the labeled images ``labeled_repeat`` times (weight 1,
    one-hot when the pseudo-labels are soft) followed by the pseudo-labeled ones."""
    xs = [x_lab] * labeled_repeat + [x_unl[pl.index]]
    soft = pl.targets.ndim == 2
    lab = _one_hot(y_lab, num_classes) if soft else np.asarray(y_lab, dtype=np.int64)
    ys = [lab] * labeled_repeat + [pl.targets]
    ws = [np.ones(len(y_lab), np.float32)] * labeled_repeat + [pl.weight]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def noisy_student(
    make_model: Callable[[int], Any],
    x_lab: np.ndarray,
    y_lab: np.ndarray,
    x_unl: np.ndarray,
    cfg: SelfTrainConfig,
    student_fit: Any,
    *,
    teacher: Any = None,
    teacher_fit: Any = None,
    noise: Callable[..., Any] | None = None,
    teacher_noise: Callable[..., Any] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    on_generation: Callable[[int, Any], dict[str, Any]] | None = None,
    on_pseudo_labels: Callable[[int, np.ndarray, PseudoLabels], dict[str, Any]] | None = None,
    make_teacher: Callable[[Any], Teacher] | None = None,
    log: Callable[[str], None] | None = None,
) -> SelfTrainResult:
    """Runs the loop; returns the last student and one ``Generation`` record per model.

    ``make_model(i)`` builds generation ``i``'s ``Classifier`` (``i = 0``: the teacher trained
    on the labels when ``teacher`` is None; a larger student may come with a larger ``i``).
    ``teacher``: None, a ``Classifier`` (already trained), or a ``Teacher`` function.
    ``student_fit``/``teacher_fit`` are ``FitConfig``s (``teacher_fit`` default: the same),
    ``noise``/``teacher_noise`` the augmentations they train with. ``val`` (labels for
    early stopping and model choice only) goes to ``fit``. ``on_generation(i, model)`` and
    ``on_pseudo_labels(i, teacher probabilities, PseudoLabels)`` may return extra numbers to
    record (e.g. a held-out accuracy, or the pseudo-labels' precision on validation images).
    ``make_teacher(model)`` turns each trained model into the next ``Teacher`` (default:
    ``model_teacher``; e.g. label propagation on the model's features, ``training.labelprop``).
    """
    from training.finetune import Classifier, fit

    y_lab = np.asarray(y_lab, dtype=np.int64)
    if len(x_lab) != y_lab.size:
        raise ValueError(f"{len(x_lab)} labeled images but {y_lab.size} labels")
    if len(x_unl) == 0:
        raise ValueError("self-training needs unlabeled images")
    say = log or (lambda _msg: None)
    gens: list[Generation] = []
    model: Any = None
    if teacher is None:
        t0, c0 = time.perf_counter(), time.process_time()
        model = make_model(0)
        res = fit(model, x_lab, y_lab, teacher_fit or student_fit, val=val, augment=teacher_noise)
        g = Generation(0, best_val_acc=res.best_val_acc, best_epoch=res.best_epoch)
        g.cpu_seconds, g.wall_seconds = time.process_time() - c0, time.perf_counter() - t0
        if on_generation is not None:
            g.extra = on_generation(0, model)
        gens.append(g)
        say(f"teacher: val {res.best_val_acc} {g.extra} cpu {g.cpu_seconds:.0f}s")
        teacher = model

    def as_teacher(m: Any) -> Teacher:
        if make_teacher is not None:
            return make_teacher(m)
        return model_teacher(m, flip_tta=cfg.flip_tta)

    teach: Teacher = as_teacher(teacher) if isinstance(teacher, Classifier) else teacher
    for it in range(1, cfg.iterations + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        probs = check_probs(teach(x_unl))
        if probs.shape[0] != len(x_unl):
            raise ValueError(f"teacher gave {probs.shape[0]} rows for {len(x_unl)} images")
        pl = pseudo_label(probs, cfg.pseudo_for(it))
        pseudo_extra = on_pseudo_labels(it, probs, pl) if on_pseudo_labels is not None else {}
        student = make_model(it)
        k = student.num_classes
        if probs.shape[1] != k:
            raise ValueError(f"teacher has {probs.shape[1]} classes, the student {k}")
        if cfg.warm_start and isinstance(teacher, Classifier):
            student.load_state_dict(teacher.state_dict())
        x, y, w = student_set(x_lab, y_lab, x_unl, pl, k, cfg.labeled_repeat)
        res = fit(student, x, y, student_fit, val=val, augment=noise, sample_weight=w)
        g = Generation(
            it,
            n_pseudo=int(pl.index.size),
            per_class=pl.per_class(k),
            mean_confidence=float(pl.confidence.mean()) if pl.index.size else None,
            best_val_acc=res.best_val_acc,
            best_epoch=res.best_epoch,
        )
        g.cpu_seconds, g.wall_seconds = time.process_time() - c0, time.perf_counter() - t0
        g.extra = dict(pseudo_extra)
        if on_generation is not None:
            g.extra.update(on_generation(it, student))
        gens.append(g)
        say(
            f"student {it}: {g.n_pseudo} pseudo-labels, val {res.best_val_acc} {g.extra} "
            f"cpu {g.cpu_seconds:.0f}s"
        )
        teacher, model = student, student
        teach = as_teacher(student)
    return SelfTrainResult(model, gens)
