"""Tiny ONNX towers built with onnx.helper (no torch), for repository and runtime tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.model_repo import triton_config


def image_tower(path: Path, weight: np.ndarray, channels: int = 3) -> None:
    """pixels [N, C, H, W] -> mean over H, W -> [N, C] @ weight [C, D] -> embeddings."""
    d = weight.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["embeddings"]),
        ],
        "tiny_image",
        [
            helper.make_tensor_value_info(
                "pixels", TensorProto.FLOAT, ["batch", channels, None, None]
            )
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", d])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            numpy_helper.from_array(weight.astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def image_model_folder(root: Path, name: str = "tiny", dim: int = 4, size: int = 8) -> np.ndarray:
    """Writes an image-only model folder; returns the tower's weight [3, dim]."""
    from server.model_repo import Manifest, Provenance, Scoring, TowerSpec, sha256_file

    folder = root / name
    weight = np.arange(3 * dim, dtype=np.float32).reshape(3, dim) / 10 - 0.3
    image_tower(folder / "image/1/model.onnx", weight)
    (folder / "image/config.pbtxt").write_text(
        triton_config("image", channels=3, size=(size, size), context_length=0, dim=dim)
    )
    manifest = Manifest(
        name=name,
        embedding_dim=dim,
        towers={
            "image": TowerSpec(
                onnx="image/1/model.onnx",
                sha256=sha256_file(folder / "image/1/model.onnx"),
                input="pixels",
            )
        },
        preprocess={
            "size": [size, size],
            "resize": "shortest",
            "crop": "center",
            "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "channels": "RGB",
            "invert": False,
            "fill": 0,
        },
        scoring=Scoring(),
        provenance=Provenance(source="test", architecture="tiny-mean-matmul"),
    )
    (folder / "protoserve.json").write_text(manifest.to_json())
    return weight


def edit_manifest(folder: Path, **changes: object) -> None:
    data = json.loads((folder / "protoserve.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / "protoserve.json").write_text(json.dumps(data))
