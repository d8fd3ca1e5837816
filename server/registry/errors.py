"""The exceptions the registry raises; the gRPC layer maps each ``code`` to a status.

Every message names what it is about (collection, class, support) so that the server can
pass it to the client unchanged.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["AlreadyExists", "FailedPrecondition", "InvalidInput", "NotFound", "RegistryError"]


class RegistryError(Exception):
    """Base class; ``code`` is the name of the gRPC status code it stands for."""

    code: ClassVar[str] = "INTERNAL"


class NotFound(RegistryError):
    """An unknown collection, class or support."""

    code = "NOT_FOUND"


class AlreadyExists(RegistryError):
    """A collection name or class label that is already taken."""

    code = "ALREADY_EXISTS"


class InvalidInput(RegistryError, ValueError):
    """A malformed request: bad name, bad embedding, wrong dimension, unknown method."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(RegistryError):
    """A valid request the current state refuses (e.g. removing a class's last support)."""

    code = "FAILED_PRECONDITION"
