"""One training step, three ways, same run: contiguous (NCHW) float32, channels-last float32
(what ``protoserve train metatrain`` and FixMatch now use) and channels-last with the backbone
under bfloat16 autocast (``--precision bf16`` of both; heads, distances and losses float32).

    python bench/training_step.py [--threads 2] [--steps 20] [--rounds 3]

Two steps are timed: a meta-training episode of the shipped Omniglot recipe (Conv-4 at 32 px,
60-way 1-shot 5-query, the all-class classifier; random pixels, since the cost does not depend
on them) and a FixMatch step on Fashion-MNIST's CNN (64 labeled + 448 weak + 448 strong
28x28 images). Each is forward, backward and optimiser step; the variants run in interleaved
rounds and each reports its best round. Ratios are to contiguous float32. The bf16 speed needs
a CPU with AVX512-BF16 or AMX (or a GPU); elsewhere it can be slower than float32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

VARIANTS = ("contiguous fp32", "channels-last fp32", "channels-last bf16")


def episode_step(variant: str) -> Callable[[], None]:
    import torch

    from training.config import TrainConfig, build_method
    from training.methods.aux_head import CosineClassifier

    cfg = TrainConfig(size=32, n_way=60, k_shot=1, q_query=5, aux_weight=0.5)
    torch.manual_seed(0)
    method = build_method(cfg, 1, (32, 32))
    layout = torch.contiguous_format if variant.startswith("contiguous") else torch.channels_last
    method = method.to(memory_format=layout)
    if variant.endswith("bf16"):
        method.autocast_dtype = torch.bfloat16
    n_classes = 1936  # 242 characters x 8 views
    aux = CosineClassifier(256, n_classes)
    opt = torch.optim.Adam([*method.parameters(), *aux.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    sx = torch.rand(60, 1, 32, 32, generator=gen).contiguous(memory_format=layout)
    qx = torch.rand(300, 1, 32, 32, generator=gen).contiguous(memory_format=layout)
    sy = torch.arange(60)
    qy = torch.arange(60).repeat_interleave(5)
    every = torch.randint(n_classes, (360,), generator=gen)

    def step() -> None:
        logits, feats = method.forward_features(sx, sy, qx)
        loss = method.loss(logits, qy) + 0.5 * aux.loss(feats, every)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def fixmatch_step(variant: str) -> Callable[[], None]:
    import torch

    from training.finetune import fmnist_classifier
    from training.fixmatch import FixMatchConfig, fixmatch_loss

    cfg = FixMatchConfig(flex=True)
    torch.manual_seed(0)
    model = fmnist_classifier(10, 0.0, 32, arch="strided")
    layout = torch.contiguous_format if variant.startswith("contiguous") else torch.channels_last
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    b, u = cfg.batch_size, cfg.batch_size * cfg.mu
    xl, xw, xs = (
        torch.rand(n, 1, 28, 28, generator=gen).contiguous(memory_format=layout) for n in (b, u, u)
    )
    yl = torch.randint(10, (b,), generator=gen)
    model.train()
    if variant.endswith("bf16"):
        model.autocast_dtype = torch.bfloat16

    def step() -> None:
        loss, _ = fixmatch_loss(model, xl, yl, xw, xs, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} rounds")
    for name, build in (("meta-training episode", episode_step), ("FixMatch step", fixmatch_step)):
        steps = {v: build(v) for v in VARIANTS}
        for fn in steps.values():
            fn()  # warm-up: oneDNN picks its kernels on the first call
        best = dict.fromkeys(VARIANTS, float("inf"))
        for _ in range(args.rounds):
            for v, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                best[v] = min(best[v], (time.perf_counter() - t0) / args.steps)
        base = best[VARIANTS[0]]
        print(f"\n{name}:")
        for v in VARIANTS:
            print(f"  {v:20s} {1000 * best[v]:8.1f} ms/step  {base / best[v]:5.2f}x")


if __name__ == "__main__":
    main()
