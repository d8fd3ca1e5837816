"""Builds and runs the gRPC server: ``build_server(cfg) -> (server, port)``; ``serve(cfg)``.

The server carries the Protoserve service behind ``ErrorInterceptor``, grpc.health.v1 health
checking and server reflection. ``ProtoserveServer.stop(grace)`` marks health NOT_SERVING,
lets in-flight requests finish for ``grace`` seconds, then drains the batchers and closes the
registry.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import ConfigError, ServerConfig, add_serve_arguments, config_from_args
from server.grpc import kserve_v2
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.gen.protoserve.v1 import protoserve_pb2_grpc as pb_grpc
from server.grpc.interceptors import ErrorInterceptor
from server.grpc.processes import resolve_processes, serve_processes
from server.grpc.service import ProtoserveServicer
from server.metrics import Metrics
from server.model_repo import ModelRepository
from server.pipeline import Pipeline, PipelineOptions
from server.registry import Registry
from server.runtimes.onnx_rt import OnnxConfig

__all__ = ["SERVICE_NAME", "ProtoserveServer", "build_server", "serve", "wait_for_signal"]

log = logging.getLogger(__name__)
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Protoserve"].full_name


class ProtoserveServer:
    """A started-or-not gRPC server with the pipeline and registry it owns."""

    def __init__(
        self,
        server: grpc.Server,
        pipeline: Pipeline,
        health_servicer: health.HealthServicer,
        metrics: Metrics | None = None,
        metrics_address: tuple[str, int] | None = None,
    ) -> None:
        self.grpc_server = server
        self.pipeline = pipeline
        self.health = health_servicer
        self.metrics = metrics
        self._metrics_address = metrics_address
        self.metrics_port: int | None = None  # the HTTP port bound, once started
        self._stopped = False
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        if self.metrics is not None and self._metrics_address is not None:
            self.metrics_port = self.metrics.start_http(*self._metrics_address)
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Refuses new RPCs, finishes in-flight ones (up to ``grace`` s), then closes state."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.pipeline.close()
        self.pipeline.registry.close()
        if self.metrics is not None:
            self.metrics.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def build_server(
    cfg: ServerConfig, *, shared: bool = False, metrics_host: str | None = None
) -> tuple[ProtoserveServer, int]:
    """A server bound to ``cfg.host:cfg.port`` (not started); the port actually bound.

    ``shared``: one worker of a multi-process server (``server.grpc.processes``): the registry
    follows the other workers' changes, the port is shared (SO_REUSEPORT), and metrics, if on,
    go to a free port on ``metrics_host`` for the supervisor to merge. A lone server binds its
    port exclusively, so a second server on the same port fails instead of sharing it.
    """
    models = ModelRepository(cfg.model_repo)
    registry = Registry.open(cfg.data_dir, shared=shared)
    try:
        pipeline = Pipeline(
            registry,
            models,
            PipelineOptions(
                max_batch_size=cfg.max_batch_size,
                max_delay_s=cfg.max_delay_ms / 1000.0,
                max_queue=cfg.max_queue,
                decode_threads=cfg.decode_threads,
                model_instances=cfg.model_instances,
                max_images_per_request=cfg.max_images_per_request,
                max_pixels=cfg.max_pixels,
                max_classes_per_collection=cfg.max_classes_per_collection,
            ),
            onnx_config=OnnxConfig(run_batch=cfg.run_batch),
        )
        metrics = Metrics(pipeline)
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 1 if shared else 0),
        ]
        server = grpc.server(
            ThreadPoolExecutor(cfg.workers, thread_name_prefix="grpc"),
            interceptors=[ErrorInterceptor(metrics)],
            options=options,
        )
        pb_grpc.add_ProtoserveServicer_to_server(  # type: ignore[no-untyped-call]
            ProtoserveServicer(pipeline), server
        )
        kserve_v2.add_to_server(pipeline, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError:  # grpc's "Failed to bind" (newer grpcio raise, older return 0)
            port = 0
        if port == 0:
            raise OSError(f"cannot bind {cfg.host}:{cfg.port}: in use, or not an address here")
    except BaseException:
        registry.close()
        raise
    address = None
    if cfg.metrics_port:
        address = (cfg.host, cfg.metrics_port) if metrics_host is None else (metrics_host, 0)
    return ProtoserveServer(server, pipeline, health_servicer, metrics, address), port


def serve(cfg: ServerConfig, log_cfg: tuple[str, str] = ("json", "INFO")) -> int:
    """Runs until SIGINT/SIGTERM, then shuts down gracefully (``cfg.grace_s``).

    With ``processes`` other than 1, as a supervisor of that many worker processes
    (``server.grpc.processes``; ``log_cfg`` = (format, level) for their logs).
    """
    n = resolve_processes(cfg)
    if n > 1:
        return serve_processes(cfg, n, log_cfg)
    server, port = build_server(cfg)
    server.start()
    log.info("protoserve listening on %s:%d (data %s)", cfg.host, port, cfg.data_dir)
    if server.metrics_port is not None:
        print(f"metrics on http://{cfg.host}:{server.metrics_port}/metrics", flush=True)
    print(f"protoserve listening on {cfg.host}:{port}", flush=True)
    signum = wait_for_signal()
    log.info("signal %d: stopping (grace %.1f s)", signum, cfg.grace_s)
    server.stop(cfg.grace_s)
    return 0


def wait_for_signal(poll: Callable[[], None] | None = None, every_s: float = 0.1) -> int:
    """Blocks until SIGINT or SIGTERM (handlers installed here) and returns its number;
    calls ``poll`` every ``every_s`` meanwhile (its exceptions propagate)."""
    # A plain list: Event.set() inside a signal handler can deadlock against the main thread's
    # own Event.wait() (both take the event's non-reentrant lock).
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while not stopping:
        time.sleep(every_s)
        if poll is not None and not stopping:
            poll()
    return stopping[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m server.grpc.app [--config FILE] [--port N] ...``: ``serve`` from flags."""
    parser = argparse.ArgumentParser(prog="python -m server.grpc.app", description=serve.__doc__)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
