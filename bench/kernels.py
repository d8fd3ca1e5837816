"""Prototype top-k: our kernels against FAISS, torch and numpy, in one run.

    python bench/kernels.py [--repeats 9] [--threads N] [--shapes 64x100000x512 ...]

Every method runs on the same data in interleaved rounds (round r times
each method once), so a noisy neighbour slows all of them alike; the table
reports each method's best round. It also measures the machine's own
ceilings in the same run: float32 GEMM GFLOP/s (numpy's BLAS, the best of
square 2048 products) and read bandwidth (a streaming vector sum over a
buffer as large as the float32 prototypes, with the scan's threads), and
checks the targets of the Foundation issue, printing the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from timing import best_of, gemm_gflops

from server import _kernels
from server import kernels as K

SETTLE_S = 0.2
DEFAULT_SHAPES = ["1x100000x512", "64x100000x512", "256x10000x512", "64x1000x512"]


@dataclass
class Shape:
    q: int
    c: int
    d: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        q, c, d = (int(x) for x in text.lower().split("x"))
        return cls(q, c, d)

    def __str__(self) -> str:
        return f"({self.q}, {self.c}, {self.d})"


@dataclass
class Result:
    shape: Shape
    times: dict[str, float] = field(default_factory=dict)  # method -> best seconds


def methods_for(shape: Shape, k: int, threads: int) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((shape.c, shape.d), dtype=np.float32)
    queries = rng.standard_normal((shape.q, shape.d), dtype=np.float32)
    fp32 = K.PrototypeMatrix(protos, "float32", "ip")
    bf16 = K.PrototypeMatrix(protos, "bfloat16", "ip")
    out: dict[str, Callable[[], object]] = {
        "ours fp32": lambda: K.topk(queries, fp32, k),
        "ours bf16": lambda: K.topk(queries, bf16, k),
    }
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
        ip = faiss.IndexFlatIP(shape.d)
        ip.add(protos)
        l2 = faiss.IndexFlatL2(shape.d)
        l2.add(protos)
        out["faiss FlatIP"] = lambda: ip.search(queries, k)
        out["faiss FlatL2"] = lambda: l2.search(queries, k)
    except ImportError:
        print("faiss not installed: skipping FAISS", file=sys.stderr)
    try:
        import torch

        torch.set_num_threads(threads)
        tp, tq = torch.from_numpy(protos), torch.from_numpy(queries)

        def torch_topk() -> object:
            with torch.inference_mode():
                return torch.topk(tq @ tp.T, k, dim=1)

        out["torch mm+topk"] = torch_topk
    except ImportError:
        print("torch not installed (pip install .[train]): skipping torch", file=sys.stderr)

    def numpy_topk() -> object:
        s = queries @ protos.T
        part = np.argpartition(-s, min(k, shape.c - 1), axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1)

    out["numpy mm+argpartition"] = numpy_topk
    return out


def ceilings(max_c: int, d: int, repeats: int) -> tuple[float, float]:
    gemm = gemm_gflops(repeats, SETTLE_S)
    buf = np.ones(max_c * d, np.float32)
    bw = buf.nbytes / best_of(lambda: _kernels.read_sum(buf), repeats, SETTLE_S) / 1e9
    return gemm, bw


def run(shapes: list[Shape], k: int, repeats: int, threads: int) -> dict[str, object]:
    results = []
    for shape in shapes:
        fns = methods_for(shape, k, threads)
        for fn in fns.values():  # warm every method before the rounds
            fn()
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                # BLAS and OpenMP pools spin for a while after a call; let
                # the previous method's threads park before timing the next.
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        results.append(Result(shape, best))
        print(f"  measured {shape}", file=sys.stderr)
    gemm, bw = ceilings(max(s.c for s in shapes), max(s.d for s in shapes), repeats)
    return {"results": results, "gemm_gflops": gemm, "read_gbs": bw}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, scan threads {K.num_threads()}, "
        f"SIMD {K.simd_level()} (best {K.best_simd_level()}), "
        f"FMA {_kernels.fma_macs_per_ns():.0f} vs VDPBF16PS {_kernels.dpbf16_macs_per_ns():.0f} "
        "multiply-adds/ns/core"
    )


def report(out: dict[str, object], k: int) -> list[str]:
    results: list[Result] = out["results"]  # type: ignore[assignment]
    gemm: float = out["gemm_gflops"]  # type: ignore[assignment]
    bw: float = out["read_gbs"]  # type: ignore[assignment]
    names = list(results[0].times)
    lines = [f"Machine: {machine()}", f"k = {k}; best of interleaved rounds, milliseconds.", ""]
    lines.append(
        "| (Q, C, D) | " + " | ".join(names) + " | fp32 vs FAISS IP | fp32 vs torch "
        "| bf16 vs fp32 | fp32 GFLOP/s (% GEMM) | fp32 GB/s (% read bw) |"
    )
    lines.append("|---" * (len(names) + 6) + "|")
    checks = []
    for r in results:
        t = r.times
        s = r.shape
        fp32 = t["ours fp32"]
        flops = 2 * s.q * s.c * s.d / fp32 / 1e9
        gbs = s.c * s.d * 4 / fp32 / 1e9
        vs_faiss = t.get("faiss FlatIP", float("nan")) / fp32
        vs_torch = t.get("torch mm+topk", float("nan")) / fp32
        bf16 = fp32 / t["ours bf16"]
        cells = [f"{t[n] * 1e3:.2f}" for n in names]
        lines.append(
            f"| {s} | " + " | ".join(cells) + f" | {vs_faiss:.2f}x | {vs_torch:.2f}x | {bf16:.2f}x "
            f"| {flops:.0f} ({100 * flops / gemm:.0f}%) | {gbs:.1f} ({100 * gbs / bw:.0f}%) |"
        )
        if (s.q, s.c, s.d) == (64, 100000, 512):
            checks += [
                ("fp32 >= 3x FAISS IndexFlatIP at (64, 100000, 512)", vs_faiss, 3.0),
                ("fp32 >= 1.5x torch at (64, 100000, 512)", vs_torch, 1.5),
                ("bf16 >= 1.7x fp32 at (64, 100000, 512)", bf16, 1.7),
            ]
        if (s.q, s.c, s.d) == (1, 100000, 512):
            checks += [
                ("fp32 >= 85% of read bandwidth at (1, 100000, 512)", gbs / bw, 0.85),
                ("bf16 >= 1.7x fp32 at (1, 100000, 512)", bf16, 1.7),
            ]
    lines += [
        "",
        f"Ceilings, same run: float32 GEMM {gemm:.0f} GFLOP/s (numpy BLAS, 2048^3); "
        f"read bandwidth {bw:.1f} GB/s (streaming sum over {max(r.shape.c for r in results)}"
        f" x {max(r.shape.d for r in results)} float32)",
        "",
    ]
    for name, value, target in checks:
        status = "met" if value >= target else "NOT met"
        lines.append(f"- {name}: {value:.2f} (target {target}) -> {status}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="QxCxD")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args(argv)
    K.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    out = run([Shape.parse(s) for s in args.shapes], args.k, args.repeats, args.threads)
    print("\n".join(report(out, args.k)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "gemm_gflops": out["gemm_gflops"],
                    "read_gbs": out["read_gbs"],
                    "results": [
                        {"shape": [r.shape.q, r.shape.c, r.shape.d], "seconds": r.times}
                        for r in out["results"]
                    ],
                },
                f,
                indent=1,
            )  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
