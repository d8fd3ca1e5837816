"""A protoserve server in a subprocess, for the benchmarks: start it, wait for its port, stop it.

``server_process(flags, tmp)`` runs ``python -m server.grpc.app`` with one ``--flag value`` per
entry of ``flags`` (``ServerConfig`` field names), behind ``prefix`` (e.g. ``taskset -c 0``),
logging to ``tmp``; it yields the gRPC address and the /metrics URL (``flags`` must name a
``metrics_port``: ``free_port()``), and on exit sends SIGTERM and waits.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "server_process"]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(
    flags: dict[str, object], tmp: Path, prefix: Sequence[str] = ()
) -> Iterator[tuple[str, str]]:
    cmd = [*prefix, sys.executable, "-m", "server.grpc.app"]
    for name, value in flags.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    tmp.mkdir(parents=True, exist_ok=True)
    out_path, err_path = tmp / "server.out", tmp / "server.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            match = re.search(r"listening on [\d.]+:(\d+)", out_path.read_text())
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{err_path.read_text()[-2000:]}")
            else:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{flags['metrics_port']}/metrics"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"warning: server exited {proc.returncode}", file=sys.stderr)
