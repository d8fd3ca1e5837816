"""Image tower throughput: onnxruntime vs torch eager, same model, same run.

    python bench/backbones.py [--arch ViT-B-32] [--batches 1 8 32] [--seconds 3]

Exports the open_clip architecture (random weights: throughput does not
depend on them) into temporary model folders - fused float32 (the default
export), plain float32, and fused with int8 MatMul weights (``--int8``) -
then times the image tower at each batch size in interleaved rounds and
prints images/s and the ratios to torch eager (float32). It also prints the
int8 tower's worst cosine to the float32 tower on the timed batches, and
where float32 stands against the machine: the tower's multiply-adds per image
(counted by torch's FlopCounterMode) against the float32 GEMM ceiling measured
in the same run (the best of numpy's and torch's 2048^3 matmul), so a float32
figure near 100% of that ceiling cannot be beaten by any float32 runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from timing import gemm_gflops


def images_per_s(fn: Callable[[], object], batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def tower_flops(model: object, size: tuple[int, ...]) -> float:
    """Floating-point operations (2 per multiply-add) of one image through the tower."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's inference fast path is one fused op the counter does
    # not see: count the same maths through the unfused path
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            model.encode_image(torch.zeros(1, 3, *size))  # type: ignore[attr-defined]
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import open_clip
    import torch

    from server.model_repo import load_model
    from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime
    from training.export import export_open_clip

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exporting {args.arch} (random weights) ...", file=sys.stderr)
        # open_clip draws random weights from torch's global generator: the same seed
        # before each export gives the three folders the same weights
        torch.manual_seed(0)
        folder = export_open_clip(args.arch, f"{tmp}/model")
        torch.manual_seed(0)
        plain = export_open_clip(args.arch, f"{tmp}/plain", fuse=False)
        torch.manual_seed(0)
        quant = export_open_clip(args.arch, f"{tmp}/int8", int8=True)
        cfg = OnnxConfig(intra_op_threads=args.threads)
        ort_rt = OnnxRuntime(load_model(folder.path), cfg)
        plain_rt = OnnxRuntime(load_model(plain.path), cfg)
        int8_rt = OnnxRuntime(load_model(quant.path), cfg)
        worst_cos = 1.0
        model = open_clip.create_model(args.arch, pretrained=None).eval()
        size = tuple(folder.manifest.preprocess["size"])
        rows = []
        for batch in args.batches:
            pixels = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
            tp = torch.from_numpy(pixels)

            def run_torch(tp: torch.Tensor = tp) -> object:
                with torch.inference_mode():
                    return model.encode_image(tp)

            def run_ort(pixels: np.ndarray = pixels) -> object:
                return ort_rt.encode_images(pixels)

            def run_plain(pixels: np.ndarray = pixels) -> object:
                return plain_rt.encode_images(pixels)

            def run_int8(pixels: np.ndarray = pixels) -> object:
                return int8_rt.encode_images(pixels)

            a, b = int8_rt.encode_images(pixels), ort_rt.encode_images(pixels)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            worst_cos = min(worst_cos, float(cos.min()))
            fns = {"ort": run_ort, "plain": run_plain, "int8": run_int8, "torch": run_torch}
            best = dict.fromkeys(fns, 0.0)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    best[name] = max(best[name], images_per_s(fn, batch, args.seconds))
            rows.append((batch, best["ort"], best["plain"], best["int8"], best["torch"]))
        flops = tower_flops(model, size)
        gemm = gemm_gflops(repeats=5, with_torch=True)
    print(f"{args.arch} image tower, {args.threads} threads, best of {args.rounds} rounds")
    print(
        "| batch | onnxruntime fp32 (fused) img/s | onnxruntime fp32 (plain export) img/s "
        "| onnxruntime int8 img/s | torch eager fp32 img/s | fp32 vs torch | int8 vs torch |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch, o, p, q, t in rows:
        print(f"| {batch} | {o:.1f} | {p:.1f} | {q:.1f} | {t:.1f} | {o / t:.2f}x | {q / t:.2f}x |")
    print(f"int8 vs float32 tower, worst cosine over the timed batches: {worst_cos:.6f}")
    print(
        f"float32 against the machine: {flops / 1e9:.2f} GFLOP per image; "
        f"float32 GEMM ceiling {gemm:.0f} GFLOP/s (same run), "
        f"so at most {gemm * 1e9 / flops:.1f} img/s in float32"
    )
    print("| batch | onnxruntime fp32 % of ceiling | torch eager fp32 % of ceiling |")
    print("|---|---|---|")
    for batch, o, _p, _q, t in rows:
        share = [100 * ips * flops / 1e9 / gemm for ips in (o, t)]
        print(f"| {batch} | {share[0]:.0f}% | {share[1]:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
