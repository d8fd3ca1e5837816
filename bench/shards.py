"""What a multi-process server could serve: N pinned server processes against one.

    python bench/shards.py [--shards 2] [--concurrency 32] [--seconds 8] [--rounds 2]

One protoserve process runs its gRPC threads, its image decoding and its batcher under one
GIL. This bench measures how much that costs with fully independent servers, the upper bound
for ``serve --processes N`` (which shares one port and one data dir; ``bench/serving.py
--processes 1 2`` measures it). Each round starts

- one server as ``make serve`` would (every CPU, the automatic model instances), loaded by one
  h2load with ``--concurrency`` streams, then
- ``--shards`` servers, each pinned with ``taskset`` to its own share of the CPUs (one model
  instance on that many threads), each with its own copy of the run01 collection and its own
  h2load with an equal share of the streams, all at once,

and prints the Classify images/s of both (1 run01 test image per request, as
``bench/serving.py``), against the in-process ceiling measured in the same round. Needs h2load
(``make bench-tools``) and ``taskset`` (util-linux).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import serving  # noqa: E402  (bench/serving.py: ceiling, run01 collection, payload)
from h2load_client import H2Run, grpc_errors, h2load_path, run_h2load  # noqa: E402
from server_process import free_port, server_process  # noqa: E402
from serving_load import CLASSIFY  # noqa: E402

from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb  # noqa: E402


@contextmanager
def server(cpus: list[int] | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """A server subprocess (pinned to ``cpus``: one model instance); its address and metrics
    URL, with run01 registered."""
    flags: dict[str, object] = {"host": "127.0.0.1", "port": 0, "data_dir": tmp / "data"}
    flags.update(model_repo=ROOT / "models", workers=64, metrics_port=free_port())
    prefix: list[str] = []
    if cpus is not None:
        prefix = ["taskset", "-c", ",".join(map(str, cpus))]
        flags["model_instances"] = 1
    with server_process(flags, tmp, prefix) as served:
        serving.setup_collection(served[0])
        yield served


def load(
    served: list[tuple[str, str]], payload: bytes, concurrency: int, seconds: float
) -> tuple[float, int]:
    """Total images/s with ``concurrency`` streams split evenly over the servers, and the
    failed or non-OK calls."""
    share = [
        concurrency // len(served) + (i < concurrency % len(served)) for i in range(len(served))
    ]
    runs: list[H2Run | None] = [None] * len(served)
    before = [grpc_errors(url, "Classify") for _, url in served]

    def one(i: int) -> None:
        runs[i] = run_h2load(served[i][0], CLASSIFY, payload, share[i], seconds, 1.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(served))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in runs if r is not None]
    if len(done) != len(served):
        raise RuntimeError("an h2load run failed")
    errors = sum(r.failed for r in done)
    errors += sum(
        grpc_errors(url, "Classify") - b for (_, url), b in zip(served, before, strict=True)
    )
    return sum(r.requests / r.seconds for r in done), errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/shards.py", description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= args.shards <= len(cpus):
        p.error(f"--shards must be between 1 and the {len(cpus)} CPUs this process may use")
    if h2load_path() is None or shutil.which("taskset") is None:
        p.error("needs h2load (make bench-tools) and taskset")
    groups = [[int(c) for c in g] for g in np.array_split(cpus, args.shards)]
    payload = pb.ClassifyRequest(
        collection=serving.COLLECTION, images=serving.test_images()[:1]
    ).SerializeToString()

    print(f"| round | ceiling images/s | 1 process | {args.shards} pinned processes | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        ceiling = max(
            serving.measure_ceiling(serving.test_images(), args.ceiling_seconds, n)[2]
            for n in (1, 0)
        )
        with tempfile.TemporaryDirectory(prefix="protoserve-shards-") as tmp:
            with server(None, Path(tmp) / "one") as one:
                single, e1 = load([one], payload, args.concurrency, args.seconds)
            with ExitStack() as stack:
                served = [
                    stack.enter_context(server(g, Path(tmp) / f"s{i}"))
                    for i, g in enumerate(groups)
                ]
                sharded, e2 = load(served, payload, args.concurrency, args.seconds)
        errors = f" ({e1 + e2} failed calls)" if e1 + e2 else ""
        print(
            f"| {r + 1} | {ceiling:.1f} | {single:.1f} ({100 * single / ceiling:.1f}%) | "
            f"{sharded:.1f} ({100 * sharded / ceiling:.1f}%) | {sharded / single:.2f}x{errors} |"
        )
    print(
        f"\nConcurrency {args.concurrency} in all, 1 image per Classify; CPU groups {groups}; "
        "the ceiling is bench/serving.py's (in-process decode + embed + score, the better of 1 "
        "stream and the automatic instance count)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
