"""A subprocess server: SIGKILL mid registration burst, restart; many concurrent classifiers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from tests.grpc.support import RUN, Subprocess, create, needs_run, register, training_images

ROOT = Path(__file__).resolve().parents[2]
pytestmark = needs_run


def test_sigkill_mid_burst_keeps_every_acknowledged_support(tmp_path: Path) -> None:
    imgs = [p.read_bytes() for p in training_images()]
    first = Subprocess(tmp_path / "data")
    acked: dict[str, list[int]] = {}
    attempted: set[str] = set()
    lock = threading.Lock()
    enough = threading.Event()

    def client(t: int) -> None:
        channel, stub = first.stub()
        try:
            for j in range(10_000):
                label = f"t{t}-{j}"
                with lock:
                    attempted.add(label)
                try:
                    resp = register(stub, "burst", label, imgs[j % 20], imgs[(j + 1) % 20])
                except grpc.RpcError:
                    return  # the server is gone
                with lock:
                    acked[label] = list(resp.added_support_ids)
                    if len(acked) >= 40:
                        enough.set()
        finally:
            channel.close()

    try:
        channel, stub = first.stub()
        create(stub, "burst")
        channel.close()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, t) for t in range(6)]
            assert enough.wait(120), "the burst made no progress"
            first.kill()  # SIGKILL while registrations are in flight
            for f in futures:
                f.result(timeout=60)
    finally:
        first.kill()
    assert len(attempted) > len(acked)  # some registrations were cut off

    second = Subprocess(tmp_path / "data")
    try:
        channel, stub = second.stub()
        classes = stub.ListClasses(pb.ListClassesRequest(collection="burst")).classes
        present = {c.label: c for c in classes}
        for label, ids in acked.items():
            assert label in present, f"acknowledged class {label} lost"
            assert sorted(present[label].support_ids) == sorted(ids)
        for label, c in present.items():
            assert label in attempted
            assert c.image_supports == 2 and len(c.support_ids) == 2, f"{label} half-applied"
        coll = stub.GetCollection(pb.GetCollectionRequest(name="burst"))
        assert (coll.class_count, coll.support_count) == (len(present), 2 * len(present))
        # the restarted server still registers and classifies
        register(stub, "burst", "after", imgs[0])
        resp = stub.Classify(pb.ClassifyRequest(collection="burst", images=[imgs[0]]))
        assert resp.results[0].predictions[0].score == pytest.approx(0.0, abs=1e-3)
        channel.close()
    finally:
        second.terminate()


def test_many_concurrent_classifiers(tmp_path: Path) -> None:
    server = Subprocess(tmp_path / "data")
    try:
        channel, stub = server.stub()
        create(stub, "run01")
        for f in training_images():
            register(stub, "run01", f.stem, f.read_bytes())
        tests = [t.read_bytes() for t in sorted((RUN / "test").glob("*.png"))]
        request = pb.ClassifyRequest(collection="run01", images=tests)
        expected = [r.predictions[0].label for r in stub.Classify(request).results]
        channel.close()

        def client(i: int) -> list[list[str]]:
            ch, st = server.stub()
            try:
                out = []
                for k in range(4):
                    if (i + k) % 2:
                        results = st.Classify(request).results
                    else:
                        items = (pb.ClassifyItem(collection="run01", image=t) for t in tests)
                        results = list(st.ClassifyStream(items))
                    out.append([r.predictions[0].label for r in results])
                return out
            finally:
                ch.close()

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(client, range(16)))
        assert all(a == expected for per_client in answers for a in per_client)
    finally:
        server.terminate()
