"""``server.client.ProtoserveClient`` against a real in-process server on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.client import (
    ClassInfo,
    Collection,
    ImageResult,
    ProtoserveClient,
    ProtoserveError,
    Registered,
)
from tests.grpc.support import MODEL, RUN, Running, model_shape, run01_error, truth

pytestmark = pytest.mark.skipif(not RUN.is_dir(), reason=f"no Omniglot sample run at {RUN}")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[ProtoserveClient]:
    running = Running(tmp_path / "data")
    try:
        with ProtoserveClient(f"127.0.0.1:{running.port}", timeout_s=60) as c:
            yield c
    finally:
        running.close()


def training() -> list[Path]:
    return sorted((RUN / "training").glob("*.png"))


def queries() -> list[Path]:
    return sorted((RUN / "test").glob("*.png"))


def error_rate(results: list[ImageResult], files: list[Path]) -> float:
    wanted = truth()
    wrong = sum(r.top.label != wanted[f.name] for r, f in zip(results, files, strict=True))
    return 100.0 * wrong / len(files)


def test_every_method(client: ProtoserveClient) -> None:
    coll = client.create_collection("run01", MODEL)
    assert isinstance(coll, Collection)
    assert (coll.name, coll.model, coll.method, coll.metric) == ("run01", MODEL, "prototype", "l2")
    assert (coll.class_count, coll.support_count, coll.threshold) == (0, 0, 0.0)
    other = client.create_collection("other", MODEL, method="knn", metric="cosine", threshold=0.5)
    assert (other.method, other.metric, other.threshold) == ("knn", "cosine", 0.5)
    assert [c.name for c in client.list_collections()] == ["other", "run01"]

    # images as paths (source recorded) and as bytes
    for i, f in enumerate(training()):
        reg = client.register("run01", f.stem, images=[f if i % 2 else f.read_bytes()])
        assert isinstance(reg, Registered)
        assert reg.class_info.label == f.stem and reg.class_info.image_supports == 1
        assert len(reg.added_support_ids) == 1
    got = client.get_collection("run01")
    assert (got.class_count, got.support_count) == (20, 20)

    classes = client.list_classes("run01")
    assert [c.label for c in classes] == [f"class{i:02d}" for i in range(1, 21)]
    info = client.get_class("run01", "class01")
    assert isinstance(info, ClassInfo) and len(info.support_ids) == 1

    files = queries()
    results = client.classify("run01", files, top_k=3)
    assert len(results) == 20 and all(len(r.predictions) == 3 for r in results)
    probs = [p.probability for p in results[0].predictions]
    assert probs == sorted(probs, reverse=True)
    assert results[0].margin == pytest.approx(probs[0] - probs[1], abs=1e-6)
    assert results[0].entropy >= 0 and not results[0].unknown
    assert error_rate(results, files) == run01_error()
    assert error_rate(client.classify("run01", files, method="knn"), files) == run01_error()

    streamed = list(client.classify_stream("run01", iter(files), top_k=2))
    assert [r.id for r in streamed] == [str(f) for f in files]
    assert [r.top.label for r in streamed] == [r.top.label for r in results]
    pairs = [(f"q{i}", f.read_bytes()) for i, f in enumerate(files[:3])]
    assert [r.id for r in client.classify_stream("run01", pairs)] == ["q0", "q1", "q2"]

    # a second support, then remove it again
    extra = client.register("run01", "class01", images=[files[0]])
    assert extra.class_info.image_supports == 2
    after = client.remove_support("run01", "class01", extra.added_support_ids[0])
    assert after.image_supports == 1 and after.support_ids == info.support_ids
    client.remove_class("run01", "class20")
    assert len(client.list_classes("run01")) == 19
    with pytest.raises(ProtoserveError) as e:
        client.get_class("run01", "class20")
    assert e.value.code == "NOT_FOUND"

    emb = client.embed(images=files[:2], collection="run01", normalize=True)
    dim = model_shape()[2]
    assert emb.dim == dim and len(emb.images) == 2 and emb.texts == []
    assert all(len(v) == dim for v in emb.images)
    assert sum(x * x for x in emb.images[0]) == pytest.approx(1.0, abs=1e-4)

    client.delete_collection("other")
    client.delete_collection("run01")
    assert client.list_collections() == []


def test_errors_are_protoserve_errors_with_the_servers_message(client: ProtoserveClient) -> None:
    with pytest.raises(ProtoserveError) as e:
        client.get_collection("nope")
    assert e.value.code == "NOT_FOUND" and "nope" in e.value.message
    client.create_collection("c", MODEL)
    with pytest.raises(ProtoserveError) as e:
        client.create_collection("c", MODEL)
    assert e.value.code == "ALREADY_EXISTS"
    with pytest.raises(ProtoserveError) as e:
        client.create_collection("d", MODEL, method="bogus")
    assert e.value.code == "INVALID_ARGUMENT" and "bogus" in e.value.message
    with pytest.raises(ProtoserveError) as e:
        client.register("c", "a", images=[b"not an image"])
    assert e.value.code == "INVALID_ARGUMENT" and "image 0" in e.value.message
    with pytest.raises(ProtoserveError) as e:
        client.register("c", "a", texts=["a photo of a cat"])
    assert e.value.code == "FAILED_PRECONDITION" and "text tower" in e.value.message
    with pytest.raises(ProtoserveError) as e:
        client.classify("c", [RUN / "missing.png"])
    assert e.value.code == "INVALID_ARGUMENT" and "missing.png" in e.value.message
    client.register("c", "a", images=[training()[0]])
    with pytest.raises(ProtoserveError) as e:
        list(client.classify_stream("c", [training()[0], b"junk"]))
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ProtoserveError) as e:
        list(client.classify_stream("nope", [training()[0]]))
    assert e.value.code == "NOT_FOUND"
    (r,) = client.classify("c", [training()[0]])  # still serving
    assert r.top.label == "a"


def test_server_not_running_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    with ProtoserveClient(target, timeout_s=10) as c:
        with pytest.raises(ProtoserveError) as e:
            c.list_collections()
        assert e.value.code == "UNAVAILABLE" and target in e.value.message
        with pytest.raises(ProtoserveError) as e:
            list(c.classify_stream("x", [b"x"]))
        assert e.value.code == "UNAVAILABLE" and target in e.value.message
