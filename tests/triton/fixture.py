"""Starts a real tritonserver on loopback ports and serves protoserve model folders on it.

The server runs in explicit model-control mode on an empty repository; ``serve(folder)``
writes one python-backend model per tower (``tests/triton/model.py`` running the tower's
ONNX file with onnxruntime) under the names ``server.runtimes.triton_rt`` expects and
loads it. One server thus serves any number of model folders for a whole test session.

The python-backend stub embeds libpython and ignores ``PYTHONPATH`` (isolated config), so
the environment decides which packages the models see: the running interpreter's ``bin``
directory goes first on ``PATH`` (the embedded interpreter finds ``python3`` there and so
the venv's ``pyvenv.cfg`` and site-packages), and that interpreter's shared libpython goes
on ``LD_LIBRARY_PATH`` (otherwise the loader may pick another build of Python 3.x).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from server.model_repo import ModelFolder
from server.runtimes.triton_rt import triton_model_name
from tests.triton.install import backends_dir

MODEL_PY = Path(__file__).with_name("model.py")


class TritonServerError(RuntimeError):
    """The test server failed to start or to load a model (the message has its log)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p
        )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def python_backend_config(
    source: str, name: str, onnx: Path, max_batch_size: int | None = None
) -> str:
    """A tower's onnxruntime config.pbtxt rewritten for the python backend."""
    cfg = text_format.Parse(source, model_config_pb2.ModelConfig())
    cfg.name = name
    cfg.ClearField("platform")
    cfg.backend = "python"
    if max_batch_size is not None:
        cfg.max_batch_size = max_batch_size
    if cfg.max_batch_size > 0 and not cfg.HasField("dynamic_batching"):
        cfg.dynamic_batching.SetInParent()
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.parameters["onnx_path"].string_value = str(onnx.resolve())
    return str(text_format.MessageToString(cfg))


class TritonServer:
    """A tritonserver process; ``url`` is its gRPC address (``127.0.0.1:port``)."""

    def __init__(self, binary: Path, workdir: Path, *, startup_timeout_s: float = 60.0) -> None:
        self.binary = binary
        self.repo = workdir / "models"
        self.repo.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "tritonserver.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.startup_s = 0.0

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _fail(self, message: str) -> TritonServerError:
        return TritonServerError(
            f"{message}\n--- tritonserver log ({self.log_path}) ---\n{self.log_tail()}"
        )

    def start(self) -> TritonServer:
        for _ in range(3):  # a free port can be taken before the server binds it
            if self._start_once():
                return self
        raise self._fail("tritonserver could not bind its ports")

    def _start_once(self) -> bool:
        grpc, http, metrics = free_port(), free_port(), free_port()
        cmd = [
            str(self.binary), "--model-repository", str(self.repo),
            "--backend-directory", str(backends_dir(self.binary)),
            "--model-control-mode", "explicit", "--exit-timeout-secs", "5",
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
            "--http-address", "127.0.0.1", "--http-port", str(http),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
            "--allow-gpu-metrics", "false", "--pinned-memory-pool-byte-size", "0",
        ]  # fmt: skip
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
            )
        self.url = f"127.0.0.1:{grpc}"
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while time.monotonic() - t0 < self.startup_timeout_s:
                if self.proc.poll() is not None:
                    if "already in use" in self.log_tail(200):
                        return False
                    raise self._fail(f"tritonserver exited with {self.proc.returncode}")
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        self.startup_s = time.monotonic() - t0
                        return True
                except InferenceServerException:
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise self._fail(f"tritonserver not ready after {self.startup_timeout_s:.0f} s")

    def serve_tower(
        self, name: str, config: str | Path, onnx: Path, *, max_batch_size: int | None = None
    ) -> str:
        """Writes and loads Triton model ``name`` running ``onnx``; ``config`` is the
        tower's onnxruntime config.pbtxt (its text or path)."""
        source = config.read_text() if isinstance(config, Path) else config
        folder = self.repo / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL_PY, folder / "1" / "model.py")
        text = python_backend_config(source, name, onnx, max_batch_size)
        (folder / "config.pbtxt").write_text(text)
        client = grpcclient.InferenceServerClient(self.url)
        try:
            client.load_model(name, client_timeout=self.startup_timeout_s)
            if not client.is_model_ready(name, client_timeout=5.0):
                raise self._fail(f"model {name!r} loaded but is not ready")
        except InferenceServerException as e:
            raise self._fail(f"tritonserver cannot load {name!r}: {e.message()}") from e
        finally:
            client.close()
        return name

    def serve(self, model: ModelFolder, *, max_batch_size: int | None = None) -> dict[str, str]:
        """Serves every tower of ``model``; returns tower -> Triton model name."""
        towers = list(model.manifest.towers)
        with concurrent.futures.ThreadPoolExecutor(len(towers)) as pool:
            names = pool.map(
                lambda t: self.serve_tower(
                    triton_model_name(model.name, t),
                    model.path / t / "config.pbtxt",
                    model.tower_path(t),
                    max_batch_size=max_batch_size,
                ),
                towers,
            )
            return dict(zip(towers, names, strict=True))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its python stubs
            proc.wait(timeout=10)
