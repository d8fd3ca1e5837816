"""Where a fine-tuned ``Classifier`` (``training.finetune``) starts from and where it goes.

* ``load_backbone``: any ``create_backbone`` name (``small_vgg``, ``conv4``, ``resnet12``,
  ``open_clip:...``, ``timm:...``), optionally with weights from our own checkpoint: a plain
  state dict (``selfsup`` pre-training, ``torch.save(backbone.state_dict())``) or a
  meta-training checkpoint (``training.metatrain``: its method's backbone).
* ``export_finetuned``: the fine-tuned backbone into the model repository through
  ``training.export.export_image_backbone`` (ONNX, parity-checked), scored by cosine.
* ``register_classes``: the fine-tuned classes into a running server: one class per label
  whose supports are that label's images (PNG-encoded pixels), through
  ``server.client.ProtoserveClient``, into a collection on the exported model. The server then
  classifies by the fine-tuned embedding's class prototypes (Snell et al. 2017) rather than by
  the linear head, which never leaves training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data.pixels import png_bytes
from training.finetune import Classifier


def load_backbone(
    name: str, checkpoint: str | Path | None = None, in_channels: int = 1, **options: Any
) -> nn.Module:
    """``create_backbone(name, in_channels, **options)``, then ``checkpoint``'s weights."""
    from training.backbones import create_backbone

    if checkpoint is None:
        return create_backbone(name, in_channels, **options)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and "config" in state:  # meta-training
        from training.config import TrainConfig, build_method

        cfg = TrainConfig.from_dict(state["config"])
        pre = state["preprocess"]
        size = (int(pre["size"][0]), int(pre["size"][1]))
        method = build_method(cfg, 1 if pre.get("channels") == "L" else 3, size)
        method.load_state_dict(state["model"])
        backbone: nn.Module = method.backbone
        return backbone
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: neither a state dict nor a meta-training checkpoint")
    backbone = create_backbone(name, in_channels, **options)
    backbone.load_state_dict(state)
    return backbone


def export_finetuned(
    model: Classifier,
    out_dir: str | Path,
    *,
    preprocess: dict[str, Any],
    architecture: str,
    recipe: str,
    name: str | None = None,
    overwrite: bool = False,
) -> Any:
    """The fine-tuned backbone as a servable model folder (``ModelFolder``)."""
    from training.export import export_image_backbone

    model.eval()
    return export_image_backbone(
        model.backbone,
        out_dir,
        preprocess=preprocess,
        architecture=architecture,
        recipe=recipe,
        name=name,
        metric="cosine",
        overwrite=overwrite,
    )


def register_classes(
    client: Any,
    collection: str,
    model_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    create: bool = True,
    chunk: int = 200,
) -> dict[str, Any]:
    """Registers every class present in ``labels`` with its images as supports, in
    ``collection`` (created on ``model_name`` first when ``create``); returns the server's
    answer per class name. ``client`` is a ``server.client.ProtoserveClient``."""
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(class_names):
        raise ValueError(f"labels must index the {len(class_names)} class names")
    if create:
        client.create_collection(collection, model_name)
    out: dict[str, Any] = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        for start in range(0, members.size, chunk):  # the server caps images per request
            blobs = [png_bytes(images[i]) for i in members[start : start + chunk]]
            name = class_names[int(c)]
            out[name] = client.register(collection, name, images=blobs)
    return out


def served_accuracy(
    client: Any, collection: str, images: np.ndarray, labels: Sequence[str], batch: int = 250
) -> float:
    """Top-1 accuracy of the server's answers (``Classify``) against class names."""
    hits = 0
    for i in range(0, len(images), batch):
        res = client.classify(collection, [png_bytes(im) for im in images[i : i + batch]], top_k=1)
        hits += sum(r.top.label == want for r, want in zip(res, labels[i : i + batch], strict=True))
    return hits / max(1, len(images))


if __name__ == "__main__":  # the CLI lives in training.finetune_cli (protoserve train finetune)
    from training.finetune_cli import main

    raise SystemExit(main())
