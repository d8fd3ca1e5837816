"""TritonRuntime against a real tritonserver (the ``tritonserver`` fixture) on a tiny model.

The model is built here with torch: an image tower [N, 3, 32, 32] -> [N, 16] and a text
tower int64 [N, 77] -> [N, 16], exported to ONNX into a protoserve model folder. Triton runs
each tower with onnxruntime inside its python backend; the reference is onnxruntime
in-process on the same inputs.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from server.model_repo import (
    Manifest,
    ModelFolder,
    Provenance,
    Scoring,
    TokenizerSpec,
    TowerSpec,
    load_model,
    sha256_file,
    triton_config,
)
from server.runtimes.base import RuntimeError_

DIM, SIZE, CONTEXT, VOCAB, MAX_BATCH = 16, 32, 77, 49408, 4
HAVE_TOKENIZER = importlib.util.find_spec("server.tokenizer") is not None
TEXTS = ["a photo of a cat", "a dog", "", "an airplane over the sea", "🙂 unicode", "x " * 100]


def _export(module: object, example: object, path: Path, input_name: str) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and fine here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=["embeddings"],
            dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip


def build_tiny_model(folder: Path) -> ModelFolder:
    """A protoserve model folder with both towers and the CLIP vocabulary (or a stand-in)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    image = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, DIM),
    ).eval()  # fmt: skip

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.proj = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.proj(self.embed(tokens).mean(dim=1))

    with torch.no_grad():
        _export(image, torch.zeros(2, 3, SIZE, SIZE), folder / "image/1/model.onnx", "pixels")
        tokens = torch.zeros(2, CONTEXT, dtype=torch.int64)
        _export(Text().eval(), tokens, folder / "text/1/model.onnx", "tokens")
    vocab = folder / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    vocab.parent.mkdir()
    if HAVE_TOKENIZER:
        from server.tokenizer import default_vocab_path

        source = default_vocab_path()
        assert source is not None, "open_clip's vocabulary file is not installed"
        shutil.copyfile(source, vocab)
    else:
        vocab.write_bytes(b"stand-in: the text tests use their own tokenizer")
    for tower in ("image", "text"):
        (folder / tower / "config.pbtxt").write_text(
            triton_config(
                tower,
                channels=3,
                size=(SIZE, SIZE),
                context_length=CONTEXT,
                dim=DIM,
                max_batch_size=MAX_BATCH,
            )
        )
    manifest = Manifest(
        name="tiny",
        embedding_dim=DIM,
        towers={
            t: TowerSpec(
                onnx=f"{t}/1/model.onnx",
                sha256=sha256_file(folder / t / "1/model.onnx"),
                input="pixels" if t == "image" else "tokens",
            )
            for t in ("image", "text")
        },
        preprocess={"size": [SIZE, SIZE], "channels": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3},
        scoring=Scoring(),
        provenance=Provenance(source="test", architecture="tiny-conv-embedding"),
        tokenizer=TokenizerSpec(
            kind="clip-bpe",
            vocab="tokenizer/" + vocab.name,
            sha256=sha256_file(vocab),
            context_length=CONTEXT,
        ),
    )
    (folder / "protoserve.json").write_text(manifest.to_json())
    return load_model(folder)


def fake_tokenizer(texts: list[str]) -> np.ndarray:
    """Deterministic ids for the text tests when server.tokenizer is not there."""
    out = np.zeros((len(texts), CONTEXT), np.int64)
    for i, text in enumerate(texts):
        ids = [sum(map(ord, w)) % VOCAB for w in text.split()][:CONTEXT]
        out[i, : len(ids)] = ids
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def served(tritonserver, tiny: ModelFolder) -> dict[str, str]:
    return tritonserver.serve(tiny)


@pytest.fixture(scope="module")
def reference(tiny: ModelFolder):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {
        t: ort.InferenceSession(str(tiny.tower_path(t)), opts, providers=["CPUExecutionProvider"])
        for t in ("image", "text")
    }
    names = {"image": "pixels", "text": "tokens"}
    return lambda tower, x: sessions[tower].run(["embeddings"], {names[tower]: x})[0]


@pytest.fixture(scope="module")
def runtime(tritonserver, tiny: ModelFolder, served: dict[str, str]):
    from server.runtimes.triton_rt import TritonRuntime

    tokenizer = None if HAVE_TOKENIZER else fake_tokenizer
    with TritonRuntime(tritonserver.url, tiny, timeout_s=20, tokenizer=tokenizer) as rt:
        yield rt


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def request_count(url: str, model: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_stats"]["success"].get("count", 0))


def test_images_match_onnxruntime(runtime, reference) -> None:
    x = pixels(3)
    out = runtime.encode_images(x)
    assert out.dtype == np.float32 and out.shape == (3, DIM)
    np.testing.assert_allclose(out, reference("image", x), rtol=0, atol=1e-5)


def test_batch_of_one(runtime, reference) -> None:
    x = pixels(1, seed=1)
    np.testing.assert_allclose(runtime.encode_images(x), reference("image", x), rtol=0, atol=1e-5)


def test_batches_above_max_batch_size_are_split(runtime, reference, tritonserver, served) -> None:
    before = request_count(tritonserver.url, served["image"])
    x = pixels(2 * MAX_BATCH + 2, seed=2)
    np.testing.assert_allclose(runtime.encode_images(x), reference("image", x), rtol=0, atol=1e-5)
    assert request_count(tritonserver.url, served["image"]) - before == 3


def test_empty_batch_makes_no_request(runtime, tritonserver, served) -> None:
    before = request_count(tritonserver.url, served["image"])
    out = runtime.encode_images(np.zeros((0, 3, SIZE, SIZE), np.float32))
    assert out.shape == (0, DIM) and out.dtype == np.float32
    assert runtime.encode_texts([]).shape == (0, DIM)
    assert request_count(tritonserver.url, served["image"]) == before


def test_wrong_image_shape_is_refused_before_sending(runtime) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        runtime.encode_images(np.zeros((2, 3, 16, 16), np.float32))


def test_texts_match_onnxruntime(runtime, reference) -> None:
    if not HAVE_TOKENIZER:
        pytest.skip("server/tokenizer.py is not there yet: CLIP tokens cannot be made")
    from server.tokenizer import ClipTokenizer

    tokens = ClipTokenizer(runtime.model.vocab_path, CONTEXT)(TEXTS)
    assert runtime.has_text
    out = runtime.encode_texts(TEXTS)  # 6 texts: split as 4 + 2
    np.testing.assert_allclose(out, reference("text", tokens), rtol=0, atol=1e-5)


def test_text_tower_with_a_given_tokenizer(tritonserver, tiny, served, reference) -> None:
    from server.runtimes.triton_rt import TritonRuntime

    with TritonRuntime(tritonserver.url, tiny, tokenizer=fake_tokenizer) as rt:
        out = rt.encode_texts(TEXTS[:1])
    np.testing.assert_allclose(out, reference("text", fake_tokenizer(TEXTS[:1])), atol=1e-5)


def test_unknown_model_name_is_a_clear_error(tritonserver, tiny, served) -> None:
    from server.runtimes.triton_rt import TritonRuntime

    with pytest.raises(RuntimeError_) as info:
        TritonRuntime(tritonserver.url, tiny, image_model="nope__image")
    message = str(info.value)
    assert tritonserver.url in message and "'nope__image'" in message
    assert "image tower of tiny" in message and served["image"] in message


def test_server_not_running(tiny) -> None:
    from server.runtimes.triton_rt import TritonRuntime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError_, match=f"Triton at {url}: server not reachable"):
        TritonRuntime(url, tiny, timeout_s=3)
    assert time.monotonic() - t0 < 5


def test_model_error_reaches_the_caller(tritonserver, tiny, served) -> None:
    """A tower whose ONNX file does not fit its config: onnxruntime fails inside Triton."""
    from server.runtimes.triton_rt import TritonRuntime

    name = tritonserver.serve_tower(
        "mismatch__image", tiny.path / "image/config.pbtxt", tiny.tower_path("text")
    )
    with TritonRuntime(tritonserver.url, tiny, image_model=name, tokenizer=fake_tokenizer) as rt:
        with pytest.raises(RuntimeError_) as info:
            rt.encode_images(pixels(2))
    message = str(info.value)
    assert tritonserver.url in message and "'mismatch__image'" in message
    assert "onnxruntime failed" in message


def test_concurrent_calls(runtime, reference) -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(4):
                x = pixels(1 + (seed + i) % 6, seed=100 * seed + i)
                np.testing.assert_allclose(
                    runtime.encode_images(x), reference("image", x), rtol=0, atol=1e-5
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
