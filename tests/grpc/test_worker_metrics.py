"""The supervisor's /metrics: every worker's metrics merged under a ``worker`` label."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

from server.grpc.worker_metrics import WorkerMetrics
from tests.grpc.support import free_port


def worker(calls: int) -> tuple[int, object]:
    """A real metrics endpoint like a worker's, with ``calls`` Classify calls recorded."""
    reg = CollectorRegistry()
    c = Counter("protoserve_requests", "RPCs", ["rpc", "code"], registry=reg)
    h = Histogram("protoserve_request_latency_seconds", "latency", ["rpc"], registry=reg)
    for _ in range(calls):
        c.labels("Classify", "OK").inc()
        h.labels("Classify").observe(0.01)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
    return int(server.server_address[1]), server


def test_merges_workers_and_reports_the_missing_one() -> None:
    (p0, s0), (p1, s1) = worker(3), worker(5)
    dead = free_port()  # nothing listens here
    try:
        reg = CollectorRegistry()
        reg.register(WorkerMetrics(lambda: [(0, p0), (1, p1), (2, dead), (3, None)], lambda: 2))
        text = generate_latest(reg).decode()
    finally:
        for s in (s0, s1):
            s.shutdown()  # type: ignore[attr-defined]
            s.server_close()  # type: ignore[attr-defined]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    up = {s.labels["worker"]: s.value for s in families["protoserve_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}
    assert families["protoserve_worker_restarts"].samples[0].value == 2.0
    total = {
        s.labels["worker"]: s.value
        for s in families["protoserve_requests"].samples
        if s.name == "protoserve_requests_total"
    }
    assert total == {"0": 3.0, "1": 5.0}
    assert families["protoserve_requests"].type == "counter"
    counts = {
        s.labels["worker"]: s.value
        for s in families["protoserve_request_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"0": 3.0, "1": 5.0}
    assert text.count("# TYPE protoserve_request_latency_seconds histogram") == 1
