"""Every limit: its status code, a message naming it, and the server still answers afterwards."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from tests.grpc.support import (
    MODEL,
    Running,
    create,
    fails,
    needs_run,
    register,
    still_serving,
    training_images,
)

pytestmark = needs_run


@contextmanager
def _server(tmp_path: Path, **cfg: Any) -> Iterator[Running]:
    r = Running(tmp_path / "data", **cfg)
    try:
        create(r.stub)
        register(r.stub, "run01", "a", training_images()[0].read_bytes())
        yield r
    finally:
        r.close()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_message_size_images_per_request_and_pixels(tmp_path: Path) -> None:
    with _server(
        tmp_path, max_message_bytes=200_000, max_images_per_request=3, max_pixels=120 * 120
    ) as r:
        stub = r.stub
        img = training_images()[0].read_bytes()
        big = b"\0" * 300_000
        fails(
            lambda: stub.Classify(pb.ClassifyRequest(collection="run01", images=[big])),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        )
        still_serving(stub)
        fails(
            lambda: stub.Classify(pb.ClassifyRequest(collection="run01", images=[img] * 4)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "4 images",
            "max_images_per_request",
        )
        fails(
            lambda: stub.Embed(pb.EmbedRequest(model=MODEL, images=[img] * 4)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit is 3",
        )
        still_serving(stub)
        fails(
            lambda: stub.Classify(
                pb.ClassifyRequest(collection="run01", images=[img, _png(121, 120)])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image 1",
            "121x120",
        )
        fails(
            lambda: register(stub, "run01", "b", _png(200, 200)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image 0",
        )
        still_serving(stub)
        assert stub.Classify(pb.ClassifyRequest(collection="run01", images=[_png(120, 120)]))


def test_classes_per_collection(tmp_path: Path) -> None:
    with _server(tmp_path, max_classes_per_collection=2) as r:
        stub = r.stub
        imgs = [p.read_bytes() for p in training_images()[:3]]
        register(stub, "run01", "b", imgs[1])
        fails(
            lambda: register(stub, "run01", "c", imgs[2]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "'c'",
            "max_classes_per_collection",
            "limit is 2",
        )
        # adding supports to an existing class is still fine; nothing of 'c' was stored
        assert register(stub, "run01", "a", imgs[2]).class_info.image_supports == 2
        labels = [
            c.label for c in stub.ListClasses(pb.ListClassesRequest(collection="run01")).classes
        ]
        assert labels == ["a", "b"]
        still_serving(stub)


class _Held:
    """Wraps a runtime so that ``encode_images`` blocks until released."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_images(self, x: Any) -> Any:
        self.entered.set()
        assert self.release.wait(30)
        return self.inner.encode_images(x)


def test_queue_full_is_resource_exhausted(tmp_path: Path) -> None:
    # one model instance: while it is held, everything else must wait in the queue
    with _server(tmp_path, max_queue=2, max_batch_size=1, max_delay_ms=0, model_instances=1) as r:
        stub = r.stub
        img = training_images()[0].read_bytes()
        model = r.server.pipeline.model(MODEL)
        held = _Held(model.runtime)
        model.runtime = held
        try:
            first = stub.Classify.future(pb.ClassifyRequest(collection="run01", images=[img]))
            assert held.entered.wait(10)  # the one instance is busy with the first image
            queued = stub.Classify.future(pb.ClassifyRequest(collection="run01", images=[img] * 2))
            while model.batcher.stats().queue_depth < 2:  # the queue (2) is now full
                threading.Event().wait(0.01)
            fails(
                lambda: stub.Classify(pb.ClassifyRequest(collection="run01", images=[img])),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "queue full",
                "2 of 2",
            )
            assert model.batcher.stats().rejected == 1
        finally:
            held.release.set()
        assert first.result(timeout=30).results[0].predictions[0].label == "a"
        assert len(queued.result(timeout=30).results) == 2
        model.runtime = held.inner
        still_serving(stub)
