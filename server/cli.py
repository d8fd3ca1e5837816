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


def _export(args: argparse.Namespace) -> int:
    try:
        from training.export import ExportError, export_open_clip
    except ImportError as e:  # torch / open_clip live in the train extra
        print(
            f"protoserve export needs the train extra (pip install .[train]): {e}", file=sys.stderr
        )
        return 2
    try:
        folder = export_open_clip(
            args.arch,
            args.out,
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            name=args.name,
            fp16=args.fp16,
            int8=args.int8,
            fuse=not args.no_fuse,
            opset=args.opset,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    m = folder.manifest
    print(
        f"exported {m.provenance.architecture} to {folder.path} "
        f"(towers: {', '.join(m.towers)}, dim {m.embedding_dim})"
    )
    return 0


def _train(argv: Sequence[str]) -> int:
    from training.cli import main as train_main  # the train extra; owns its own arguments

    return train_main(list(argv))


def _serve(args: argparse.Namespace) -> int:
    from server import logs
    from server.config import ConfigError, config_from_args
    from server.grpc.app import serve

    logs.configure(args.log_format, args.log_level)
    try:
        cfg = config_from_args(args)  # flags > PROTOSERVE_* env > --config file > defaults
    except ConfigError as e:
        print(f"protoserve serve: {e}", file=sys.stderr)
        return 2
    from server.registry import RegistryError

    try:
        return serve(cfg, (args.log_format, args.log_level))
    except (OSError, RegistryError) as e:  # a port or data dir in use, a newer schema, ...
        print(f"protoserve serve: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protoserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the kernels' SIMD level, threads and CUDA status")
    info.set_defaults(func=_info)

    export = sub.add_parser("export", help="export a backbone into the model repository")
    export_sub = export.add_subparsers(dest="source", required=True)
    oc = export_sub.add_parser("open-clip", help="an open_clip architecture -> image+text towers")
    oc.add_argument("--arch", required=True, help="open_clip model name, e.g. ViT-B-32")
    oc.add_argument("--pretrained", help="pretrained tag (downloads where the network allows)")
    oc.add_argument("--checkpoint", help="a local checkpoint file instead of a tag")
    oc.add_argument("--out", required=True, help="model folder to create, e.g. models/vit-b-32")
    oc.add_argument("--name", help="model name (default: the folder's name)")
    oc.add_argument("--fp16", action="store_true", help="store the towers' weights in fp16")
    oc.add_argument(
        "--int8",
        action="store_true",
        help="quantize the towers' MatMul weights to int8 (about 2x faster on CPU; parity "
        "cosine >= 0.999 against float32)",
    )
    oc.add_argument("--opset", type=int, default=18)
    oc.add_argument("--no-fuse", action="store_true", help="skip onnxruntime's transformer fusions")
    oc.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    oc.set_defaults(func=_export)

    from server.config import add_serve_arguments

    srv = sub.add_parser("serve", help="run the gRPC server")
    add_serve_arguments(srv)
    srv.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="structured JSON lines (default) or plain text, on stderr",
    )
    srv.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    srv.set_defaults(func=_serve)

    train = sub.add_parser(
        "train", add_help=False, help="meta-train, evaluate, export (protoserve train --help)"
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=lambda a: _train(a.args))

    from server.cli_client import add_client_commands  # collections, register, classify

    add_client_commands(sub)
    from server.scoring import add_score_command  # score (batch offline scoring)

    add_score_command(sub)
    from server.suggest_cli import add_suggest_command  # suggest (label suggestions)

    add_suggest_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # before argparse, so `protoserve train --help` reaches training
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
