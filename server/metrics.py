"""Prometheus metrics on an HTTP port (``prometheus_client``), one registry per server.

* ``protoserve_requests_total{rpc, code}`` and ``protoserve_request_latency_seconds{rpc, code}``:
  recorded by ``server.grpc.interceptors.ErrorInterceptor`` for every RPC it sees.
* Read at scrape time from the pipeline: ``protoserve_batch_size{model}`` (a histogram of the
  dynamic batcher's batch sizes), ``protoserve_batcher_queue_depth{model}``,
  ``protoserve_batches_total`` / ``protoserve_batched_items_total`` /
  ``protoserve_batcher_rejected_total{model}``, and ``protoserve_collection_classes`` /
  ``protoserve_collection_supports{collection}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.pipeline import Pipeline

__all__ = ["BATCH_BUCKETS", "Metrics"]

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def rpc_name(method: str) -> str:
    """``/protoserve.v1.Protoserve/Classify`` -> ``Classify``."""
    return method.rsplit("/", 1)[-1] or method


class _PipelineCollector(Collector):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "protoserve_batcher_queue_depth", "Items waiting in a model's batcher", labels=["model"]
        )
        batches = CounterMetricFamily(
            "protoserve_batches", "Batches run by a model's batcher", labels=["model"]
        )
        items = CounterMetricFamily(
            "protoserve_batched_items", "Items run by a model's batcher", labels=["model"]
        )
        rejected = CounterMetricFamily(
            "protoserve_batcher_rejected",
            "Items refused because the batcher's queue was full",
            labels=["model"],
        )
        sizes = HistogramMetricFamily(
            "protoserve_batch_size", "Dynamic batcher batch sizes", labels=["model"]
        )
        for s in self.pipeline.batcher_stats():
            depth.add_metric([s.name], s.queue_depth)
            batches.add_metric([s.name], s.batches_run)
            items.add_metric([s.name], s.items_run)
            rejected.add_metric([s.name], s.rejected)
            buckets: list[tuple[str, float]] = []
            for bound in BATCH_BUCKETS:
                count = sum(n for size, n in s.batch_sizes.items() if size <= bound)
                buckets.append((str(float(bound)), count))
            buckets.append(("+Inf", sum(s.batch_sizes.values())))
            total = sum(size * n for size, n in s.batch_sizes.items())
            sizes.add_metric([s.name], buckets, total)
        yield from (depth, batches, items, rejected, sizes)

        classes = GaugeMetricFamily(
            "protoserve_collection_classes", "Classes in a collection", labels=["collection"]
        )
        supports = GaugeMetricFamily(
            "protoserve_collection_supports", "Supports in a collection", labels=["collection"]
        )
        registry = self.pipeline.registry
        for coll in registry.collections():
            try:
                index = registry.index(coll.name)
            except Exception:  # deleted since the listing
                continue
            classes.add_metric([coll.name], index.num_classes())
            supports.add_metric([coll.name], index.num_supports())
        yield from (classes, supports)


class Metrics:
    """The server's metrics; ``observe`` per RPC, ``start_http`` to expose them."""

    def __init__(self, pipeline: Pipeline | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "protoserve_requests",
            "RPCs handled, by RPC and gRPC status code",
            ["rpc", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "protoserve_request_latency_seconds",
            "RPC latency in seconds, by RPC and gRPC status code",
            ["rpc", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        if pipeline is not None:
            self.registry.register(_PipelineCollector(pipeline))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        rpc = rpc_name(method)
        self.requests.labels(rpc, code).inc()
        self.latency.labels(rpc, code).observe(seconds)

    def start_http(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (a daemon thread); returns the port bound."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
