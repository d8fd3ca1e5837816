"""``protoserve train finetune`` and ``protoserve train experiment NAME`` hand their options to
the modules behind them (in-process, ``main(argv)``)."""

from __future__ import annotations

import pytest

from server.cli import main as protoserve
from training.cli import EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        protoserve(["train", "experiment", name, "--help"])
    assert e.value.code == 0
    assert f"training.experiments.{name.replace('-', '_')}" in capsys.readouterr().out


def test_finetune_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        protoserve(["train", "finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--mode" in out and "--export" in out


def test_unknown_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        protoserve(["train", "experiment", "no-such"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
