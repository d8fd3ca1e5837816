"""The /metrics of a multi-process server: every worker's metrics, labelled ``worker``.

Each worker process serves its own metrics on a loopback port only the supervisor knows; the
supervisor's ``/metrics`` (``--metrics-port``) scrapes them all at scrape time and re-emits
each sample with a ``worker="N"`` label, so that ``sum without (worker) (...)`` gives the
server's totals and a slow worker stays visible. ``protoserve_worker_up{worker}`` is 1 for a
worker that answered, 0 for one that did not (starting, restarting, or stuck), and
``protoserve_worker_restarts_total`` counts the workers the supervisor had to restart.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["WorkerMetrics"]

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0


class WorkerMetrics(Collector):
    """Collects from ``workers()``: ``(index, metrics port or None)`` of each worker."""

    def __init__(
        self, workers: Callable[[], list[tuple[int, int | None]]], restarts: Callable[[], int]
    ) -> None:
        self._workers = workers
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "protoserve_worker_up",
            "1 if the worker process answered this scrape",
            labels=["worker"],
        )
        for index, port in self._workers():
            text = None if port is None else _scrape(port)
            up.add_metric([str(index)], 0.0 if text is None else 1.0)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for s in family.samples:
                    labels = {**s.labels, "worker": str(index)}
                    out.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
        yield up
        restarts = CounterMetricFamily(
            "protoserve_worker_restarts", "Worker processes restarted after they died"
        )
        restarts.add_metric([], float(self._restarts()))
        yield restarts
        yield from merged.values()


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S
        ) as r:
            return str(r.read().decode())
    except OSError as e:
        log.warning("worker metrics on port %d did not answer: %s", port, e)
        return None
