"""A multi-process server: ``protoserve serve --processes N`` (0: one per CPU).

One Python process serves its gRPC handlers, its image decoding and its batchers under one
GIL; on a small CPU-bound machine the threads queue for it (on 2 cores, two pinned worker
processes serve 7-10% more images/s to 32 clients than one process: docs/serving-bench.md).
Here a supervisor starts
``N`` worker processes, each a complete server (``build_server``) over the same data dir and
the same port:

* **One port.** Every worker binds ``host:port`` with ``SO_REUSEPORT``, so the kernel spreads
  incoming *connections* across them (a client's channel stays on one worker; many clients
  spread). The supervisor holds the port bound (not listening) for its whole life, so a
  restarted worker gets it back and ``--port 0`` means one free port for all.
* **One state.** Workers open the registry in shared mode (``server.registry``): each change
  is committed with a change-log row, and every read first checks SQLite's ``data_version``,
  so a registration acknowledged by one worker is seen by the next Classify on any worker.
* **CPUs.** Where there are at least ``N`` CPUs, each worker is pinned to its own share
  (``sched_setaffinity``), and its automatic threads and model instances follow that share.
* **Life cycle.** The supervisor waits for every worker to load its models before it reports
  the server up, restarts a worker that dies (and gives up, stopping the server, if workers
  die more than ``MAX_RESTARTS`` times in ``RESTART_WINDOW_S``), and on SIGINT/SIGTERM passes
  SIGTERM on: each worker stops gracefully (``grace_s``). Workers die with the supervisor
  (``PR_SET_PDEATHSIG``), so none is left holding the port.
* **Metrics.** The supervisor's ``/metrics`` merges the workers' (``worker_metrics``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from server.config import ServerConfig
from server.grpc.worker_metrics import WorkerMetrics
from server.runtimes.base import available_cpus

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW_S", "cpu_groups", "resolve_processes", "serve_processes"]

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that has gRPC threads


def resolve_processes(cfg: ServerConfig) -> int:
    """``cfg.processes``, with 0 (automatic) as one per CPU this process may use."""
    return cfg.processes or available_cpus()


def cpu_groups(cpus: list[int], n: int) -> list[list[int] | None]:
    """``n`` disjoint, contiguous, near-equal shares of ``cpus``; ``None`` each (no pinning)
    when there are fewer CPUs than workers."""
    if n > len(cpus):
        return [None] * n
    size, extra = divmod(len(cpus), n)
    out: list[list[int] | None] = []
    start = 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(cpus[start:end])
        start = end
    return out


@dataclass
class _Worker:
    index: int
    cpus: list[int] | None
    process: BaseProcess | None = None
    metrics_port: int | None = None


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening: it keeps the port
    for the workers (and fails now, clearly, if another program holds it)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


def _worker_main(
    cfg: ServerConfig,
    index: int,
    cpus: list[int] | None,
    conn: Connection,
    log_cfg: tuple[str, str],
    parent: int,
) -> None:
    """A worker process: pinned, its own complete server, until SIGTERM/SIGINT."""
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        return
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    from server import logs
    from server.grpc.app import build_server, wait_for_signal

    logs.configure(*log_cfg, worker=index)
    try:
        server, _ = build_server(cfg, shared=True, metrics_host="127.0.0.1")
        server.start()
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("ready", server.metrics_port))
    conn.close()
    signum = wait_for_signal()
    log.info("signal %d: stopping worker %d (grace %.1f s)", signum, index, cfg.grace_s)
    server.stop(cfg.grace_s)


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts, watches and stops the workers of one multi-process server."""

    def __init__(self, cfg: ServerConfig, n: int, log_cfg: tuple[str, str]) -> None:
        self.cfg = cfg
        self.log_cfg = log_cfg
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.workers = [_Worker(i, g) for i, g in enumerate(cpu_groups(cpus, n))]
        self.restarts = 0
        self._http: WSGIServer | None = None
        self._deaths: list[float] = []
        self._sock = _reserve_port(cfg.host, cfg.port)
        self.port = int(self._sock.getsockname()[1])
        # Workers serve metrics on loopback ports of their own when the server has metrics.
        self._worker_cfg = replace(cfg, port=self.port, processes=1)

    def start(self, workers: list[_Worker]) -> None:
        """Starts ``workers`` side by side and waits until each serves (its models loaded);
        raises if one fails."""
        pending = [(w, self._launch(w)) for w in workers]
        for w, conn in pending:
            self._await(w, conn)

    def _launch(self, worker: _Worker) -> Connection:
        parent, child = _SPAWN.Pipe(duplex=False)
        args = (self._worker_cfg, worker.index, worker.cpus, child, self.log_cfg, os.getpid())
        proc = _SPAWN.Process(
            target=_worker_main, args=args, name=f"protoserve-worker-{worker.index}"
        )
        proc.start()
        child.close()
        worker.process, worker.metrics_port = proc, None
        return parent

    def _await(self, worker: _Worker, conn: Connection) -> None:
        proc = worker.process
        assert proc is not None
        died = f"worker {worker.index} exited while starting"
        try:
            while not conn.poll(0.2):
                if not proc.is_alive():
                    raise RuntimeError(f"{died} (code {proc.exitcode})")
            kind, value = conn.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"{died} (code {proc.exitcode})") from None
        finally:
            conn.close()
        if kind != "ready":
            proc.join(5)
            raise RuntimeError(f"worker {worker.index} failed to start: {value}")
        worker.metrics_port = value if self.cfg.metrics_port else None
        where = "" if worker.cpus is None else f", CPUs {worker.cpus}"
        log.info("worker %d (pid %d%s) serving", worker.index, proc.pid, where)

    def start_metrics(self) -> int | None:
        if not self.cfg.metrics_port:
            return None
        registry = CollectorRegistry()
        registry.register(
            WorkerMetrics(
                lambda: [(w.index, w.metrics_port) for w in self.workers], lambda: self.restarts
            )
        )
        self._http, _ = start_http_server(
            self.cfg.metrics_port, addr=self.cfg.host, registry=registry
        )
        return int(self._http.server_address[1])

    def check(self) -> None:
        """Restarts workers that died; raises after too many deaths in the window."""
        for w in self.workers:
            if w.process is None or w.process.is_alive():
                continue
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            log.error(
                "worker %d (pid %s) died with code %s", w.index, w.process.pid, w.process.exitcode
            )
            if len(self._deaths) > MAX_RESTARTS:
                raise RuntimeError(
                    f"{len(self._deaths)} worker deaths within {RESTART_WINDOW_S:.0f} s: giving up"
                )
            self.restarts += 1
            try:
                self.start([w])
            except RuntimeError as e:  # counted as another death at the next check
                log.error("%s", e)

    def stop(self) -> None:
        """SIGTERM to every worker; waits ``grace_s`` (+5 s) for them, then kills the rest."""
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                w.process.terminate()  # SIGTERM: a graceful stop
        deadline = time.monotonic() + self.cfg.grace_s + 5.0
        for w in self.workers:
            if w.process is None:
                continue
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("worker %d did not stop in time: killing it", w.index)
                w.process.kill()
                w.process.join()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._sock.close()


def serve_processes(cfg: ServerConfig, n: int, log_cfg: tuple[str, str] = ("json", "INFO")) -> int:
    """Runs ``n`` workers until SIGINT/SIGTERM; 0 on a clean stop, 1 if workers kept dying."""
    from server.grpc.app import wait_for_signal

    sup = Supervisor(cfg, n, log_cfg)
    try:
        sup.start(sup.workers)
        metrics_port = sup.start_metrics()
        if metrics_port is not None:
            print(f"metrics on http://{cfg.host}:{metrics_port}/metrics", flush=True)
        print(f"protoserve listening on {cfg.host}:{sup.port} ({n} processes)", flush=True)
        signum = wait_for_signal(poll=sup.check, every_s=0.25)
        log.info("signal %d: stopping %d workers (grace %.1f s)", signum, n, cfg.grace_s)
        return 0
    except RuntimeError as e:
        log.error("%s", e)
        print(f"protoserve serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.stop()
