"""Structured logs: one JSON object per line with the call site's extra fields."""

from __future__ import annotations

import json
import logging

import pytest

from server.logs import JsonFormatter, configure


def test_json_lines_carry_extra_fields_and_tracebacks() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord(
        "server.grpc", logging.INFO, __file__, 1, "%s done", ("Classify",), None
    )
    rec.rpc, rec.code, rec.ms = "Classify", "OK", 1.5
    line = json.loads(fmt.format(rec))
    assert line["msg"] == "Classify done" and line["level"] == "INFO"
    assert line["logger"] == "server.grpc" and line["ts"].endswith("+00:00")
    assert (line["rpc"], line["code"], line["ms"]) == ("Classify", "OK", 1.5)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = json.loads(fmt.format(rec))
    assert "ValueError: boom" in line["exc"]


def test_configure_validates_and_replaces_handlers() -> None:
    root = logging.getLogger()
    before = root.handlers[:], root.level
    try:
        configure("json", "warning")
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        with pytest.raises(ValueError, match="json or text"):
            configure("xml")
    finally:
        root.handlers[:], _ = before
        root.setLevel(before[1])
