"""Training checkpoints on disk: one ``torch.save``d dict per file, written atomically (a crash
mid-save leaves the previous checkpoint intact) and read back onto the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: str | Path, **state: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return dict(torch.load(path, map_location="cpu", weights_only=False))
