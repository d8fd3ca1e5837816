"""Export an open_clip model and serve it: parity with open_clip's own torch path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from server.cli import main as cli_main  # noqa: E402
from server.model_repo import load_model  # noqa: E402
from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime  # noqa: E402
from server.runtimes.torch_rt import TorchRuntime  # noqa: E402
from training.export import ExportError, export_open_clip  # noqa: E402

TINY = "protoserve-tiny-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TEXTS = ["a photo of a cat.", "", "Ünïcödé 汉字 🐈‍⬛", "a drawing of the letter A " * 10]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_arch: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("repo") / "tiny"
    return export_open_clip(tiny_arch, out, checkpoint=tiny_checkpoint)


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (32, 32), (17, 64), (100, 80), (31, 33)]
    return [
        Image.fromarray(rng.integers(0, 255, (*sizes[i % 5][::-1], 3), dtype=np.uint8))
        for i in range(n)
    ]


def test_folder_is_complete(exported) -> None:
    m = exported.manifest
    assert set(m.towers) == {"image", "text"} and m.embedding_dim == 32
    assert m.provenance.source == "open_clip" and m.provenance.architecture == TINY
    assert m.provenance.checkpoint and m.provenance.exported_at
    assert m.tokenizer is not None and m.tokenizer.context_length == 77
    for tower in ("image", "text"):
        cfg = (exported.path / tower / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in cfg and "dynamic_batching" in cfg
    assert load_model(exported.path).manifest == m


def test_served_embeddings_match_open_clip(exported, tiny_arch: str, tiny_checkpoint: Path) -> None:
    from server.imaging import PreprocessConfig, Preprocessor

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_arch, pretrained=None)
    open_clip.load_checkpoint(model, str(tiny_checkpoint))
    model.eval()
    imgs = images(6)
    with torch.inference_mode():
        ref_img = model.encode_image(torch.stack([preprocess(i) for i in imgs])).numpy()
        ref_txt = model.encode_text(open_clip.tokenize(TEXTS)).numpy()
    rt = OnnxRuntime(exported, OnnxConfig(intra_op_threads=1))
    pre = Preprocessor(PreprocessConfig.from_dict(exported.manifest.preprocess))
    got_img = rt.encode_images(pre(imgs))
    got_txt = rt.encode_texts(TEXTS)
    assert cosine(got_img, ref_img).min() >= 0.999
    assert cosine(got_txt, ref_txt).min() >= 0.999


def test_torch_runtime_matches_onnx(exported) -> None:
    ort_rt = OnnxRuntime(exported)
    torch_rt = TorchRuntime.from_model_folder(exported)
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert cosine(ort_rt.encode_images(pixels), torch_rt.encode_images(pixels)).min() >= 0.9999
    assert cosine(ort_rt.encode_texts(TEXTS), torch_rt.encode_texts(TEXTS)).min() >= 0.9999


def test_failed_parity_leaves_nothing(tiny_arch: str, tmp_path: Path) -> None:
    out = tmp_path / "broken"
    with pytest.raises(ExportError, match="parity check failed"):
        export_open_clip(tiny_arch, out, min_cosine=1.5)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(exported, tiny_arch: str) -> None:
    with pytest.raises(ExportError, match="exists"):
        export_open_clip(tiny_arch, exported.path)


def test_fp16_export(tiny_arch: str, tmp_path: Path) -> None:
    """fp16 weights with float32 I/O; an onnxruntime crash fails the export cleanly.

    onnxruntime 1.32's CPU provider segfaults on fp16 ViT graphs on this
    AVX512-FP16 machine; the parity check runs in a child process so the
    exporter reports it instead of dying, and leaves no folder behind.
    """
    import onnx

    out = tmp_path / "half"
    try:
        folder = export_open_clip(tiny_arch, out, fp16=True, min_cosine=0.999)
    except ExportError as e:
        assert "onnxruntime crashed" in str(e) or "onnxruntime failed" in str(e)
        assert not out.exists()
        return
    assert folder.manifest.towers["image"].precision == "fp16"
    weights = onnx.load(str(folder.tower_path("image"))).graph.initializer
    big = [w for w in weights if np.prod(w.dims) >= 64 * 64]
    assert big and all(w.data_type == onnx.TensorProto.FLOAT16 for w in big)


def test_int8_export(exported, tiny_arch: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """MatMul weights quantized to int8, float32 I/O, embeddings close to float32's."""
    import onnx

    folder = export_open_clip(tiny_arch, tmp_path / "q", checkpoint=tiny_checkpoint, int8=True)
    for tower in ("image", "text"):
        assert folder.manifest.towers[tower].precision == "int8"
        graph = onnx.load(str(folder.tower_path(tower))).graph
        assert any(n.op_type == "MatMulInteger" for n in graph.node), tower
        ints = [w for w in graph.initializer if w.data_type == onnx.TensorProto.INT8]
        assert ints, tower
    q_rt = OnnxRuntime(load_model(folder.path), OnnxConfig())
    f_rt = OnnxRuntime(load_model(exported.path), OnnxConfig())
    pixels = np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32)
    assert cosine(q_rt.encode_images(pixels), f_rt.encode_images(pixels)).min() >= 0.999
    assert cosine(q_rt.encode_texts(TEXTS), f_rt.encode_texts(TEXTS)).min() >= 0.999
    with pytest.raises(ExportError, match="fp16 or int8"):
        export_open_clip(tiny_arch, tmp_path / "both", fp16=True, int8=True)
    assert not (tmp_path / "both").exists()
    # a threshold no quantized model meets fails the export and leaves nothing behind
    with pytest.raises(ExportError, match="parity"):
        export_open_clip(tiny_arch, tmp_path / "strict", int8=True, min_cosine=1.0 + 1e-9)
    assert not (tmp_path / "strict").exists()


def test_cli_export(tiny_arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["export", "open-clip", "--arch", tiny_arch, "--out", str(tmp_path / "m")])
    assert rc == 0 and "exported" in capsys.readouterr().out
    assert load_model(tmp_path / "m").name == "m"


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, server.model_repo, server.runtimes.onnx_rt, server.kernels; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_vit_b_32_exports_with_parity(tmp_path: Path) -> None:
    folder = export_open_clip("ViT-B-32", tmp_path / "vit")
    assert folder.manifest.embedding_dim == 512
    assert folder.manifest.preprocess["size"] == [224, 224]


def test_zero_shot_class_embedding_matches_open_clip(
    exported, tiny_arch: str, tiny_checkpoint: Path
) -> None:
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from server.prompts import TEMPLATE_SETS, class_embedding

    model = open_clip.create_model(tiny_arch, pretrained=None)
    open_clip.load_checkpoint(model, str(tiny_checkpoint))
    templates = TEMPLATE_SETS["simple_imagenet"]
    ref = build_zero_shot_classifier(
        model.eval(),
        open_clip.get_tokenizer(tiny_arch),
        ["cat", "omniglot character"],
        [lambda c, t=t: t.format(c) for t in templates],
        use_tqdm=False,
    ).numpy()
    rt = OnnxRuntime(exported)
    ours = np.stack([class_embedding(rt, c, templates) for c in ["cat", "omniglot character"]])
    assert cosine(ours, ref.T).min() >= 0.999
