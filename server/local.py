"""What the offline commands (``score``, ``suggest``) share: an in-process pipeline over a
data dir and a model repository, and one mapping from a job's exceptions to an exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from server.client import ProtoserveError

if TYPE_CHECKING:
    from server.pipeline import Pipeline


@contextmanager
def local_pipeline(
    data_dir: str | os.PathLike[str], model_repo: str | os.PathLike[str]
) -> Iterator[Pipeline]:
    """A ``Pipeline`` on the registry in ``data_dir`` (no server); closed on exit."""
    from server.model_repo import ModelRepository
    from server.pipeline import Pipeline
    from server.registry import Registry

    registry = Registry.open(data_dir)
    try:
        pipeline = Pipeline(registry, ModelRepository(Path(model_repo)))
        try:
            yield pipeline
        finally:
            pipeline.close()
    finally:
        registry.close()


def service_error_rc(prog: str, e: Exception) -> int | None:
    """Prints a server's (or the in-process pipeline's) error and returns exit status 1; None
    for any other exception, which the caller re-raises."""
    if isinstance(e, ProtoserveError):
        print(f"{prog}: {e.code}: {e.message}", file=sys.stderr)
        return 1
    code = getattr(e, "code", None)  # in-process: the pipeline's errors carry a gRPC-like code
    if not isinstance(code, str):
        return None
    print(f"{prog}: {code}: {e}", file=sys.stderr)
    return 1
