"""The server's configuration: one validated dataclass (``ServerConfig.validate`` at start-up).

``ServerConfig.load(path, env, overrides)`` merges, lowest first: the defaults below, a TOML or
JSON file (top-level keys, or a ``[server]`` table, named as the fields), ``PROTOSERVE_<FIELD>``
environment variables (``PROTOSERVE_PORT=50052``; ``PROTOSERVE_CONFIG`` names the file when no
path is given), then ``overrides`` (the command-line flags; ``None`` means "not given").
Anything unknown or malformed is a ``ConfigError`` naming the setting and where it came from.
``add_serve_arguments`` / ``config_from_args`` give a CLI the matching flags.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["ENV_PREFIX", "ConfigError", "ServerConfig", "add_serve_arguments", "config_from_args"]

ENV_PREFIX = "PROTOSERVE_"


class ConfigError(ValueError):
    """A configuration value out of range; the message names the setting."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    data_dir: Path = Path("data")
    model_repo: Path = Path("models")
    metrics_port: int = 0  # Prometheus /metrics on this HTTP port; 0: off
    max_batch_size: int = 32
    # How long the batcher may hold a request to fill a batch. 0 (Triton's default too): run
    # as soon as the model is free; requests arriving while it runs form the next batch.
    # Measured here (bench/serving.py): same throughput as 5 ms from 8 clients up, and 3.6x
    # the throughput, a quarter of the latency, for a lone client.
    max_delay_ms: float = 0.0
    max_queue: int = 1024  # images waiting per model's batcher; beyond: RESOURCE_EXHAUSTED
    workers: int = 16  # gRPC handler threads
    # Batches of one model that may run at once (Triton's instance_group count), each on
    # cores / instances onnxruntime threads when they overlap. 0 (automatic): 2 for a model
    # on the CPU (with 2+ cores), else 1. On 2 cores, 2 serve the bundled model 10-15% more
    # images/s at 32 clients than 1, at the same latency for a lone client (README,
    # "Serving benchmark").
    model_instances: int = 0
    # Rows per onnxruntime run: larger batches run in slices of this many (bounded memory; a
    # CPU batch past the caches is up to 9x slower per image). 0: on the CPU, the image
    # tower's fastest of 1, 2, 4 and 8, measured at load (server.runtimes.run_batch); else whole.
    run_batch: int = 0
    # Server processes on one port (SO_REUSEPORT), each pinned to its share of the CPUs and
    # following the others' registrations through the database (server.grpc.processes).
    # 0: one per CPU. 1 (default): one process.
    processes: int = 1
    decode_threads: int = 4
    max_message_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 256
    max_pixels: int = 40_000_000  # per image, checked before decoding
    max_classes_per_collection: int = 10_000
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "model_repo", Path(self.model_repo))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {value!r}")
        positive = (
            "max_batch_size",
            "max_queue",
            "workers",
            "decode_threads",
            "max_message_bytes",
            "max_images_per_request",
            "max_pixels",
            "max_classes_per_collection",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("model_instances", "run_batch", "processes"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0: automatic), got {n!r}")
        for name in ("max_delay_ms", "grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not self.model_repo.is_dir():
            raise ConfigError(f"model_repo {self.model_repo} is not a directory")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServerConfig:
        """Defaults < file < ``env`` (``PROTOSERVE_*``) < ``overrides``; validated."""
        env = {} if env is None else env
        values: dict[str, Any] = {}
        if path is None and env.get(ENV_PREFIX + "CONFIG"):
            path = env[ENV_PREFIX + "CONFIG"]
        if path is not None:
            values.update(_read_file(Path(path)))
        for name, kind in _FIELDS.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _parse(raw, kind, f"environment variable {ENV_PREFIX}{name.upper()}")
        for name, value in (overrides or {}).items():
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)


_FIELDS: dict[str, str] = {f.name: str(f.type) for f in fields(ServerConfig)}


def _parse(raw: str, kind: str, where: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"{where}: expected {'an integer' if kind == 'int' else 'a number'}, got {raw!r}"
        ) from None
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("server"), dict):
        data = data["server"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings")
    for key, value in data.items():
        if key not in _FIELDS:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        if _FIELDS[key] == "Path" and not isinstance(value, str):
            raise ConfigError(f"config file {path}: {key} must be a string path, got {value!r}")
    return dict(data)


_HELP = {
    "host": "address to listen on",
    "port": "gRPC port (0: any free port)",
    "data_dir": "where the SQLite database (collections, classes, supports) lives",
    "model_repo": "the model repository (one folder per model)",
    "metrics_port": "Prometheus /metrics on this HTTP port (0: off)",
    "max_batch_size": "images per model run at most (1: batching off)",
    "max_delay_ms": "how long a request may wait to fill a batch (0: run when the model is free)",
    "max_queue": "images waiting per model; beyond it: RESOURCE_EXHAUSTED",
    "workers": "gRPC handler threads",
    "model_instances": "batches of one model running at once (0: automatic, 2 on a CPU with 2+ "
    "cores, else 1)",
    "run_batch": "rows per onnxruntime run (0: measured at load on the CPU, the whole batch on "
    "a GPU)",
    "processes": "server processes sharing the port and the data dir (0: one per CPU)",
    "decode_threads": "threads decoding the images of one request",
    "max_message_bytes": "largest gRPC message, in or out",
    "max_images_per_request": "images (or texts) per request at most",
    "max_pixels": "pixels per image at most, checked before decoding",
    "max_classes_per_collection": "classes per collection at most",
    "grace_s": "seconds in-flight requests get to finish on SIGTERM",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one ``--flag-name`` per setting (default ``None``: not given)."""
    parser.add_argument("--config", type=Path, default=None, help="a .toml or .json config file")
    types = {"int": int, "float": float, "Path": Path, "str": str}
    for name, kind in _FIELDS.items():
        default = getattr(ServerConfig, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=types[kind],
            default=None,
            help=f"{_HELP.get(name, '')} (env {ENV_PREFIX}{name.upper()}; default {default})",
        )


def config_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """The config for parsed ``add_serve_arguments`` flags over ``env`` (default: os.environ)."""
    overrides = {name: getattr(args, name, None) for name in _FIELDS}
    return ServerConfig.load(
        getattr(args, "config", None), os.environ if env is None else env, overrides
    )
