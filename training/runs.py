"""The original 20-way within-alphabet one-shot task (Lake et al. 2015), through the serving
path: decode + the model's preprocessing (``server.imaging``), ``OnnxRuntime``, and
``server.kernels.topk``. No torch.

A run folder holds ``training/*.png`` (one image per class), ``test/*.png`` (the items) and
``class_labels.txt`` (lines ``<run>/test/itemNN.png <run>/training/classMM.png``). Each
training image is registered as its own class of one image; each test item is assigned the
class of its best-scoring training image (ties go to the earlier file in sorted order); a
run's error is the percentage of items assigned a wrong class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS = "class_labels.txt"
Encoder = Callable[[list[bytes]], np.ndarray]


@dataclass(frozen=True)
class RunResult:
    name: str
    wrong: int
    total: int
    predictions: dict[str, str]  # test file name -> predicted training file name

    @property
    def error(self) -> float:
        """Percentage of test items classified wrongly."""
        return 100.0 * self.wrong / self.total


def is_run(path: Path) -> bool:
    return (path / "training").is_dir() and (path / "test").is_dir() and (path / LABELS).is_file()


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run folder, else its run subfolders in sorted order."""
    path = Path(path)
    if is_run(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run(p)) if path.is_dir() else []
    if not runs:
        raise FileNotFoundError(
            f"{path} is not a run folder (training/, test/, {LABELS}) and holds none"
        )
    return runs


def read_labels(run: Path) -> dict[str, str]:
    """test file name -> training file name of its true class, checked against the folder."""
    truth: dict[str, str] = {}
    for n, line in enumerate((run / LABELS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{run / LABELS}:{n}: expected '<test image> <training image>'")
        test, train = Path(parts[0]).name, Path(parts[1]).name
        if test in truth:
            raise ValueError(f"{run / LABELS}:{n}: {test} is labelled twice")
        if not (run / "training" / train).is_file():
            raise ValueError(f"{run / LABELS}:{n}: training/{train} does not exist")
        truth[test] = train
    tests = sorted(p.name for p in (run / "test").glob("*.png"))
    if sorted(truth) != tests:
        raise ValueError(f"{run}: {LABELS} labels {sorted(truth)}, test/ holds {tests}")
    return truth


def score_run(
    run: Path, encode: Encoder, metric: str, transductive: float | None = None
) -> RunResult:
    """``transductive``: the model's logit scale, to refine the 20 one-image prototypes with
    the run's test images first, as the server's ``transductive`` Classify option does."""
    from server import kernels

    truth = read_labels(run)
    train_files = sorted((run / "training").glob("*.png"))
    test_names = sorted(truth)
    train_emb = encode([p.read_bytes() for p in train_files])
    test_emb = encode([(run / "test" / t).read_bytes() for t in test_names])
    if transductive is not None:
        from server.transduction import refine_supports

        n = len(train_emb)
        train_emb = refine_supports(train_emb, np.arange(n), n, test_emb, metric, transductive)  # type: ignore[arg-type]
    _, idx = kernels.topk(test_emb, train_emb, 1, metric=metric)  # type: ignore[arg-type]
    predictions = {t: train_files[int(i)].name for t, i in zip(test_names, idx[:, 0], strict=True)}
    wrong = sum(predictions[t] != truth[t] for t in test_names)
    return RunResult(run.name, wrong, len(test_names), predictions)


def model_encoder(model_dir: str | Path, threads: int = 1) -> tuple[Encoder, str, float]:
    """(encode bytes -> embeddings, scoring metric, logit scale) for an exported model folder."""
    from server.imaging import Preprocessor
    from server.model_repo import load_model
    from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime

    model = load_model(model_dir)
    runtime = OnnxRuntime(model, OnnxConfig(intra_op_threads=threads))
    pre = Preprocessor(model.manifest.preprocess)

    def encode(blobs: list[bytes]) -> np.ndarray:
        return runtime.encode_images(pre.preprocess_bytes(blobs))

    return encode, model.manifest.scoring.metric, model.manifest.scoring.logit_scale


def eval_runs(
    model_dir: str | Path, runs: str | Path, threads: int = 1, transductive: bool = False
) -> list[RunResult]:
    """Every run's result; ``transductive`` scores as the server's option of that name."""
    encode, metric, scale = model_encoder(model_dir, threads)
    refine_with = scale if transductive else None
    return [score_run(run, encode, metric, refine_with) for run in find_runs(runs)]


def report(results: list[RunResult]) -> str:
    lines = [f"{r.name}: {r.error:.2f}% error ({r.wrong}/{r.total} wrong)" for r in results]
    mean = sum(r.error for r in results) / len(results)
    lines.append(f"mean error: {mean:.2f}% over {len(results)} run(s)")
    return "\n".join(lines)
