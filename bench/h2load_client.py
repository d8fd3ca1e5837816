"""A native load generator for ``bench/serving.py``: h2load (nghttp2) speaking gRPC.

The server and the load generator share this machine's cores, so every CPU second the client
spends is one the server does not get. The asyncio gRPC client costs about 0.3 ms of CPU per
call here (a twentieth of an image's work on the bundled model); h2load, written in C, a small
fraction of that: the role ghz or Triton's perf_analyzer play elsewhere.

A gRPC unary call is an HTTP/2 POST to ``/<service>/<method>`` with ``content-type:
application/grpc`` and ``te: trailers``, whose body is the length-prefixed message (one flag
byte, 0 = uncompressed, then the length as 4 bytes big-endian). h2load posts that body on
``concurrency`` streams of one connection (one gRPC channel with that many calls in flight, as
the Python client), a new call as soon as one ends.

h2load checks the HTTP status (always 200 for gRPC) but not ``grpc-status``, which travels in the
trailers; the caller checks that from the server's own counters (``grpc_errors``: the
``protoserve_requests_total`` samples of one RPC whose code is not OK, read from /metrics).

Install h2load with ``apt-get install nghttp2-client`` (Debian, Ubuntu) or ``make bench-tools``.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["H2Run", "grpc_errors", "h2load_path", "run_h2load", "unary_body"]


@dataclass(frozen=True)
class H2Run:
    requests: int  # completed in the measured window
    failed: int  # streams h2load saw fail (reset, HTTP status other than 2xx, timeout)
    seconds: float  # the measured window
    latencies_s: list[float]


def h2load_path() -> str | None:
    return shutil.which("h2load")


def unary_body(message: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def run_h2load(
    target: str,
    method: str,
    message: bytes,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    connections: int = 1,
) -> H2Run:
    """``concurrency`` calls of ``method`` (``/pkg.Service/Method``) in flight to ``target``
    (host:port) for ``seconds`` after ``warmup_s``, over ``connections`` connections (at most
    ``concurrency``; the calls split evenly, so ``concurrency`` should be a multiple);
    latencies from h2load's log."""
    clients = max(1, min(connections, concurrency))
    exe = h2load_path()
    if exe is None:
        raise RuntimeError("h2load not found: apt-get install nghttp2-client (or make bench-tools)")
    with tempfile.TemporaryDirectory(prefix="protoserve-h2load-") as tmp:
        body, log = Path(tmp) / "body.bin", Path(tmp) / "log.tsv"
        body.write_bytes(unary_body(message))
        cmd = [
            exe,
            f"--clients={clients}",
            f"--max-concurrent-streams={max(1, concurrency // clients)}",
            f"--duration={max(1, round(seconds))}",
            f"--warm-up-time={max(1, round(warmup_s))}",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"--log-file={log}",
            f"http://{target}{method}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return _parse(done.stdout, log.read_text(), max(1, round(seconds)))


def _parse(out: str, log: str, seconds: int) -> H2Run:
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed", out)
    if m is None:
        raise RuntimeError(f"cannot read h2load's summary:\n{out[-2000:]}")
    done, failed = int(m.group(1)), int(m.group(2))
    latencies = []
    for line in log.splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[1] != "-1":
            latencies.append(int(cols[2]) / 1e6)
    return H2Run(done - failed, failed, float(seconds), latencies)


def grpc_errors(metrics_url: str, rpc: str) -> int:
    """The server's count of ``rpc`` calls that ended with a status other than OK."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    pattern = re.compile(r"^protoserve_requests_total\{([^}]*)\} (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("rpc") == rpc and labels.get("code") != "OK":
            total += float(m.group(2))
    return int(total)
