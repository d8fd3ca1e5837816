"""A few CUDA kernel calls covering every code path, small enough to run
under ``compute-sanitizer`` (memcheck, racecheck): one chunk, several chunks
+ the merge pass, k up to the fused limit, the sort path above it, bf16 and
float32 prototypes, every metric, and ``scores``.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/cuda_sanitize.py
"""

from __future__ import annotations

import torch

from server import kernels as K

CASES = [  # (Q, C, D, k)
    (3, 50, 45, 5),
    (2, 3000, 64, 16),
    (1, 20000, 16, 1),
    (2, 2000, 32, 256),
    (2, 700, 40, 300),
    (1, 300, 8192, 256),
    (2, 64, 4097, 5),
]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for q_n, c, d, k in CASES:
        q = torch.randn(q_n, d, device="cuda", generator=g)
        p = torch.randn(c, d, device="cuda", generator=g)
        for protos in (p, p.to(torch.bfloat16)):
            for metric in ("ip", "cosine", "l2"):
                s, i = K.topk(q, protos, k, metric=metric)
                assert s.shape == (q_n, min(k, c)) and i.shape == s.shape
                K.scores(q, protos, metric=metric)
    torch.cuda.synchronize()
    print(f"cuda_sanitize: {len(CASES) * 6} topk + scores calls done")


if __name__ == "__main__":
    main()
