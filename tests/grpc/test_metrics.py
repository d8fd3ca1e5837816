"""Prometheus metrics scraped over HTTP on loopback from a running server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from tests.grpc.support import Running, create, free_port, needs_run, register, training_images

pytestmark = needs_run


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_endpoint(tmp_path: Path) -> None:
    r = Running(tmp_path / "data", metrics_port=free_port())
    try:
        assert r.server.metrics_port == r.cfg.metrics_port
        stub = r.stub
        create(stub)
        imgs = [p.read_bytes() for p in training_images()[:3]]
        for i, img in enumerate(imgs):
            register(stub, "run01", f"c{i}", img)
        stub.Classify(pb.ClassifyRequest(collection="run01", images=imgs))
        with pytest.raises(grpc.RpcError):
            stub.GetCollection(pb.GetCollectionRequest(name="nope"))

        m = _scrape(r.server.metrics_port)
        assert m[("protoserve_requests_total", (("code", "OK"), ("rpc", "RegisterClass")))] == 3
        assert m[("protoserve_requests_total", (("code", "OK"), ("rpc", "Classify")))] == 1
        key = ("protoserve_requests_total", (("code", "NOT_FOUND"), ("rpc", "GetCollection")))
        assert m[key] == 1
        lat = ("protoserve_request_latency_seconds_count", (("code", "OK"), ("rpc", "Classify")))
        assert m[lat] == 1
        assert m[("protoserve_collection_classes", (("collection", "run01"),))] == 3
        assert m[("protoserve_collection_supports", (("collection", "run01"),))] == 3
        model = (("model", "omniglot-protonet"),)
        assert m[("protoserve_batcher_queue_depth", model)] == 0
        assert m[("protoserve_batched_items_total", model)] == 6
        assert m[("protoserve_batch_size_count", model)] == m[("protoserve_batches_total", model)]
        assert m[("protoserve_batch_size_sum", model)] == 6
        inf = ("protoserve_batch_size_bucket", (("le", "+Inf"), ("model", "omniglot-protonet")))
        assert m[inf] == m[("protoserve_batches_total", model)]
        assert m[("protoserve_batcher_rejected_total", model)] == 0
    finally:
        r.close()


def test_metrics_off_by_default(tmp_path: Path) -> None:
    r = Running(tmp_path / "data")
    try:
        assert r.server.metrics_port is None
    finally:
        r.close()
