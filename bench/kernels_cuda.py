"""Prototype top-k on a CUDA GPU: our kernels against torch, in one run.

    python bench/kernels_cuda.py [--repeats 20] [--shapes 64x100000x512 ...] [--json out.json]

Needs torch with a visible CUDA device and the CUDA module
(``server._kernels_cuda``; build with PROTOSERVE_CUDA=ON). Every method runs
on the same device tensors in interleaved rounds; each round times ``iters``
back-to-back calls between two device synchronisations, and the table
reports each method's best round per call, so launch and Python overheads
count for every method alike. Methods, metric ``ip`` (cosine and l2 cost the
same in our kernels, an extra norm pass in torch):

* ours fp32 / ours bf16: ``server.kernels.topk`` on float32 or bfloat16
  prototypes (the public entry: input checks included);
* torch fp32: ``torch.topk(q @ p.T, k)`` (full fp32, TF32 off);
* torch bf16: the same with bfloat16 queries and prototypes (tensor cores).

The same run measures the device's own ceiling, a device-to-device copy
(bytes read + written per second), and prints each method's effective read
bandwidth on the prototypes. It also checks that our fp32 top-1 agrees with
torch fp32's on every query.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_SHAPES = [
    "1x100000x512",
    "64x100000x512",
    "256x10000x512",
    "64x1000x512",
    "1024x100000x512",
    "1x1000000x512",
]


def _torch() -> object:
    try:
        import torch
    except ImportError:
        sys.exit("bench/kernels_cuda.py needs torch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def time_calls(fn: Callable[[], object], iters: int) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def with_kernels(mode: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with PROTOSERVE_CUDA_TILED=mode (auto, always, never) set for each call."""

    def call() -> object:
        os.environ["PROTOSERVE_CUDA_TILED"] = mode
        return fn()

    return call


def methods(
    q: object, p32: object, p16: object, k: int, modes: Sequence[str] = ()
) -> dict[str, Callable[[], object]]:
    import torch

    from server import kernels as K

    q16 = q.to(torch.bfloat16)  # type: ignore[attr-defined]
    out = {
        "ours fp32": with_kernels("auto", lambda: K.topk(q, p32, k, metric="ip")),
        "ours bf16": with_kernels("auto", lambda: K.topk(q, p16, k, metric="ip")),
        "torch fp32": lambda: torch.topk(q @ p32.T, k, dim=1),  # type: ignore[attr-defined]
        "torch bf16": lambda: torch.topk(q16 @ p16.T, k, dim=1),  # type: ignore[attr-defined]
    }
    for mode in modes:  # the kernel choice forced, to find where each kernel wins
        out[f"ours fp32 {mode}"] = with_kernels(mode, lambda: K.topk(q, p32, k, metric="ip"))
    return out


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    import torch

    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    best = min(time_calls(lambda: b.copy_(a), 5) for _ in range(repeats))
    return 2 * nbytes / best / 1e9


def run_shape(
    q_n: int, c: int, d: int, k: int, repeats: int, modes: Sequence[str] = ()
) -> dict[str, object]:
    import torch

    from server import kernels as K

    g = torch.Generator(device="cuda").manual_seed(q_n * 7 + c + d)
    q = torch.randn(q_n, d, device="cuda", generator=g)
    p32 = torch.randn(c, d, device="cuda", generator=g)
    p16 = p32.to(torch.bfloat16)
    fns = methods(q, p32, p16, k, modes)
    ours_i = K.topk(q, p32, k, metric="ip")[1][:, 0]
    torch_i = torch.topk(q @ p32.T, k, dim=1)[1][:, 0]
    agree = float((ours_i == torch_i).float().mean())
    # Calls per round: enough that a round lasts a few milliseconds.
    t1 = {name: time_calls(fn, 2) for name, fn in fns.items()}
    iters = {name: max(1, min(200, int(5e-3 / max(t, 1e-6)))) for name, t in t1.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], time_calls(fn, iters[name]))
    return {"shape": [q_n, c, d], "seconds": best, "top1_agreement_vs_torch": agree}


def report(results: list[dict[str, object]], bw: float, k: int, device: str) -> list[str]:
    names = list(results[0]["seconds"])  # type: ignore[call-overload]
    lines = [
        f"Device: {device}; k = {k}, metric ip; best round, milliseconds per call.",
        "",
        "| (Q, C, D) | "
        + " | ".join(names)
        + " | ours fp32 vs torch fp32 | ours bf16 vs torch bf16 | ours bf16 vs fp32 "
        "| ours fp32 GB/s (% copy bw) | top-1 = torch |",
        "|---" * (len(names) + 6) + "|",
    ]
    for r in results:
        t: dict[str, float] = r["seconds"]  # type: ignore[assignment]
        qn, c, d = r["shape"]  # type: ignore[misc]
        gbs = c * d * 4 / t["ours fp32"] / 1e9
        cells = " | ".join(f"{t[n] * 1e3:.3f}" for n in names)
        lines.append(
            f"| ({qn}, {c}, {d}) | {cells} | {t['torch fp32'] / t['ours fp32']:.2f}x "
            f"| {t['torch bf16'] / t['ours bf16']:.2f}x | {t['ours fp32'] / t['ours bf16']:.2f}x "
            f"| {gbs:.0f} ({100 * gbs / bw:.0f}%) | {100 * r['top1_agreement_vs_torch']:.1f}% |"  # type: ignore[operator]
        )
    lines += ["", f"Ceiling, same run: device-to-device copy {bw:.0f} GB/s (read + written)."]
    return lines


def profile_calls(shape: str, k: int, calls: int = 300) -> str:
    """cProfile of our fp32 top-k at one (small) shape: where the per-call
    overhead outside the kernels goes."""
    import cProfile
    import io
    import pstats

    import torch

    from server import kernels as K

    os.environ["PROTOSERVE_CUDA_TILED"] = "auto"
    qn, c, d = (int(x) for x in shape.lower().split("x"))
    q = torch.randn(qn, d, device="cuda")
    p = torch.randn(c, d, device="cuda")
    K.topk(q, p, k, metric="ip")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        K.topk(q, p, k, metric="ip")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return f"cProfile of {calls} calls at ({qn}, {c}, {d}), k = {k}:\n" + out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="QxCxD")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--profile", metavar="QxCxD", help="also profile the per-call overhead")
    parser.add_argument(
        "--kernel-modes",
        nargs="*",
        default=[],
        choices=["always", "never"],
        help="also time ours fp32 with the tiled kernels forced on (always) or off (never)",
    )
    args = parser.parse_args(argv)
    torch = _torch()
    device = torch.cuda.get_device_name()  # type: ignore[attr-defined]
    results = []
    for text in args.shapes:
        qn, c, d = (int(x) for x in text.lower().split("x"))
        results.append(run_shape(qn, c, d, args.k, args.repeats, args.kernel_modes))
        print(f"  measured ({qn}, {c}, {d})", file=sys.stderr, flush=True)
    max_bytes = max(int(np.prod(r["shape"][1:])) * 4 for r in results)  # type: ignore[index]
    bw = copy_bandwidth(max(max_bytes, 1 << 28), args.repeats)
    print("\n".join(report(results, bw, args.k, device)))
    if args.profile:
        print(profile_calls(args.profile, args.k))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device, "copy_gbs": bw, "k": args.k, "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
