"""The load side of ``bench/serving.py``: one measured point of Classify calls in flight.

``run_point`` drives a server with h2load (``bench/h2load_client.py``) or an asyncio gRPC
client, and counts as errors both failed calls and every non-OK Classify the server's own
/metrics saw during the point (h2load does not read gRPC trailers).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
from h2load_client import grpc_errors, h2load_path, run_h2load

__all__ = ["CLASSIFY", "WARMUP_S", "Point", "pick_client", "run_point"]

CLASSIFY = "/protoserve.v1.Protoserve/Classify"
WARMUP_S = 1.0


@dataclass
class Point:
    mode: str
    concurrency: int
    requests: int
    images: int
    seconds: float
    latencies_s: list[float]
    errors: int
    client_cpu_s: float  # the load generator's CPU time over the whole point, warm-up included
    client_wall_s: float  # that point's wall time

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.client_wall_s

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def ips(self) -> float:
        return self.images / self.seconds

    def pct(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")
        )


async def _load(
    target: str, payload: bytes, concurrency: int, seconds: float, connections: int = 1
) -> tuple[int, list[float], int]:
    """(measured calls, their latencies, errors) from the asyncio client, the calls spread
    over ``connections`` channels of their own connection each."""
    opts = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [
        grpc.aio.insecure_channel(target, options=opts)
        for _ in range(max(1, min(connections, concurrency)))
    ]
    try:
        calls = [ch.unary_unary(CLASSIFY) for ch in channels]  # raw bytes in, raw bytes out
        for call in calls:
            await call(payload, timeout=30)
        latencies: list[float] = []
        count = [0, 0]  # measured calls, errors
        start = time.perf_counter()
        measure_from = start + WARMUP_S
        stop_at = measure_from + seconds

        async def worker(i: int) -> None:
            call = calls[i % len(calls)]
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    count[1] += 1
                    continue
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    count[0] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return count[0], latencies, count[1]
    finally:
        for ch in channels:
            await ch.close()


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_point(
    mode: str,
    served: tuple[str, str],
    payload: bytes,
    n_images: int,
    concurrency: int,
    seconds: float,
    client: str,
    connections: int = 1,
) -> Point:
    """One load point; errors count failed calls and every non-OK Classify the server saw."""
    target, metrics_url = served
    errors_before = grpc_errors(metrics_url, "Classify")
    t0 = time.perf_counter()
    if client == "h2load":
        cpu0 = _children_cpu()
        h2 = run_h2load(target, CLASSIFY, payload, concurrency, seconds, WARMUP_S, connections)
        cpu = _children_cpu() - cpu0
        reqs, secs, lat, failed = h2.requests, h2.seconds, h2.latencies_s, h2.failed
    else:
        cpu0 = time.process_time()
        reqs, lat, failed = asyncio.run(_load(target, payload, concurrency, seconds, connections))
        cpu, secs = time.process_time() - cpu0, seconds
    wall = time.perf_counter() - t0
    errors = failed + grpc_errors(metrics_url, "Classify") - errors_before
    return Point(mode, concurrency, reqs, reqs * n_images, secs, lat, errors, cpu, wall)


def pick_client(wanted: str) -> str:
    if wanted != "auto":
        if wanted == "h2load" and h2load_path() is None:
            sys.exit("--client h2load: h2load not found (make bench-tools)")
        return wanted
    if h2load_path() is None:
        print(
            "# h2load not found (make bench-tools): the asyncio client generates the load, "
            "and its CPU comes out of the server's",
            file=sys.stderr,
        )
        return "python"
    return "h2load"
