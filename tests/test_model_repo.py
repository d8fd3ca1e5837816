"""Model folders: the loader accepts good ones and names what is wrong with bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.model_repo import ModelRepoError, ModelRepository, load_model
from server.runtimes.base import UnsupportedTower
from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime
from server.runtimes.run_batch import CANDIDATES
from tests.onnx_models import edit_manifest, image_model_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    image_model_folder(tmp_path)
    return tmp_path / "tiny"


def test_valid_folder_loads(folder: Path) -> None:
    model = load_model(folder)
    assert model.name == "tiny" and model.manifest.embedding_dim == 4
    assert not model.has_text and model.vocab_path is None
    assert model.tower_path("image").is_file()


def test_repository_lists_and_gets(tmp_path: Path) -> None:
    image_model_folder(tmp_path, "a")
    image_model_folder(tmp_path, "b")
    (tmp_path / "not-a-model").mkdir()
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["a", "b"]
    assert repo.get("a").name == "a"
    with pytest.raises(KeyError, match="no model 'c'"):
        repo.get("c")
    with pytest.raises(KeyError):
        repo.get("../a")
    with pytest.raises(ModelRepoError, match="not a directory"):
        ModelRepository(tmp_path / "missing")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "format 2 is not supported"),
        ({"embedding_dim": None}, "missing field 'embedding_dim'"),
        ({"embedding_dim": "4"}, "'embedding_dim' has the wrong type"),
        ({"embedding_dim": 0}, "embedding_dim must be positive"),
        ({"towers": {}}, "no image tower"),
        ({"towers": {"audio": {"onnx": "x", "sha256": "y"}}}, "no image tower"),
        ({"scoring": {"metric": "hamming"}}, "scoring.metric must be one of"),
        ({"provenance": None}, "missing field 'provenance'"),
        ({"preprocess": None}, "missing field 'preprocess'"),
    ],
)
def test_bad_manifest_fields_are_named(folder: Path, change: dict, message: str) -> None:
    edit_manifest(folder, **change)
    with pytest.raises(ModelRepoError, match=message):
        load_model(folder)


def test_unknown_tower_and_text_without_tokenizer(folder: Path) -> None:
    data = json.loads((folder / "protoserve.json").read_text())
    towers = data["towers"]
    edit_manifest(folder, towers={**towers, "audio": towers["image"]})
    with pytest.raises(ModelRepoError, match="unknown tower 'audio'"):
        load_model(folder)
    edit_manifest(folder, towers={**towers, "text": towers["image"]})
    with pytest.raises(ModelRepoError, match="missing field 'tokenizer'"):
        load_model(folder)


def test_missing_files_and_checksums(folder: Path) -> None:
    onnx = folder / "image/1/model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ModelRepoError, match="does not match its sha256"):
        load_model(folder)
    load_model(folder, verify_checksums=False)  # structure is still fine
    onnx.unlink()
    with pytest.raises(ModelRepoError, match="image tower file image/1/model.onnx is missing"):
        load_model(folder)


def test_missing_triton_config(folder: Path) -> None:
    (folder / "image/config.pbtxt").unlink()
    with pytest.raises(ModelRepoError, match="config.pbtxt is missing"):
        load_model(folder)


def test_paths_may_not_leave_the_folder(folder: Path) -> None:
    data = json.loads((folder / "protoserve.json").read_text())
    data["towers"]["image"]["onnx"] = "../../etc/passwd"
    (folder / "protoserve.json").write_text(json.dumps(data))
    with pytest.raises(ModelRepoError, match="leaves the model folder"):
        load_model(folder)


def test_not_json_and_not_a_folder(folder: Path, tmp_path: Path) -> None:
    (folder / "protoserve.json").write_text("{ nope")
    with pytest.raises(ModelRepoError, match="not valid JSON"):
        load_model(folder)
    with pytest.raises(ModelRepoError, match="no protoserve.json"):
        load_model(tmp_path / "empty")


def test_onnx_runtime_runs_the_tower(folder: Path) -> None:
    weight = image_model_folder(folder.parent, "tiny")
    rt = OnnxRuntime(load_model(folder), OnnxConfig(intra_op_threads=1))
    pixels = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    out = rt.encode_images(pixels)
    np.testing.assert_allclose(out, pixels.mean(axis=(2, 3)) @ weight, rtol=1e-5, atol=1e-6)
    assert rt.encode_images(np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[N, 3, 8, 8\]"):
        rt.encode_images(np.zeros((2, 3, 9, 8), np.float32))
    assert not rt.has_text
    with pytest.raises(UnsupportedTower, match="no text tower"):
        rt.encode_texts(["a cat"])
    assert rt.providers == ["CPUExecutionProvider"]
    rt.close()


def test_onnx_runtime_rejects_unavailable_providers(folder: Path) -> None:
    from server.runtimes.base import RuntimeError_

    with pytest.raises(RuntimeError_, match="not available in this onnxruntime build"):
        OnnxRuntime(load_model(folder), OnnxConfig(providers=("CUDAExecutionProvider",)))


class _CountingSession:
    """Wraps an onnxruntime session and records the rows of every run."""

    def __init__(self, session: object) -> None:
        self.session, self.rows = session, []  # type: list[int]

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.rows.append(next(iter(feed.values())).shape[0])
        return self.session.run(outputs, feed)  # type: ignore[attr-defined]


def test_onnx_runtime_runs_large_batches_in_slices(folder: Path) -> None:
    weight = image_model_folder(folder.parent, "tiny")
    pixels = np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32)
    rt = OnnxRuntime(load_model(folder), OnnxConfig(intra_op_threads=1, run_batch=4))
    counting = _CountingSession(rt._sessions["image"])
    rt._sessions["image"] = counting
    out = rt.encode_images(pixels)
    assert counting.rows == [4, 4, 2]
    np.testing.assert_allclose(out, pixels.mean(axis=(2, 3)) @ weight, rtol=1e-5, atol=1e-6)
    rt.encode_images(pixels[:4])
    assert counting.rows[3:] == [4]
    # the CPU provider alone: the image tower's slice is measured at load, one of CANDIDATES
    assert OnnxRuntime(load_model(folder)).run_batch in CANDIDATES
    with pytest.raises(ValueError, match="run_batch must be an integer >= 0"):
        OnnxConfig(run_batch=-1)
