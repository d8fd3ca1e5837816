"""The Embed RPC: image embeddings by collection or model, normalize, text-tower precondition."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from tests.grpc.support import MODEL, Running, create, needs_run, training_images

pytestmark = needs_run


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "data")
    yield r
    r.close()


def _rows(embs: object) -> np.ndarray:
    return np.array([list(e.values) for e in embs], np.float32)  # type: ignore[attr-defined]


def test_embed_images_by_model_and_by_collection(running: Running) -> None:
    stub = running.stub
    imgs = [p.read_bytes() for p in training_images()[:3]]
    by_model = stub.Embed(pb.EmbedRequest(model=MODEL, images=imgs))
    assert by_model.dim > 0 and len(by_model.image_embeddings) == 3
    assert not by_model.text_embeddings
    raw = _rows(by_model.image_embeddings)
    assert raw.shape == (3, by_model.dim) and np.all(np.isfinite(raw))

    create(stub)
    by_coll = stub.Embed(pb.EmbedRequest(collection="run01", images=imgs))
    np.testing.assert_allclose(_rows(by_coll.image_embeddings), raw, rtol=1e-5, atol=1e-5)

    unit = _rows(
        stub.Embed(pb.EmbedRequest(model=MODEL, images=imgs, normalize=True)).image_embeddings
    )
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, expected, rtol=1e-5, atol=1e-5)

    # the collection is unchanged by embedding and still registers
    stub.RegisterClass(
        pb.RegisterClassRequest(collection="run01", label="a", supports=[pb.Support(image=imgs[0])])
    )
    assert stub.GetCollection(pb.GetCollectionRequest(name="run01")).support_count == 1


def test_embed_errors(running: Running) -> None:
    stub = running.stub
    img = training_images()[0].read_bytes()
    cases = [
        (
            pb.EmbedRequest(model=MODEL, texts=["a cat"]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "text tower",
        ),
        (pb.EmbedRequest(model="nope", images=[img]), grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.EmbedRequest(collection="gone", images=[img]), grpc.StatusCode.NOT_FOUND, "gone"),
        (pb.EmbedRequest(images=[img]), grpc.StatusCode.INVALID_ARGUMENT, "collection or a model"),
        (pb.EmbedRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "nothing to embed"),
        (
            pb.EmbedRequest(model=MODEL, images=[img, b"junk"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image 1",
        ),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request)
        assert e.value.code() == code, request
        assert text in e.value.details()
    assert len(stub.Embed(pb.EmbedRequest(model=MODEL, images=[img])).image_embeddings) == 1
