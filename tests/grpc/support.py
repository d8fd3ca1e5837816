"""Shared helpers for the gRPC tests: an in-process server with any ``ServerConfig`` fields."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.config import ServerConfig
from server.grpc.app import ProtoserveServer, build_server
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.gen.protoserve.v1 import protoserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
MODEL = "omniglot-protonet"
RUN = ROOT.parent / "shared" / "data" / "omniglot" / "sample_run" / "run01"


@functools.cache
def run01_error() -> float:
    """The default model's error on run01 as `protoserve train eval-runs` scores it offline."""
    from training.runs import eval_runs

    (result,) = eval_runs(ROOT / "models" / MODEL, RUN)
    return result.error


@functools.cache
def model_shape() -> tuple[int, int, int]:
    """The default model's (input height, input width, embedding dim), from its manifest."""
    from server.model_repo import load_model

    manifest = load_model(ROOT / "models" / MODEL).manifest
    height, width = manifest.preprocess["size"]
    return int(height), int(width), int(manifest.embedding_dim)


def truth() -> dict[str, str]:
    """test file name -> label (the training file's stem)."""
    out = {}
    for line in (RUN / "class_labels.txt").read_text().splitlines():
        if line.strip():
            test, train = line.split()
            out[Path(test).name] = Path(train).stem
    return out


needs_run = pytest.mark.skipif(not RUN.is_dir(), reason=f"no Omniglot sample run at {RUN}")


class Running:
    def __init__(self, data_dir: Path, **cfg: Any) -> None:
        cfg.setdefault("workers", 4)
        cfg.setdefault("model_repo", ROOT / "models")
        self.cfg = ServerConfig(port=0, data_dir=data_dir, **cfg)
        self.server: ProtoserveServer
        self.server, self.port = build_server(self.cfg)
        self.server.start()
        opts = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=opts)
        self.stub = pb_grpc.ProtoserveStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=5)


class Subprocess:
    """``python -m server.grpc.app`` on a free port over ``data_dir`` (log beside it)."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        cmd = [sys.executable, "-m", "server.grpc.app", "--port", "0", "--workers", "16"]
        cmd += ["--data-dir", str(data_dir), "--model-repo", str(ROOT / "models"), *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = data_dir.parent / "server.log"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
        assert self.proc.stdout is not None
        self.metrics_url: str | None = None
        match, line = None, ""
        for line in self.proc.stdout:
            if line.startswith("metrics on "):
                self.metrics_url = line.split()[-1]
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                break
        assert match, f"server did not start: {line!r}\n{self.log.read_text()[-3000:]}"
        self.address = f"127.0.0.1:{match.group(1)}"

    def stub(self) -> tuple[grpc.Channel, pb_grpc.ProtoserveStub]:
        """A channel on a connection of its own (not shared with other channels)."""
        channel = grpc.insecure_channel(
            self.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        return channel, pb_grpc.ProtoserveStub(channel)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def training_images() -> list[Path]:
    return sorted((RUN / "training").glob("*.png"))


def create(stub: pb_grpc.ProtoserveStub, name: str = "run01") -> pb.Collection:
    return stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name=name, model=MODEL))
    )


def register(stub: pb_grpc.ProtoserveStub, name: str, label: str, *images: bytes) -> Any:
    return stub.RegisterClass(
        pb.RegisterClassRequest(
            collection=name, label=label, supports=[pb.Support(image=i) for i in images]
        )
    )


def still_serving(stub: pb_grpc.ProtoserveStub, name: str = "run01") -> None:
    """The server answers a good Classify after whatever went wrong before."""
    img = training_images()[0].read_bytes()
    resp = stub.Classify(pb.ClassifyRequest(collection=name, images=[img]))
    assert len(resp.results) == 1 and resp.results[0].predictions


def fails(call: Any, code: grpc.StatusCode, *words: str) -> None:
    """``call()`` raises an RpcError with status ``code`` whose details contain ``words``."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in e.value.details(), e.value.details()
