"""Structured logs: one JSON object per line (``--log-format json``, the default for
``protoserve serve``) or the classic text format.

Fields: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``, plus any ``extra={...}``
given at the call site (the interceptor adds ``rpc``, ``code`` and ``ms``), and
``exc`` with the traceback when there is one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

# Attributes every LogRecord has: anything else came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(fmt: str = "json", level: str = "INFO", *, worker: int | None = None) -> None:
    """Installs one stderr handler on the root logger (replacing earlier ones). ``worker``:
    the index of a multi-process server's worker, added to every record (``"worker": N``)."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    tag = "" if worker is None else f"[worker {worker}] "
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s %(message)s")
    )
    if worker is not None:
        handler.addFilter(_WorkerTag(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _WorkerTag(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True
