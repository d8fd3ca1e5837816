"""A meta-training checkpoint -> a model folder the server loads (``training.export``).

Only the backbone is exported (the embedding the server scores). Its preprocessing is the
training data's, and its scoring metric the method's: ``l2`` for an L2 ProtoNet (the server
ranks by negative squared distance, exactly as the method classifies), ``cosine`` otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.checkpoint import load_checkpoint
from training.config import TrainConfig, build_method


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    shift_average: int = 0,
    rotate_average: float = 0.0,
    crop: str | None = None,
    ink_margin: float | None = None,
) -> Any:
    """``shift_average`` > 0 exports the backbone wrapped in ``ShiftAverage`` with that radius
    (the tower averages 9 shifted views of each image); ``rotate_average`` > 0 (degrees) also
    turns each image by -D, 0 and +D before shifting it (27 views). ``crop`` (``"none"`` or
    ``"ink"``, with ``ink_margin``) replaces the training data's crop in the served
    preprocessing: a test-time choice (default: as trained)."""
    from training.backbones.shift_average import ShiftAverage
    from training.export import ExportError, export_image_backbone

    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(state["config"])
    pre = served_preprocess(state["preprocess"], crop, ink_margin)
    in_channels = 1 if pre.get("channels") == "L" else 3
    method = build_method(cfg, in_channels, (int(pre["size"][0]), int(pre["size"][1])))
    method.load_state_dict(state["model"])
    method.eval()
    scale = 1.0 if method.metric == "l2" else float(method.log_scale.exp())
    recipe = state.get("command") or json.dumps(cfg.to_dict(), sort_keys=True)
    module, arch = method.backbone, f"{cfg.backbone} ({cfg.method}, {cfg.distance})"
    if pre.get("crop") != state["preprocess"].get("crop"):
        arch += f", served with crop {pre['crop']!r} (trained with {state['preprocess']['crop']!r})"
    if rotate_average and not shift_average:
        raise ExportError("rotate_average needs shift_average (the rotations are shifted too)")
    if shift_average:
        size = (int(pre["size"][0]), int(pre["size"][1]))
        angles = (-rotate_average, 0.0, rotate_average) if rotate_average else ()
        try:
            module = ShiftAverage(module, shift_average, angles, size).eval()
        except ValueError as e:  # a radius below 1 pixel
            raise ExportError(str(e)) from None
        arch += f", averaged over 3x3 shifts of +-{shift_average} px"
        if angles:
            arch += f" x turns of -{rotate_average:g}, 0, +{rotate_average:g} degrees"
    return export_image_backbone(
        module,
        out_dir,
        preprocess=pre,
        architecture=arch,
        recipe=recipe,
        name=name,
        metric=method.metric,
        logit_scale=scale,
        checkpoint=str(Path(checkpoint).name),
        overwrite=overwrite,
    )


def served_preprocess(
    trained: dict[str, Any], crop: str | None, ink_margin: float | None
) -> dict[str, Any]:
    """The training data's preprocessing with the crop replaced where asked (validated)."""
    from server.imaging import PreprocessConfig
    from training.export import ExportError

    if crop is None and ink_margin is None:
        return trained
    pre = dict(trained)
    if crop is not None:
        pre["crop"] = crop
    if ink_margin is not None:
        if pre.get("crop") != "ink":
            raise ExportError("ink_margin applies only with crop 'ink'")
        pre["ink_margin"] = ink_margin
    try:  # validated; the manifest form drops a margin that no longer applies
        return PreprocessConfig.from_dict(pre).to_dict()
    except ValueError as e:
        raise ExportError(str(e)) from None
