"""One two-thread onnxruntime session against two one-thread sessions, with and without a
neighbour taking CPU: why the server runs 2 model instances on a 2-core CPU.

    python bench/contention.py [--seconds 4] [--batch 1 32]

Runs the bundled model's image tower (``models/omniglot-protonet``) on zeros for ``--seconds``
per cell: one session with 2 intra-op threads in one loop, and two sessions with 1 thread each
in two threads at once, each at the session's measured slice size (``run_batch``). Then again
while another process burns 1 ms of CPU every 3 ms, and every 2 ms: what gRPC handler threads
and image decoding do to the model in a loaded server. Prints images/s and each row's ratio to
the quiet figure. The threads of one run wait for each other at every operator, so a run whose
thread loses its core stalls the other; two independent sessions only lose the stolen time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.model_repo import ModelRepository  # noqa: E402
from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime  # noqa: E402

HOG = """
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.001:
        pass
    time.sleep({sleep})
"""


def rate(runtimes: list[OnnxRuntime], pixels: np.ndarray, seconds: float) -> float:
    """Images/s with one thread per runtime, all running at once."""
    counts = [0] * len(runtimes)
    t0 = time.perf_counter()

    def loop(j: int) -> None:
        while time.perf_counter() - t0 < seconds:
            runtimes[j].encode_images(pixels)
            counts[j] += len(pixels)

    threads = [threading.Thread(target=loop, args=(j,)) for j in range(len(runtimes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/contention.py", description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--model", default="omniglot-protonet")
    args = p.parse_args(argv)

    folder = ModelRepository(ROOT / "models").get(args.model)
    wide = OnnxRuntime(folder, OnnxConfig(intra_op_threads=2), towers=("image",))
    narrow = [OnnxRuntime(folder, OnnxConfig(intra_op_threads=1), towers=("image",)) for _ in "ab"]
    shape = (1, *wide._sessions["image"].get_inputs()[0].shape[1:])
    print(
        f"{args.model}: slices of {wide.run_batch} row(s) on 2 threads, {narrow[0].run_batch} on 1"
    )
    print("\n| neighbour | batch | 1 session x 2 threads | 2 sessions x 1 thread |")
    print("|---|---:|---:|---:|")
    quiet: dict[int, tuple[float, float]] = {}
    for label, sleep in (("none", None), ("1 ms of CPU every 3 ms", 0.002), ("every 2 ms", 0.001)):
        hog = (
            None
            if sleep is None
            else subprocess.Popen([sys.executable, "-c", HOG.format(sleep=sleep)])
        )
        try:
            time.sleep(0.2)
            for b in args.batch:
                pixels = np.zeros((b, *shape[1:]), np.float32)
                w, n = rate([wide], pixels, args.seconds), rate(narrow, pixels, args.seconds)
                q = quiet.setdefault(b, (w, n))
                print(f"| {label} | {b} | {w:.1f} ({w / q[0]:.2f}x) | {n:.1f} ({n / q[1]:.2f}x) |")
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
