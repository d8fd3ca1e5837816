"""Regenerates the protobuf/gRPC modules from ``proto/``: ``python -m server.grpc.gen.generate``.

The generated files are committed. protoc writes absolute imports (``from protoserve.v1 import
...``); they are rewritten to ``server.grpc.gen.protoserve.v1`` so no ``sys.path`` change is
needed. ``--out DIR`` writes elsewhere (the test compares a fresh run with the committed files).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "proto"
GEN_DIR = Path(__file__).resolve().parent
PACKAGE = "server.grpc.gen"
PROTOS = ("protoserve/v1/protoserve.proto",)

_IMPORT = re.compile(r"^from protoserve(\.[\w.]+)? import ", re.MULTILINE)


def _fix_imports(text: str) -> str:
    return _IMPORT.sub(lambda m: f"from {PACKAGE}.protoserve{m.group(1) or ''} import ", text)


def generate(out: Path = GEN_DIR) -> list[Path]:
    """Runs protoc into ``out``; returns the files written (sorted)."""
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written: list[Path] = []
    for proto in PROTOS:
        pkg = out / Path(proto).parent
        for part in pkg.relative_to(out).parents[:-1] or ():
            (out / part / "__init__.py").touch()
        (pkg / "__init__.py").touch()
        stem = Path(proto).stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            path = pkg / name
            path.write_text(_fix_imports(path.read_text()))
            written.append(path)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GEN_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
