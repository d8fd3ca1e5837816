"""The committed generated code is what ``python -m server.grpc.gen.generate`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.grpc.gen import generate


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    written = generate.generate(tmp_path)
    assert len(written) == 3
    for path in written:
        committed = generate.GEN_DIR / path.relative_to(tmp_path)
        assert path.read_text() == committed.read_text(), f"{committed} is stale: regenerate it"


def test_generated_code_imports_without_sys_path_changes() -> None:
    from server.grpc.gen.protoserve.v1 import protoserve_pb2, protoserve_pb2_grpc

    assert protoserve_pb2_grpc.protoserve_dot_v1_dot_protoserve__pb2 is protoserve_pb2
    assert "Protoserve" in protoserve_pb2.DESCRIPTOR.services_by_name
