"""Offline batch scoring (``protoserve score``) vs the server's Classify ceiling, same run.

    python bench/offline.py [--images 3000] [--batch 8 32] [--concurrency 2 4 8]
                            [--in-process | --no-in-process] [--ceiling-seconds 5]

The input is a folder of ``--images`` PNG files (run01's 20 test drawings, cycled, each under
its own name), scored into a fresh JSONL file per point against collection ``run01`` (the 20
run01 training images of the bundled ``omniglot-protonet`` model, one class each):

- ``server``: ``server.scoring.score`` over gRPC to a server started as a subprocess (batching
  on, as ``make serve`` runs it), so the job and the server do not share a GIL;
- ``in-process``: the same job with ``--in-process`` (the pipeline in this process, no gRPC).

The ceiling is ``bench/serving.py``'s: decode + embed + score in this process with no gRPC and
no batcher, at its best batch size, measured first. Each row prints images/s end to end
(reading files, scoring, writing and fsyncing the output) and its share of that ceiling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import serving  # noqa: E402  (bench/serving.py: ceiling, server start, run01 collection)

from server.client import ProtoserveClient  # noqa: E402
from server.scoring import _pipeline_classify, _server_classify, score  # noqa: E402


def make_inputs(root: Path, n: int) -> Path:
    tests = sorted((serving.RUN / "test").glob("*.png"))
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copyfile(tests[i % len(tests)], folder / f"{i:07d}-{tests[i % len(tests)].name}")
    return folder


def timed_job(classify: Any, folder: Path, out: Path, batch: int, conc: int) -> float:
    """Images/s of one whole scoring job into a fresh output file."""
    t0 = time.perf_counter()
    counts = score(classify, folder, out, batch_size=batch, concurrency=conc, progress=False)
    elapsed = time.perf_counter() - t0
    if counts["errors"] or counts["skipped"]:
        raise RuntimeError(f"unexpected counts {counts}")
    out.unlink()
    return counts["scored"] / elapsed


def in_process_points(args: argparse.Namespace, folder: Path, tmp: Path) -> list[tuple]:
    from server.local import local_pipeline

    points = []
    with local_pipeline(tmp / "inproc-data", serving.ROOT / "models") as pipeline:
        pipeline.create_collection(serving.COLLECTION, serving.MODEL)
        for label, data in serving.training_images():
            pipeline.register(serving.COLLECTION, label, [data])
        classify = _pipeline_classify(pipeline, serving.COLLECTION, None)
        for b in args.batch:
            for c in args.concurrency:
                ips = timed_job(classify, folder, tmp / "inproc.jsonl", b, c)
                points.append(("in-process", b, c, ips))
                print(f"# in-process b={b} c={c}: {ips:.0f} images/s", file=sys.stderr)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/offline.py", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000, help="files in the input folder")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="--batch of the job")
    p.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=32, help="server batcher (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument(
        "--model-instances", type=int, default=0, help="server model instances (0: automatic)"
    )
    args = p.parse_args(argv)
    args.server_process = True
    if not serving.RUN.is_dir():
        p.error(f"no Omniglot sample run at {serving.RUN}")

    _, best_b, ceiling, _ = serving.measure_ceiling(serving.test_images(), args.ceiling_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="protoserve-offline-"))
    points: list[tuple] = []
    try:
        folder = make_inputs(tmp, args.images)
        with serving.running_server(True, args) as (target, _metrics):
            serving.setup_collection(target)
            with ExitStack() as stack:  # as protoserve score: a connection per request in flight
                clients = [
                    stack.enter_context(ProtoserveClient(target))
                    for _ in range(max(args.concurrency))
                ]
                classify = _server_classify(clients, serving.COLLECTION, None)
                for b in args.batch:
                    for c in args.concurrency:
                        ips = timed_job(classify, folder, tmp / "server.jsonl", b, c)
                        points.append(("server (gRPC)", b, c, ips))
                        print(f"# server b={b} c={c}: {ips:.0f} images/s", file=sys.stderr)
        if args.in_process:
            points += in_process_points(args, folder, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\n{args.images} PNG files per job, output JSONL (fsync per batch); server: subprocess, "
        f"max_batch_size {args.max_batch_size}, max_delay_ms {args.max_delay_ms}; "
        f"{os.cpu_count()} CPUs.\n"
    )
    print("| mode | --batch | --concurrency | images/s | % of ceiling |")
    print("|---|---:|---:|---:|---:|")
    for mode, b, c, ips in points:
        print(f"| {mode} | {b} | {c} | {ips:.1f} | {100 * ips / ceiling:.1f}% |")
    best = max(points, key=lambda pt: pt[3])
    print(
        f"\nCeiling (in-process decode + embed + score, no gRPC, no files): {ceiling:.1f} "
        f"images/s at batch {best_b}. Best job: {best[0]} --batch {best[1]} --concurrency "
        f"{best[2]}: {best[3]:.1f} images/s = {best[3] / ceiling:.2f}x the ceiling."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
