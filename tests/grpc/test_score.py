"""``protoserve score`` (``server.scoring``): batch offline scoring against a real server on
port 0 with run01's 20 training images registered, and in-process."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from server.client import ProtoserveClient
from server.scoring import CSV_FIELDS, _server_classify
from server.scoring import score as score_job
from tests.grpc.support import ROOT, RUN, Running, create, needs_run, register

pytestmark = needs_run

BROKEN = "sub/broken.png"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        self.running = Running(self.data)
        self.target = f"127.0.0.1:{self.running.port}"
        create(self.running.stub)
        for f in sorted((RUN / "training").glob("*.png")):
            register(self.running.stub, "run01", f.stem, f.read_bytes())
        # the input tree: test images at two levels, plus one broken "image"
        self.images = tmp / "images"
        tests = sorted((RUN / "test").glob("*.png"))
        (self.images / "sub").mkdir(parents=True)
        for i, t in enumerate(tests):
            shutil.copy(t, self.images / ("sub" if i % 2 else "") / t.name)
        (self.images / BROKEN).write_bytes(b"not an image at all")
        (self.images / "notes.txt").write_text("not listed: not an image extension")
        with ProtoserveClient(self.target) as c:
            results = c.classify("run01", tests, top_k=3)
        self.top1 = {t.name: r.top.label for t, r in zip(tests, results, strict=True)}

    def close(self) -> None:
        self.running.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("score"))
    try:
        yield e
    finally:
        e.close()


def score(env: Env, inp: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "score",
            "--collection",
            "run01",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--top-k",
            "3",
            "--batch",
            "4",
            "--concurrency",
            "3",
            *extra,
            *([] if "--in-process" in extra else ["--server", env.target]),
        ]
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check_rows(env: Env, rows: list[dict[str, Any]], n_good: int = 20) -> None:
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) == n_good and len(bad) == 1
    assert bad[0]["path"].endswith(BROKEN) and bad[0]["labels"] == []
    for r in good:
        assert r["label"] == r["labels"][0] == env.top1[Path(r["path"]).name]
        assert len(r["labels"]) == len(r["scores"]) == len(r["probabilities"]) == 3
        probs = r["probabilities"]
        assert probs == sorted(probs, reverse=True)
        assert r["margin"] == pytest.approx(probs[0] - probs[1], abs=1e-5)
        assert r["entropy"] >= 0 and r["unknown"] is False


def test_folder_to_jsonl(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert score(env, env.images, out) == 0
    rows = read_jsonl(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == 21 and len(set(paths)) == 21
    assert not any(p.endswith(".txt") for p in paths)
    check_rows(env, rows)
    # sorted, recursive walk: the root's files first, then sub/'s
    root_files = [p for p in paths if Path(p).parent == env.images]
    assert paths[: len(root_files)] == sorted(root_files)
    # a second run has nothing left to do and changes nothing
    before = out.read_bytes()
    assert score(env, env.images, out) == 0
    assert out.read_bytes() == before


def manifest_paths(env: Env) -> list[str]:
    return sorted(str(p.relative_to(env.images)) for p in env.images.rglob("*.png"))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_input_csv_output(env: Env, tmp_path: Path, kind: str) -> None:
    rel = manifest_paths(env)
    manifest = env.images / f"manifest.{kind}"  # relative paths: against the manifest's folder
    if kind == "csv":
        manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(rel)))
    else:
        manifest.write_text(
            "".join(json.dumps({"path": p, "id": i}) + "\n" for i, p in enumerate(rel))
        )
    out = tmp_path / "out.csv"
    try:
        assert score(env, manifest, out) == 0
    finally:
        manifest.unlink()
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_FIELDS
        raw = list(reader)
    assert [r["path"] for r in raw] == rel  # the manifest's values, in its order
    rows = [
        {
            **r,
            "labels": json.loads(r["labels"]),
            "scores": json.loads(r["scores"]),
            "probabilities": json.loads(r["probabilities"]),
            "entropy": float(r["entropy"]) if r["entropy"] else None,
            "margin": float(r["margin"]) if r["margin"] else None,
            "unknown": r["unknown"] == "True",
        }
        for r in raw
    ]
    check_rows(env, rows)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_resume_after_a_crash_mid_line(env: Env, tmp_path: Path, ext: str) -> None:
    out = tmp_path / f"out.{ext}"
    assert score(env, env.images, out) == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    cut = sum(len(line) for line in lines[:9]) + len(lines[9]) // 2  # mid-way through a row
    out.write_bytes(full[:cut])
    assert score(env, env.images, out) == 0
    again = out.read_bytes()
    assert again.endswith(b"\n")
    if ext == "jsonl":
        rows = read_jsonl(out)
        assert sorted(r["path"] for r in rows) == sorted(json.loads(x)["path"] for x in lines)
        check_rows(env, rows)
    else:
        with out.open(newline="") as f:
            raw = list(csv.DictReader(f))
        assert len(raw) == 21 and len({r["path"] for r in raw}) == 21
    assert sorted(again.splitlines()) == sorted(full.splitlines())  # same rows, each once


def test_parquet_needs_pyarrow(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert score(env, env.images, tmp_path / "out.parquet") == 2
    assert "needs pyarrow" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


def test_parquet_output_matches_jsonl(env: Env, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    assert score(env, env.images, tmp_path / "out.jsonl") == 0
    assert score(env, env.images, tmp_path / "out.parquet") == 0
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    check_rows(env, rows)
    by_path = {r["path"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert len(rows) == len(by_path) == 21
    for r in rows:
        ref = by_path[r["path"]]
        assert r["labels"] == ref["labels"] and r["error"] == ref["error"]
        assert r["scores"] == pytest.approx(ref["scores"], abs=1e-6)
    # re-running over a finished Parquet output rescores nothing and keeps every row
    with ProtoserveClient(env.target) as c:
        counts = score_job(_server_classify([c], "run01", 3), env.images, tmp_path / "out.parquet")
    assert counts == {"scored": 0, "errors": 0, "skipped": 21}
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == rows


def test_bad_arguments(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert score(env, tmp_path / "missing", tmp_path / "o.jsonl") == 2
    assert "does not exist" in capsys.readouterr().err
    assert score(env, env.images, tmp_path / "o.txt") == 2
    assert "extension" in capsys.readouterr().err
    rc = main(
        [
            "score",
            "--collection",
            "nope",
            "--input",
            str(env.images),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--server",
            env.target,
            "--no-progress",
        ]
    )
    assert rc == 1 and "NOT_FOUND" in capsys.readouterr().err


def test_in_process_matches_server(tmp_path: Path) -> None:
    e = Env(tmp_path)
    try:
        via_server = tmp_path / "server.jsonl"
        assert score(e, e.images, via_server) == 0
    finally:
        e.close()  # the in-process pipeline opens the same registry
    local = tmp_path / "local.jsonl"
    extra = ["--in-process", "--data-dir", str(e.data), "--model-repo", str(ROOT / "models")]
    assert score(e, e.images, local, *extra) == 0
    a, b = read_jsonl(via_server), read_jsonl(local)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["labels"] == y["labels"]
        assert (x["error"] is None) == (y["error"] is None)
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-5)
        assert x["entropy"] == pytest.approx(y["entropy"], abs=1e-5)
    check_rows(e, b)
