"""The one-shot run format through the serving path, on fake runs whose answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.glyphs import true_labels, write_run
from training.cli import main
from training.data.omniglot import data_root, omniglot_preprocess
from training.runs import eval_runs, find_runs, read_labels


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose embedding is the preprocessed pixels themselves (784-d), scored by l2."""
    from training.export import export_image_backbone

    out = tmp_path_factory.mktemp("models") / "identity"
    export_image_backbone(
        torch.nn.Flatten(),
        out,
        preprocess=omniglot_preprocess(28),
        architecture="identity",
        recipe="test",
        metric="l2",
    )
    return out


def wrong_labels(n_wrong: int) -> list[int]:
    """The true answers with the first ``n_wrong`` items each labelled as the next one's."""
    truth = true_labels()
    return [truth[(i + 1) % 20] if i < n_wrong else truth[i] for i in range(20)]


def test_known_answer_scores_zero(tmp_path: Path, identity_model: Path) -> None:
    run = write_run(tmp_path / "run01")
    (result,) = eval_runs(identity_model, run)
    assert result.error == 0.0 and result.total == 20 and result.name == "run01"
    truth = read_labels(run)
    assert result.predictions == truth


@pytest.mark.parametrize("n_wrong", [1, 2, 5])
def test_permuted_labels_give_known_error(tmp_path: Path, identity_model: Path, n_wrong: int):
    run = write_run(tmp_path / "run07", labels=wrong_labels(n_wrong))
    (result,) = eval_runs(identity_model, run)
    assert result.wrong == n_wrong and result.error == pytest.approx(5.0 * n_wrong)


def test_folder_of_runs_and_cli(tmp_path: Path, identity_model: Path, capsys) -> None:
    write_run(tmp_path / "runs" / "run01")
    write_run(tmp_path / "runs" / "run02", labels=wrong_labels(3))
    (tmp_path / "runs" / "notes").mkdir()  # not a run: ignored
    assert [p.name for p in find_runs(tmp_path / "runs")] == ["run01", "run02"]
    assert (
        main(
            [
                "eval-runs",
                "--model",
                str(identity_model),
                "--runs",
                str(tmp_path / "runs"),
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run01: 0.00% error (0/20 wrong)"
    assert out[1] == "run02: 15.00% error (3/20 wrong)"
    assert out[2] == "mean error: 7.50% over 2 run(s)"
    assert json.loads(out[3]) == {"run01": 0.0, "run02": 15.0}


def test_eval_runs_needs_no_torch(tmp_path: Path, identity_model: Path) -> None:
    run = write_run(tmp_path / "run01")
    code = (
        "import sys\n"
        "from server.cli import main\n"
        f"assert main(['train', 'eval-runs', '--model', {str(identity_model)!r}, "
        f"'--runs', {str(run)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'eval-runs imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "mean error: 0.00%" in proc.stdout


def test_bad_run_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        find_runs(tmp_path)
    run = write_run(tmp_path / "run01")
    lines = (run / "class_labels.txt").read_text().splitlines()
    (run / "class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="test/ holds"):
        read_labels(run)
    (run / "class_labels.txt").write_text("run01/test/item01.png run01/training/class99.png\n")
    with pytest.raises(ValueError, match="class99.png does not exist"):
        read_labels(run)


def test_the_sample_run_parses() -> None:
    run = data_root() / "omniglot" / "sample_run" / "run01"
    if not run.is_dir():
        pytest.skip(f"no {run}")
    truth = read_labels(run)
    assert len(truth) == 20 and truth["item01.png"] == "class08.png"
