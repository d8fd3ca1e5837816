"""Parquet for ``protoserve score``: the job appends whole JSON lines to a sidecar (resumable,
never corrupt) and converts it to Parquet at the end (temporary file + rename). A re-run over a
finished Parquet output turns it back into the sidecar first, so its rows count as done.

pyarrow is optional (``pip install protoserve[parquet]``); only ``.parquet`` outputs need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MESSAGE = "a .parquet output needs pyarrow (pip install pyarrow); use .jsonl or .csv"


def require_pyarrow(error: type[Exception] = ImportError) -> Any:
    """``pyarrow.parquet``, or ``error(MESSAGE)`` when pyarrow is not installed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise error(MESSAGE) from None
    return pq


def jsonl_to_parquet(src: Path, dst: Path, chunk: int = 10_000) -> None:
    """Writes the JSON lines of ``src`` to ``dst`` in row groups of ``chunk`` rows."""
    pq = require_pyarrow()
    import pyarrow as pa

    tmp = dst.with_name(dst.name + ".tmp")
    writer = None
    try:
        with src.open(encoding="utf-8") as f:
            while True:
                rows = [json.loads(line) for _, line in zip(range(chunk), f, strict=False)]
                if not rows:
                    break
                table = pa.Table.from_pylist(rows)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        return
    os.replace(tmp, dst)


def parquet_to_jsonl(src: Path, dst: Path) -> None:
    """The rows of a Parquet file as JSON lines (fsynced, then renamed into place)."""
    pq = require_pyarrow()
    tmp = dst.with_name(dst.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for batch in pq.ParquetFile(str(src)).iter_batches():
            for row in batch.to_pylist():
                f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
