"""Classify serving benchmark on loopback: throughput, latency, and registration visibility.

    python bench/serving.py [--concurrency 1 8 32 64] [--seconds 10] [--batching on off]
                            [--processes 1 2] [--connections 8]
                            [--images 1] [--server-process | --no-server-process]
                            [--model-instances N] [--rounds R] [--client auto|h2load|python]

For each server size (``--processes``: one process, the default server, and two, ``serve
--processes 2``) and each batching mode a fresh server (``python -m server.grpc.app`` as a
subprocess by default, so the load generator does not share its GIL; ``--no-server-process``:
in-process ``build_server`` for the one-process server) gets collection ``run01`` with the 20 run01
training images of the bundled ``omniglot-protonet`` model, one class each. Batching ``off``
is ``--max-batch-size 1``. A load generator then keeps ``concurrency`` Classify requests
(``--images`` run01 test images each, pre-serialized once) in flight for ``--seconds`` after a
warm-up, spread over ``--connections`` client connections (default 8, as many clients would:
a multi-process server spreads connections, not calls): h2load (nghttp2's HTTP/2 load
generator, in C: ``bench/h2load_client.py``) when it is installed (``make bench-tools``), else
this process's asyncio gRPC client (``--client`` chooses). The two share the cores with the
server, and the asyncio client costs several times more CPU per call (the report gives each
run's client CPU per request). A call counts as served only with status OK: h2load does not
read gRPC trailers, so the server's own per-status counters (its /metrics) are read around
each point, and any non-OK Classify there is an error.

The ceiling is the same decode + embed + score work in this process with no gRPC and no
batcher (``Preprocessor.preprocess_bytes`` -> ``runtime.encode_images`` -> prototype scores and
top-k) at the best of several batch sizes, measured before any server starts; "% of ceiling"
is served images/s over ceiling images/s. When the server runs N > 1 model instances
(``--model-instances``; 0: automatic, 2 on a CPU with 2+ cores), each batch that overlaps
another on cores / N onnxruntime threads, the same loop also runs in N threads at once on a
runtime set up that way, and the ceiling is the better of the two.

With ``--rounds R`` the ceiling and the servers are measured R times, alternating, and the
goal is judged on the median of the rounds' ratios (each round's ratio compares figures of that
round; on a shared machine one round's ratio moves by about 10 points).

Registration visibility (``bench/serving_visibility.py``, on the first server measured): ~20
trials, each registering a new class with 5 supports and timing its first appearance in
Classify after the acknowledgement, embedding time excluded. The report gives the median of
(first answer naming the new class - ack - the query's own Classify time), and the median of
the raw ack-to-answer time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server_process import free_port, server_process  # noqa: E402
from serving_load import Point, pick_client, run_point  # noqa: E402
from serving_visibility import measure_visibility  # noqa: E402

from server.client import ProtoserveClient  # noqa: E402
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb  # noqa: E402

MODEL = "omniglot-protonet"
COLLECTION = "run01"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
RUN = OMNIGLOT / "sample_run" / "run01"
BACKGROUND_ZIP = OMNIGLOT / "images_background_small1.zip"
CEILING_BATCHES = (1, 4, 8, 32, 64, 128)
GOAL_CEILING = 0.85
GOAL_VISIBLE_MS = 50.0


# -- data ---------------------------------------------------------------------------------------
def training_images() -> list[tuple[str, bytes]]:
    return [(f.stem, f.read_bytes()) for f in sorted((RUN / "training").glob("*.png"))]


def test_images() -> list[bytes]:
    return [f.read_bytes() for f in sorted((RUN / "test").glob("*.png"))]


# -- ceiling ------------------------------------------------------------------------------------
def measure_ceiling(
    images: list[bytes], seconds: float, instances: int = 1
) -> tuple[int, int, float, dict[int, float]]:
    """(streams, best batch size, its images/s, images/s per batch size): decode + embed +
    score, in as many threads at once as the server runs model instances with the setting
    ``instances`` (0: automatic), each on the runtime the server uses when instances overlap."""
    from server.methods import Distribution, score
    from server.model_repo import ModelRepository
    from server.pipeline import Pipeline, PipelineOptions
    from server.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="protoserve-ceiling-"))
    registry = Registry.open(tmp / "data")
    opts = PipelineOptions(model_instances=instances)
    pipeline = Pipeline(registry, ModelRepository(ROOT / "models"), opts)
    try:
        pipeline.create_collection(COLLECTION, MODEL)
        for label, data in training_images():
            pipeline.register(COLLECTION, label, [data])
        coll = registry.collection(COLLECTION)
        m = pipeline.model(MODEL)
        k = pipeline.options.default_top_k
        instances = m.batcher.instances
        runtime = m.narrow or m.runtime

        def once(batch: list[bytes]) -> None:
            pixels = m.pre.preprocess_bytes(batch)
            q = runtime.encode_images(pixels)
            index = registry.index(coll.name)
            labels, probs, scores = score(
                coll, index, "prototype", q, m.logit_scale, pipeline.options.knn_k
            )
            d = Distribution(coll, labels, probs, scores, q)
            for i in range(len(batch)):
                d.result(i, k)

        per_batch: dict[int, float] = {}
        budget = seconds / len(CEILING_BATCHES)
        for b in CEILING_BATCHES:
            batch = [images[i % len(images)] for i in range(b)]
            once(batch)
            counts = [0] * instances
            t0 = time.perf_counter()

            def loop(
                j: int, batch: list[bytes] = batch, t0: float = t0, counts: list[int] = counts
            ) -> None:
                while time.perf_counter() - t0 < budget:
                    once(batch)
                    counts[j] += len(batch)

            threads = [threading.Thread(target=loop, args=(j,)) for j in range(instances)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            per_batch[b] = sum(counts) / (time.perf_counter() - t0)
        best = max(per_batch, key=lambda b: per_batch[b])
        return instances, best, per_batch[best], per_batch
    finally:
        pipeline.close()
        registry.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- server -------------------------------------------------------------------------------------
def server_flags(
    batching: bool, args: argparse.Namespace, data_dir: Path, processes: int = 1
) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "model_repo": ROOT / "models",
        "max_batch_size": args.max_batch_size if batching else 1,
        "max_delay_ms": args.max_delay_ms,
        "workers": args.workers,
        "model_instances": args.model_instances,
        "processes": processes,
        "grace_s": 2.0,
        "metrics_port": free_port(),
    }


@contextmanager
def running_server(
    batching: bool, args: argparse.Namespace, processes: int = 1
) -> Iterator[tuple[str, str]]:
    """A started server with an empty data dir; yields its address and metrics URL; stops it
    on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="protoserve-bench-"))
    flags = server_flags(batching, args, tmp / "data", processes)
    try:
        if args.server_process or processes != 1:
            with server_process(flags, tmp) as served:
                yield served
        else:
            from server.config import ServerConfig
            from server.grpc.app import build_server

            server, port = build_server(ServerConfig(**flags))  # type: ignore[arg-type]
            server.start()
            try:
                yield f"127.0.0.1:{port}", f"http://127.0.0.1:{server.metrics_port}/metrics"
            finally:
                server.stop(grace=2.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def setup_collection(target: str) -> None:
    with ProtoserveClient(target) as c:
        c.create_collection(COLLECTION, model=MODEL)
        for label, data in training_images():
            c.register(COLLECTION, label, images=[data])


# -- load ---------------------------------------------------------------------------------------
# -- one round: the ceiling, then every mode's server ---------------------------------------------
@dataclass
class Round:
    points: list[Point]
    ceilings: dict[int, tuple[int, float, dict[int, float]]]  # streams -> (batch, ips, per batch)
    served_instances: int
    visibility: tuple[list[float], list[float], list[int]] | None

    @property
    def ceiling(self) -> float:
        return max(v for _, v, _ in self.ceilings.values())


def one_round(
    args: argparse.Namespace, tests: list[bytes], payload: bytes, want_visibility: bool
) -> Round:
    """The ceiling (1 stream, and as many as the server runs instances), then a fresh server
    per batching mode at every concurrency: ratios compare figures of the same round."""
    measured = [measure_ceiling(tests, args.ceiling_seconds, 1)]
    if args.model_instances != 1:
        measured.append(measure_ceiling(tests, args.ceiling_seconds, args.model_instances))
    ceilings = {n: (b, v, per) for n, b, v, per in measured}
    points: list[Point] = []
    visibility = None
    for procs in args.processes:
        for batching in args.batching:
            mode = batching if procs == 1 else f"{batching}, {procs} processes"
            with running_server(batching == "on", args, procs) as served:
                target = served[0]
                setup_collection(target)
                for conc in args.concurrency:
                    pt = run_point(
                        mode,
                        served,
                        payload,
                        args.images,
                        conc,
                        args.seconds,
                        args.client,
                        args.connections,
                    )
                    points.append(pt)
                    print(
                        f"# {mode} c={conc}: {pt.ips:.0f} images/s, p50 {pt.pct(50):.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                if want_visibility and args.visibility_trials > 0 and visibility is None:
                    visibility = measure_visibility(
                        target, COLLECTION, args.visibility_trials, BACKGROUND_ZIP
                    )
    return Round(points, ceilings, measured[-1][0], visibility)


def print_round(args: argparse.Namespace, rnd: Round, title: str) -> None:
    where = "subprocess" if args.server_process else "in-process"
    print(
        f"\n{title}. Server: {where}, workers {args.workers}; batching on = max_batch_size "
        f"{args.max_batch_size}, max_delay_ms {args.max_delay_ms}; off = max_batch_size 1; "
        f"{rnd.served_instances} model instance(s). "
        f"{args.images} image(s)/request, {args.seconds:g} s per point, {os.cpu_count()} CPUs. "
        f"Load: {args.client} client over {args.connections} connection(s) (its CPU in "
        "cores and per request).\n"
    )
    print(
        "| mode | concurrency | requests/s | images/s | p50 ms | p99 ms | client cores "
        "| client ms/request | % of ceiling |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pt in rnd.points:
        err = f" ({pt.errors} errors)" if pt.errors else ""
        per_req = 1000 * pt.client_cores / pt.rps if pt.rps else float("nan")
        print(
            f"| batching {pt.mode} | {pt.concurrency} | {pt.rps:.1f} | {pt.ips:.1f} | "
            f"{pt.pct(50):.2f} | {pt.pct(99):.2f} | {pt.client_cores:.3f} | {per_req:.3f} | "
            f"{100 * pt.ips / rnd.ceiling:.1f}%{err} |"
        )
    print()
    for n, (b, v, per) in rnd.ceilings.items():
        sizes = ", ".join(f"{bs}: {x:.0f}" for bs, x in per.items())
        print(
            f"In-process decode + embed + score, no gRPC, {n} stream(s): {v:.1f} images/s at "
            f"batch {b} (images/s by batch size: {sizes})."
        )
    best_n = max(rnd.ceilings, key=lambda n: rnd.ceilings[n][1])
    print(
        f"Ceiling: {rnd.ceiling:.1f} images/s ({best_n} stream(s), batch "
        f"{rnd.ceilings[best_n][0]})."
    )


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/serving.py", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--images", type=int, default=1, help="images per Classify request")
    p.add_argument(
        "--server-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the server as a subprocess (default) or in this process",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="batching on (default 32)")
    p.add_argument(
        "--max-delay-ms", type=float, default=0.0, help="batcher delay (default 0, the server's)"
    )
    p.add_argument("--workers", type=int, default=64, help="server gRPC threads (default 64)")
    p.add_argument(
        "--model-instances",
        type=int,
        default=0,
        help="server model instances (default 0, the server's: automatic, 2 on a CPU with 2+ "
        "cores); the ceiling is the better of 1 stream and that many",
    )
    p.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="server processes (serve --processes) to measure, each a server of its own "
        "(default: 1 and 2)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="client connections the calls of a point spread over (default 8, at most the "
        "concurrency; a multi-process server spreads connections, not calls)",
    )
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--visibility-trials", type=int, default=20, help="0: skip")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat ceiling + servers this many times; the goal is judged on the median "
        "ratio (this machine is shared and noisy: one round's ratio moves by ~10 points)",
    )
    p.add_argument(
        "--client",
        choices=["auto", "h2load", "python"],
        default="auto",
        help="load generator: h2load (native, make bench-tools), python (asyncio gRPC), auto: "
        "h2load when installed",
    )
    args = p.parse_args(argv)
    if not RUN.is_dir():
        p.error(f"no Omniglot sample run at {RUN}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    tests = test_images()
    query_imgs = [tests[i % len(tests)] for i in range(args.images)]
    payload = pb.ClassifyRequest(collection=COLLECTION, images=query_imgs).SerializeToString()

    args.client = pick_client(args.client)
    ratios: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    visibility: tuple[list[float], list[float], list[int]] | None = None
    for r in range(args.rounds):
        rnd = one_round(args, tests, payload, want_visibility=r == 0)
        visibility = visibility or rnd.visibility
        title = f"Round {r + 1} of {args.rounds}" if args.rounds > 1 else "Results"
        print_round(args, rnd, title)
        for pt in rnd.points:
            if pt.concurrency == 32:
                ratios.setdefault(pt.mode, []).append(pt.ips / rnd.ceiling)
                errors[pt.mode] = errors.get(pt.mode, 0) + pt.errors
    print()
    for mode, rs in ratios.items():
        med = float(np.median(rs))
        each = ", ".join(f"{100 * x:.1f}%" for x in rs)
        ok = med >= GOAL_CEILING and not errors[mode]
        failed = f" ({errors[mode]} failed calls)" if errors[mode] else ""
        print(
            f"Goal >= {GOAL_CEILING:.0%} of ceiling at concurrency 32, batching {mode}, "
            f"{args.client} client, {args.connections} connection(s): "
            f"{100 * med:.1f}%{' (median of ' + each + ')' if len(rs) > 1 else ''}{failed} -> "
            f"{'MET' if ok else 'NOT MET'}"
        )
    if visibility is not None:
        net, raw, polls = visibility
        med = float(np.median(net)) * 1000
        print(
            f"\nRegistration visibility (batching {args.batching[0]}, {args.processes[0]} "
            f"process(es), {len(net)} trials, class "
            f"with 5 supports): median {med:.2f} ms after the RegisterClass ack, excluding "
            f"embedding (max {max(net) * 1000:.2f} ms; raw ack -> answer median "
            f"{float(np.median(raw)) * 1000:.2f} ms, minus the query's own Classify time "
            f"measured just before; polls needed: max {max(polls)}). Goal <= "
            f"{GOAL_VISIBLE_MS:g} ms -> {'MET' if med <= GOAL_VISIBLE_MS else 'NOT MET'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
