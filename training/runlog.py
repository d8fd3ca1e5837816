"""Per-run record: ``log.json`` (config, training curve, validation results, timings) and
``curve.png`` (loss and accuracy against episodes; matplotlib, imported only here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, out_dir: str | Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.train: list[dict[str, float]] = []  # {"step", "loss", "acc", "seconds"}
        self.val: list[dict[str, float]] = []  # {"step", "acc", "ci95", ...}
        self.seconds = 0.0  # training wall time over all sessions of the run

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train, self.val = list(state["train"]), list(state["val"])
        self.seconds = float(state["seconds"])

    def write(self, **extra: Any) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "log.json"
        data = {"config": self.config, **self.state_dict(), **extra}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def plot(self) -> Path | None:
        """Writes curve.png; None (and no file) when there is nothing to plot yet."""
        if not self.train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.train]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(steps, [r["loss"] for r in self.train])
        ax_loss.set(xlabel="episode", ylabel="training loss", title="loss")
        ax_acc.plot(steps, [r["acc"] for r in self.train], label="train episodes")
        if self.val:
            ax_acc.errorbar(
                [r["step"] for r in self.val],
                [r["acc"] for r in self.val],
                yerr=[r["ci95"] for r in self.val],
                fmt="o-",
                label="validation",
            )
        ax_acc.set(xlabel="episode", ylabel="accuracy", title="accuracy")
        ax_acc.legend()
        fig.tight_layout()
        path = self.out_dir / "curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
