"""The exceptions the serving path raises; the gRPC layer maps each ``code`` to a status.

Same convention as ``server.registry.errors``: ``code`` is the name of the gRPC status code
the exception stands for, and every message names what it is about (which batcher, which
limit) so that the server can pass it to the client unchanged.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["BatchSizeMismatch", "Closed", "Overloaded", "ServingError"]


class ServingError(Exception):
    """Base class; ``code`` is the name of the gRPC status code it stands for."""

    code: ClassVar[str] = "INTERNAL"


class Overloaded(ServingError):
    """A bounded queue is full: the request is refused now instead of waiting (backpressure)."""

    code = "RESOURCE_EXHAUSTED"


class Closed(ServingError):
    """The component is shutting down or shut down and takes no new work."""

    code = "UNAVAILABLE"


class BatchSizeMismatch(ServingError):
    """A batched function returned a different number of outputs than it was given inputs."""

    code = "INTERNAL"
