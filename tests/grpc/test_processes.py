"""``serve --processes N``: worker processes on one port and one data dir, under a supervisor."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from server.config import ServerConfig
from server.grpc.app import build_server
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.processes import cpu_groups, resolve_processes
from server.registry import FailedPrecondition, Registry
from tests.grpc.support import (
    ROOT,
    Subprocess,
    create,
    free_port,
    needs_run,
    register,
    training_images,
)


def test_cpu_groups() -> None:
    assert cpu_groups([0, 1], 2) == [[0], [1]]
    assert cpu_groups([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert cpu_groups([2, 5, 7], 3) == [[2], [5], [7]]
    assert cpu_groups([0, 1], 3) == [None, None, None]  # more workers than CPUs: no pinning


def test_automatic_processes_follow_the_cpus() -> None:
    cfg = ServerConfig(processes=0, model_repo=ROOT / "models")
    assert resolve_processes(cfg) == len(os.sched_getaffinity(0))
    assert resolve_processes(ServerConfig(processes=3, model_repo=ROOT / "models")) == 3


def metric(url: str, name: str) -> dict[str, float]:
    """``name``'s samples: labels text -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :]] = float(value)
    return out


def workers_of(pid: int) -> list[int]:
    """The worker processes of supervisor ``pid`` (multiprocessing's spawned children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


@needs_run
def test_two_processes_share_registrations_and_survive_a_dead_worker(tmp_path: Path) -> None:
    imgs = [p.read_bytes() for p in training_images()]
    flags = ("--processes", "2", "--metrics-port", str(free_port()))
    server = Subprocess(tmp_path / "data", *flags)
    channels = []
    try:
        assert server.metrics_url is not None
        assert len(workers_of(server.proc.pid)) == 2
        assert metric(server.metrics_url, "protoserve_worker_up") == {
            '{worker="0"}': 1.0,
            '{worker="1"}': 1.0,
        }
        # The data dir is the workers': a lone server (or registry) may not open it.
        with pytest.raises(FailedPrecondition, match="in use"):
            Registry.open(tmp_path / "data")
        # Nor may a lone server share the port.
        port = int(server.address.rsplit(":", 1)[1])
        lone = ServerConfig(port=port, data_dir=tmp_path / "other", model_repo=ROOT / "models")
        with pytest.raises(OSError, match="cannot bind"):
            build_server(lone)

        stubs = []
        for _ in range(32):  # 32 connections: the kernel spreads them over both workers
            channel, stub = server.stub()
            channels.append(channel)
            stubs.append(stub)
        create(stubs[0], "run01")
        for i in range(6):
            # Registered through one connection, seen at once through every other one.
            register(stubs[i], "run01", f"c{i}", imgs[i])
            for stub in stubs:
                resp = stub.Classify(pb.ClassifyRequest(collection="run01", images=[imgs[i]]))
                labels = [p.label for p in resp.results[0].predictions]
                assert labels[0] == f"c{i}" and len(labels) == min(i + 1, 5), labels
        served = metric(server.metrics_url, "protoserve_requests_total")
        by_worker = {w: sum(v for k, v in served.items() if f'worker="{w}"' in k) for w in "01"}
        assert min(by_worker.values()) > 0, by_worker  # both workers answered

        # A worker killed outright is replaced; the server answers throughout.
        victim = workers_of(server.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = workers_of(server.proc.pid)
            if len(pids) == 2 and victim not in pids:
                up = metric(server.metrics_url, "protoserve_worker_up")
                if set(up.values()) == {1.0}:
                    break
            for stub in stubs[:2]:
                try:
                    stub.Classify(pb.ClassifyRequest(collection="run01", images=[imgs[0]]))
                except grpc.RpcError:
                    pass  # a connection to the dead worker fails; its client reconnects
            time.sleep(0.2)
        else:
            pytest.fail(f"worker not replaced: {server.log.read_text()[-3000:]}")
        assert metric(server.metrics_url, "protoserve_worker_restarts_total") == {"": 1.0}
        channel, stub = server.stub()
        channels.append(channel)
        classes = stub.ListClasses(pb.ListClassesRequest(collection="run01")).classes
        assert sorted(c.label for c in classes) == [f"c{i}" for i in range(6)]
        workers = workers_of(server.proc.pid)
        server.terminate()  # SIGTERM: every worker stops, the supervisor exits 0
        assert not [p for p in workers if Path(f"/proc/{p}").exists()]
    finally:
        for channel in channels:
            channel.close()
        server.kill()
