"""The client commands of ``protoserve`` (``server.cli.main``) against a real server:
in-process for most, and once against ``protoserve serve`` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import main
from tests.grpc.support import MODEL, ROOT, RUN, Running, run01_error, truth

pytestmark = pytest.mark.skipif(not RUN.is_dir(), reason=f"no Omniglot sample run at {RUN}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    running = Running(tmp_path / "data")
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def register_and_classify(capsys: pytest.CaptureFixture[str], srv: str) -> None:
    rc, out, _ = run(capsys, "collections", "create", "run01", "--model", MODEL, "--server", srv)
    assert rc == 0 and "run01" in out and "prototype/l2" in out
    for f in sorted((RUN / "training").glob("*.png")):
        rc, out, err = run(
            capsys, "register", "--collection", "run01", "--class", f.stem, str(f), "--server", srv
        )
        assert rc == 0, err
        assert f"run01/{f.stem}: added 1 supports" in out
    tests = sorted((RUN / "test").glob("*.png"))
    rc, out, err = run(
        capsys,
        "classify",
        "--collection",
        "run01",
        *map(str, tests),
        "--top-k",
        "3",
        "--json",
        "--server",
        srv,
    )
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["image"] for d in lines] == [str(t) for t in tests]
    wanted = truth()
    wrong = 0
    for d in lines:
        assert set(d) == {"image", "predictions", "entropy", "margin", "unknown"}
        assert len(d["predictions"]) == 3
        assert set(d["predictions"][0]) == {"label", "score", "probability"}
        probs = [p["probability"] for p in d["predictions"]]
        assert probs == sorted(probs, reverse=True)
        assert d["margin"] == pytest.approx(probs[0] - probs[1], abs=1e-5)
        assert d["entropy"] >= 0 and d["unknown"] is False
        wrong += d["predictions"][0]["label"] != wanted[Path(d["image"]).name]
    assert 100.0 * wrong / len(lines) == run01_error()


def test_cli_end_to_end_on_run01(capsys: pytest.CaptureFixture[str], server: str) -> None:
    register_and_classify(capsys, server)

    # add a second support to an existing class, human-readable output
    extra = sorted((RUN / "test").glob("*.png"))[0]
    rc, out, _ = run(
        capsys, "register", "--collection", "run01", "--class", "class01", str(extra),
        "--server", server,
    )  # fmt: skip
    assert rc == 0 and "now 2 images, 0 texts" in out
    rc, out, _ = run(capsys, "classify", "--collection", "run01", str(extra), "--server", server)
    assert rc == 0 and out.startswith(f"{extra}: class01  [")

    rc, out, _ = run(capsys, "collections", "list", "--server", server)
    assert rc == 0 and "run01: model omniglot-protonet" in out and "20 classes, 21 supports" in out
    rc, out, _ = run(capsys, "collections", "list", "--json", "--server", server)
    (d,) = [json.loads(line) for line in out.splitlines()]
    assert (d["name"], d["class_count"], d["support_count"]) == ("run01", 20, 21)
    rc, out, _ = run(capsys, "collections", "get", "run01", "--server", server)
    assert rc == 0 and "class01: 2 images, 0 texts" in out

    rc, out, _ = run(
        capsys, "collections", "create", "open", "--model", MODEL, "--method", "knn",
        "--metric", "cosine", "--threshold", "0.9", "--server", server,
    )  # fmt: skip
    assert rc == 0 and "knn/cosine, threshold 0.9" in out
    rc, out, _ = run(capsys, "collections", "delete", "run01", "open", "--server", server)
    assert rc == 0 and out.splitlines() == ["deleted run01", "deleted open"]
    rc, out, _ = run(capsys, "collections", "list", "--server", server)
    assert rc == 0 and out.strip() == "no collections"


def test_cli_errors_exit_nonzero_with_the_servers_message(
    capsys: pytest.CaptureFixture[str], server: str, tmp_path: Path
) -> None:
    good = str(sorted((RUN / "training").glob("*.png"))[0])
    rc, out, err = run(capsys, "classify", "--collection", "nope", good, "--server", server)
    assert rc == 1 and out == ""
    assert err.startswith("protoserve classify: NOT_FOUND: ") and "nope" in err
    rc, _, err = run(capsys, "collections", "delete", "nope", "--server", server)
    assert rc == 1 and "NOT_FOUND" in err and "nope" in err

    assert run(capsys, "collections", "create", "c", "--model", MODEL, "--server", server)[0] == 0
    rc, _, err = run(capsys, "collections", "create", "c", "--model", MODEL, "--server", server)
    assert rc == 1 and "ALREADY_EXISTS" in err
    rc, _, err = run(capsys, "collections", "create", "d", "--model", "no-such", "--server", server)
    assert rc == 1 and "no-such" in err

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    rc, _, err = run(
        capsys, "register", "--collection", "c", "--class", "a", str(bad), "--server", server
    )
    assert rc == 1 and "INVALID_ARGUMENT" in err and str(bad) not in err  # server: "image 0"
    assert "image 0" in err
    run(capsys, "register", "--collection", "c", "--class", "a", good, "--server", server)
    rc, _, err = run(capsys, "classify", "--collection", "c", good, str(bad), "--server", server)
    assert rc == 1 and f"{bad} (image 1)" in err and "INVALID_ARGUMENT" in err
    missing = tmp_path / "missing.png"
    rc, _, err = run(capsys, "classify", "--collection", "c", str(missing), "--server", server)
    assert rc == 1 and str(missing) in err
    rc, _, err = run(
        capsys, "register", "--collection", "c", "--class", "cat", "--text", "a photo of a cat",
        "--server", server,
    )  # fmt: skip
    assert rc == 1 and "FAILED_PRECONDITION" in err and "text tower" in err
    rc, _, err = run(capsys, "register", "--collection", "c", "--class", "x", "--server", server)
    assert rc == 2 and "--text" in err

    # the server still answers
    rc, out, _ = run(capsys, "classify", "--collection", "c", good, "--json", "--server", server)
    assert rc == 0 and json.loads(out)["predictions"][0]["label"] == "a"


def test_cli_server_not_running_names_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    rc, out, err = run(capsys, "collections", "list", "--server", target, "--timeout", "10")
    assert rc == 1 and out == ""
    assert "UNAVAILABLE" in err and f"cannot reach protoserve at {target}" in err
    good = str(sorted((RUN / "training").glob("*.png"))[0])
    rc, _, err = run(capsys, "classify", "--collection", "c", good, "--server", target)
    assert rc == 1 and target in err


def test_cli_against_protoserve_serve_subprocess(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # a file, not a pipe: nothing can block the server's writes
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
             "--data-dir", str(tmp_path / "data"), "--model-repo", str(ROOT / "models")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while f"protoserve listening on 127.0.0.1:{port}" not in log.read_text():
            assert proc.poll() is None, f"protoserve serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
            time.sleep(0.1)
        register_and_classify(capsys, f"127.0.0.1:{port}")
        # A second server on the same port, or on the same data dir, says why and exits 1.
        for flags, why in (
            (["--port", str(port), "--data-dir", str(tmp_path / "other")], "cannot bind"),
            (["--port", str(port), "--data-dir", str(tmp_path / "o2"), "--processes", "2"],
             "cannot bind"),
            (["--port", str(free_port()), "--data-dir", str(tmp_path / "data")], "in use"),
        ):  # fmt: skip
            second = subprocess.run(
                [sys.executable, "-m", "server.cli", "serve", "--model-repo",
                 str(ROOT / "models"), *flags],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert second.returncode == 1, second.stderr[-2000:]
            assert "protoserve serve: " in second.stderr and why in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
