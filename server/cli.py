"""The ``protoserve`` command line. Every command is ``main(argv)`` so tests
call it in-process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _info(_: argparse.Namespace) -> int:
    from server import kernels

    print(
        json.dumps(
            {
                "simd_level": kernels.simd_level(),
                "best_simd_level": kernels.best_simd_level(),
                "threads": kernels.num_threads(),
                "cuda": kernels.HAS_CUDA,
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protoserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the kernels' SIMD level, threads and CUDA status")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
