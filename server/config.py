"""The server's configuration: one validated dataclass (``ServerConfig.validate`` at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigError", "ServerConfig"]


class ConfigError(ValueError):
    """A configuration value out of range; the message names the setting."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    data_dir: Path = Path("data")
    model_repo: Path = Path("models")
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    workers: int = 16  # gRPC handler threads
    decode_threads: int = 4
    max_message_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 256
    max_pixels: int = 40_000_000
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "model_repo", Path(self.model_repo))
        self.validate()

    def validate(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "workers": self.workers,
            "decode_threads": self.decode_threads,
            "max_message_bytes": self.max_message_bytes,
            "max_images_per_request": self.max_images_per_request,
            "max_pixels": self.max_pixels,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s must be >= 0, got {self.grace_s}")
        if not self.model_repo.is_dir():
            raise ConfigError(f"model_repo {self.model_repo} is not a directory")
