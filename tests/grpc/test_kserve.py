"""The KServe v2 surface driven by the stock ``tritonclient.grpc`` (sync, aio, streaming)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.imaging import Preprocessor
from server.model_repo import ModelRepository
from tests.grpc.support import (
    MODEL,
    ROOT,
    RUN,
    Running,
    create,
    model_shape,
    needs_run,
    register,
)

pytestmark = needs_run

COLL = "run01"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(tmp_path_factory.mktemp("kserve") / "data")
    create(r.stub, COLL)
    for f in sorted((RUN / "training").glob("*.png")):
        register(r.stub, COLL, f.stem, f.read_bytes())
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(running: Running) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(f"127.0.0.1:{running.port}")
    yield c
    c.close()


def query_images() -> list[Path]:
    return sorted((RUN / "test").glob("*.png"))


def labels() -> list[str]:
    return [f.stem for f in sorted((RUN / "training").glob("*.png"))]


def bytes_input(images: list[bytes], shape2d: bool = False) -> tc.InferInput:
    arr = np.array(images, dtype=object)
    if shape2d:
        arr = arr.reshape(-1, 1)
    inp = tc.InferInput("IMAGE", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def status_of(e: InferenceServerException) -> str:
    return str(e.status())


def test_server_live_ready_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "protoserve"
    assert "classification" in meta["extensions"]


def test_model_ready_metadata_config(client: tc.InferenceServerClient) -> None:
    n = len(labels())
    assert client.is_model_ready(COLL)
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(COLL, as_json=True)
    assert meta["name"] == COLL and meta["versions"] == ["1"]
    outs = {o["name"]: o for o in meta["outputs"]}
    assert outs["SCORES"]["datatype"] == "FP32" and outs["SCORES"]["shape"] == ["-1", str(n)]
    assert outs["LABELS"]["datatype"] == "BYTES"
    ins = {i["name"]: i for i in meta["inputs"]}
    assert ins["IMAGE"]["datatype"] == "BYTES"
    height, width, dim = model_shape()
    assert ins["PIXELS"]["shape"] == ["-1", "1", str(height), str(width)]
    bmeta = client.get_model_metadata(MODEL, as_json=True)
    assert [o["name"] for o in bmeta["outputs"]] == ["EMBEDDINGS"]
    assert bmeta["outputs"][0]["shape"] == ["-1", str(dim)]
    cfg = client.get_model_config(COLL, as_json=True)["config"]
    assert cfg["name"] == COLL and {o["name"] for o in cfg["output"]} == {"SCORES", "LABELS"}
    bcfg = client.get_model_config(MODEL, as_json=True)["config"]
    assert bcfg["output"][0]["name"] == "EMBEDDINGS" and bcfg["output"][0]["dims"] == [str(dim)]


def test_infer_bytes_matches_classify(client: tc.InferenceServerClient, running: Running) -> None:
    tests = [t.read_bytes() for t in query_images()]
    ours = running.stub.Classify(pb.ClassifyRequest(collection=COLL, images=tests))
    for shape2d in (False, True):
        res = client.infer(COLL, [bytes_input(tests, shape2d)])
        scores = res.as_numpy("SCORES")
        labs = res.as_numpy("LABELS")
        assert scores is not None and labs is not None
        assert scores.dtype == np.float32 and scores.shape == (len(tests), len(labels()))
        assert [x.decode() for x in labs[0]] == labels()  # the collection's class order
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-4)
        top1 = [labels()[j] for j in scores.argmax(axis=1)]
        assert top1 == [r.predictions[0].label for r in ours.results]
        for i, r in enumerate(ours.results):
            j = labels().index(r.predictions[0].label)
            assert scores[i, j] == pytest.approx(r.predictions[0].probability, rel=1e-4)


def test_infer_requested_output_and_classification(client: tc.InferenceServerClient) -> None:
    tests = [t.read_bytes() for t in query_images()[:4]]
    full = client.infer(COLL, [bytes_input(tests)]).as_numpy("SCORES")
    assert full is not None
    k = 3
    res = client.infer(
        COLL, [bytes_input(tests)], outputs=[tc.InferRequestedOutput("SCORES", class_count=k)]
    )
    assert res.as_numpy("LABELS") is None  # only what was asked for
    cls = res.as_numpy("SCORES")
    assert cls is not None and cls.shape == (len(tests), k)
    for i, row in enumerate(cls):
        parsed = [x.decode().split(":", 2) for x in row]
        idx = [int(p[1]) for p in parsed]
        assert idx == list(np.argsort(-full[i], kind="stable")[:k])
        for score, j, label in parsed:
            assert float(score) == pytest.approx(float(full[i, int(j)]), abs=1e-6)
            assert label == labels()[int(j)]


def test_infer_fp32_pixels(client: tc.InferenceServerClient) -> None:
    pre = Preprocessor(ModelRepository(ROOT / "models").get(MODEL).manifest.preprocess)
    tests = [t.read_bytes() for t in query_images()[:5]]
    pixels = pre.preprocess_bytes(tests)
    inp = tc.InferInput("PIXELS", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    from_pixels = client.infer(COLL, [inp]).as_numpy("SCORES")
    from_bytes = client.infer(COLL, [bytes_input(tests)]).as_numpy("SCORES")
    assert from_pixels is not None and from_bytes is not None
    np.testing.assert_allclose(from_pixels, from_bytes, rtol=1e-5, atol=1e-6)


def test_backbone_embeddings_equal_embed(
    client: tc.InferenceServerClient, running: Running
) -> None:
    tests = [t.read_bytes() for t in query_images()[:3]]
    emb = client.infer(MODEL, [bytes_input(tests)]).as_numpy("EMBEDDINGS")
    ours = running.stub.Embed(pb.EmbedRequest(model=MODEL, images=tests))
    assert emb is not None and emb.shape == (3, ours.dim)
    want = np.array([e.values for e in ours.image_embeddings], np.float32)
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)


def test_unknown_model_and_bad_image(client: tc.InferenceServerClient) -> None:
    good = query_images()[0].read_bytes()
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-model", [bytes_input([good])])
    assert status_of(e.value) == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no-such-model' is not found" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert status_of(e.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer(COLL, [bytes_input([good, b"not an image"])])
    assert status_of(e.value) == "StatusCode.INVALID_ARGUMENT"
    assert "image 1" in e.value.message()
    res = client.infer(COLL, [bytes_input([good])])  # still serving
    assert res.as_numpy("SCORES") is not None
    stats = client.get_inference_statistics(COLL, as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["fail"]["count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 1


def test_aio_client(running: Running) -> None:
    tests = [t.read_bytes() for t in query_images()[:2]]

    async def go() -> Any:
        async with tc_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as c:
            assert await c.is_model_ready(COLL)
            return await c.infer(COLL, [bytes_input(tests)])

    res = asyncio.run(go())
    scores = res.as_numpy("SCORES")
    assert scores is not None and scores.shape == (2, len(labels()))


def test_stream_infer(client: tc.InferenceServerClient) -> None:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("no-such-model", [bytes_input([b"x"])], request_id="bad")
        client.async_stream_infer(
            COLL, [bytes_input([query_images()[0].read_bytes()])], request_id="good"
        )
        first, second = got.get(timeout=30), got.get(timeout=30)
    finally:
        client.stop_stream()
    assert first[0] is None and "unknown model" in first[1].message()
    result, error = second
    assert error is None and result.get_response().id == "good"
    scores = result.as_numpy("SCORES")
    assert scores is not None and scores.shape == (1, len(labels()))


def test_sync_client_async_infer(client: tc.InferenceServerClient) -> None:
    tests = [t.read_bytes() for t in query_images()[:3]]
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        COLL, [bytes_input(tests)], callback=lambda result, error: got.put((result, error))
    )
    result, error = got.get(timeout=30)
    assert error is None
    want = client.infer(COLL, [bytes_input(tests)]).as_numpy("SCORES")
    np.testing.assert_allclose(result.as_numpy("SCORES"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_repository_index(),
        lambda c: c.load_model(COLL),
        lambda c: c.unload_model(COLL),
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_log_settings(),
    ],
    ids=["repository-index", "load", "unload", "sysshm", "cudashm", "trace", "log"],
)
def test_other_rpcs_are_unimplemented(client: tc.InferenceServerClient, call: Any) -> None:
    with pytest.raises(InferenceServerException) as e:
        call(client)
    assert status_of(e.value) == "StatusCode.UNIMPLEMENTED"
    assert "does not implement" in e.value.message()
    assert client.is_server_live()  # and the server keeps serving
