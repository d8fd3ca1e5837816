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

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 [C, H, W] image (C = 1 or 3) as PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"need a uint8 [1|3, H, W] image, got {image.dtype} {image.shape}")
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "PNG")
    return buf.getvalue()


def register_classes(
    client: Any,
    collection: str,
    model_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    create: bool = True,
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
        blobs = [png_bytes(images[i]) for i in np.flatnonzero(labels == c)]
        out[class_names[int(c)]] = client.register(collection, class_names[int(c)], images=blobs)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Fine-tune on Fashion-MNIST's labeled split, report val/test accuracy, and optionally
    export the backbone (``--export``) and register the labeled classes (``--server``)."""
    import argparse
    import json
    import sys

    from training.data.fashion_mnist import load_fashion_mnist
    from training.data.semisup import semisup_split
    from training.finetune import MODES, FitConfig, accuracy, fit, fmnist_augment

    ap = argparse.ArgumentParser(prog="python -m training.finetune_export")
    ap.add_argument("--backbone", default="small_vgg", help="a create_backbone name")
    ap.add_argument("--option", action="append", default=[], help="backbone option k=v (int)")
    ap.add_argument("--checkpoint", default=None, help="state dict or meta-training checkpoint")
    ap.add_argument("--mode", choices=MODES, default="two-stage")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--head-epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr-mult", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder")
    ap.add_argument("--export", type=Path, default=None, help="model folder to write")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--server", default=None, help="host:port of a running protoserve")
    ap.add_argument("--collection", default="fmnist-finetuned")
    ap.add_argument(
        "--score-test", action="store_true", help="classify the test set through the server"
    )
    args = ap.parse_args(argv)
    if args.server and not args.export:
        ap.error("--server needs --export (the collection's model)")
    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    torch.set_num_threads(args.threads)
    kw = {"root": args.root} if args.root else {}
    train = load_fashion_mnist(split="train", **kw)
    test = load_fashion_mnist(split="test", **kw)
    split = semisup_split(train.labels, per_class=args.per_class, seed=args.seed)
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, args.checkpoint, 1, **options)
    model = Classifier.for_backbone(backbone, len(train.classes), (1, 28, 28), args.dropout)
    cfg = FitConfig(
        mode=args.mode,
        epochs=args.epochs,
        head_epochs=args.head_epochs if args.mode == "two-stage" else 0,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        seed=args.seed,
    )
    x, y = train.images[split.labeled], train.labels[split.labeled]
    val = (train.images[split.val], train.labels[split.val])
    res = fit(model, x, y, cfg, val=val, augment=fmnist_augment)
    summary = {
        "command": "python -m training.finetune_export "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "best_epoch": res.best_epoch,
        "val_acc": res.best_val_acc,
        "test_acc": accuracy(model, test.images, test.labels),
        "cpu_seconds": res.cpu_seconds,
    }
    if args.export is not None:
        folder = export_finetuned(
            model,
            args.export,
            preprocess=train.preprocess,
            architecture=f"{args.backbone} {options or ''}".strip(),
            recipe=summary["command"],
            overwrite=args.overwrite,
        )
        summary["exported"] = str(folder.path)
    if args.server:
        from server.client import ProtoserveClient

        with ProtoserveClient(args.server) as client:
            done = register_classes(client, args.collection, folder.name, x, y, train.classes)
            summary["registered"] = sorted(done)
            if args.score_test:
                names = [test.classes[i] for i in test.labels]
                summary["served_test_acc"] = served_accuracy(
                    client, args.collection, test.images, names
                )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
