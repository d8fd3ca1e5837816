"""What one unary gRPC call costs in Python, with no model behind it: the floor under
bench/serving.py's per-request overhead.

    python bench/grpc_overhead.py [--seconds 3] [--concurrency 32] [--payload 300] [--rounds 2]

Each server runs in a subprocess and answers ``/bench.Echo/Call`` with the first 64 bytes of
the request (a 300-byte payload is one run01 PNG): the thread-pool server protoserve uses
(``grpc.server`` + ``ThreadPoolExecutor(--workers)``) and the asyncio server (``grpc.aio``).
One asyncio client keeps ``--concurrency`` calls in flight. Reported per call: the server
process's CPU time (user + system from /proc) and the client's, and calls/s; the servers run
in alternating rounds and the best round of each is kept, with the ratio aio / thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

METHOD = "/bench.Echo/Call"
KINDS = ("threads", "aio")


def _handlers(fn: object) -> tuple[grpc.GenericRpcHandler, ...]:
    method = grpc.unary_unary_rpc_method_handler(fn)  # type: ignore[arg-type]
    return (grpc.method_handlers_generic_handler("bench.Echo", {"Call": method}),)


def serve(kind: str, workers: int) -> None:
    """Serves on a free loopback port and prints it once listening."""
    if kind == "threads":
        server = grpc.server(ThreadPoolExecutor(workers))
        server.add_generic_rpc_handlers(_handlers(lambda req, ctx: req[:64]))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        server.wait_for_termination()
        return

    async def echo(req: bytes, ctx: object) -> bytes:
        return req[:64]

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(_handlers(echo))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def process_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, concurrency: int, seconds: float, payload: bytes) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)
        await channel.channel_ready()
        for _ in range(100):
            await call(payload)
        calls, stop = 0, time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal calls
            while time.perf_counter() < stop:
                await call(payload)
                calls += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls


def measure(kind: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(calls/s, server CPU us per call, client CPU us per call) for one round."""
    cmd = [sys.executable, __file__, "--serve", kind, "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())  # printed once the server listens
        payload = os.urandom(args.payload)
        asyncio.run(load(port, args.concurrency, 0.3, payload))  # warm-up
        server0, client0, t0 = process_cpu_s(proc.pid), time.process_time(), time.perf_counter()
        calls = asyncio.run(load(port, args.concurrency, args.seconds, payload))
        wall = time.perf_counter() - t0
        server = process_cpu_s(proc.pid) - server0
        client = time.process_time() - client0
        return calls / wall, 1e6 * server / calls, 1e6 * client / calls
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--payload", type=int, default=300, help="request bytes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=64, help="thread-pool server threads")
    p.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.workers)
        return 0
    best: dict[str, tuple[float, float, float]] = {}
    for r in range(args.rounds):
        for kind in KINDS:
            got = measure(kind, args)
            print(f"# round {r + 1} {kind}: {got[0]:.0f} calls/s, server {got[1]:.0f} us CPU/call")
            if kind not in best or got[1] < best[kind][1]:
                best[kind] = got
    n, size = args.concurrency, args.payload
    print(f"\n{n} calls in flight, {size}-byte requests, best of {args.rounds} rounds")
    print("| server | calls/s | server CPU us/call | client CPU us/call |")
    print("|---|---:|---:|---:|")
    for kind, (rate, server, client) in best.items():
        print(f"| {kind} | {rate:.0f} | {server:.0f} | {client:.0f} |")
    ratio = best["aio"][1] / best["threads"][1]
    print(f"\nserver CPU per call, aio / thread pool: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
