"""Checks of client input before it reaches SQLite: names, labels, collection specs, supports.

Each check raises ``InvalidInput`` with a message naming what is wrong, or returns the value
in the form the store keeps (an embedding as a contiguous little-endian float32 vector).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from server.registry.errors import InvalidInput
from server.registry.records import (
    KINDS,
    METHODS,
    METRICS,
    CollectionSpec,
    FloatArray,
    SupportInput,
)

__all__ = [
    "MAX_LABEL",
    "MAX_NAME",
    "MAX_TEXT",
    "check_label",
    "check_spec",
    "check_support",
]

MAX_NAME = 128
MAX_LABEL = 256
MAX_TEXT = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput("collection name must be a non-empty string")
    if len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"collection name {name!r} must be 1-{MAX_NAME} characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput("class label must be a non-empty string")
    if len(label) > MAX_LABEL or _CONTROL_RE.search(label) or label != label.strip():
        raise InvalidInput(
            f"class label {label!r} must be at most {MAX_LABEL} characters, without control "
            "characters or leading/trailing spaces"
        )
    return label


def _check_finite(value: object, what: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise InvalidInput(f"{what} must be finite{bound}, got {value!r}")
    return v


def check_spec(spec: CollectionSpec) -> None:
    _check_name(spec.name)
    if not isinstance(spec.model, str) or not spec.model.strip():
        raise InvalidInput(f"collection {spec.name!r}: model must be a non-empty string")
    if spec.method not in METHODS:
        raise InvalidInput(
            f"collection {spec.name!r}: method must be one of {list(METHODS)}, got {spec.method!r}"
        )
    if spec.metric not in METRICS:
        raise InvalidInput(
            f"collection {spec.name!r}: metric must be one of {list(METRICS)}, got {spec.metric!r}"
        )
    if spec.threshold is not None:
        _check_finite(spec.threshold, f"collection {spec.name!r}: threshold")
    _check_finite(spec.hybrid_alpha, f"collection {spec.name!r}: hybrid_alpha", minimum=0.0)
    _check_finite(spec.hybrid_beta, f"collection {spec.name!r}: hybrid_beta", minimum=0.0)
    if spec.dim is not None and (
        isinstance(spec.dim, bool) or not isinstance(spec.dim, int) or spec.dim <= 0
    ):
        raise InvalidInput(f"collection {spec.name!r}: dim must be a positive integer")


def _check_embedding(where: str, embedding: Any, metric: str) -> FloatArray:
    arr = np.asarray(embedding)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidInput(f"{where}: embedding must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InvalidInput(f"{where}: embedding must be a non-empty 1-D vector, got {arr.shape}")
    vec = np.ascontiguousarray(arr, dtype="<f4")
    if not np.isfinite(vec).all():
        raise InvalidInput(f"{where}: embedding contains NaN or infinity")
    if metric == "cosine" and not np.any(vec):
        raise InvalidInput(f"{where}: embedding is all zeros (no direction for cosine)")
    return vec


def check_support(where: str, s: SupportInput, metric: str) -> FloatArray:
    if not isinstance(s, SupportInput):
        raise InvalidInput(f"{where}: expected a SupportInput, got {type(s).__name__}")
    if s.kind == "image":
        if not isinstance(s.content_hash, str) or not s.content_hash.strip():
            raise InvalidInput(f"{where}: an image support needs a content hash")
        if len(s.content_hash) > MAX_NAME:
            raise InvalidInput(f"{where}: content hash is longer than {MAX_NAME} characters")
        if s.text is not None or s.templates is not None:
            raise InvalidInput(f"{where}: an image support takes no text or templates")
    elif s.kind == "text":
        if not isinstance(s.text, str) or not s.text.strip():
            raise InvalidInput(f"{where}: a text support needs non-empty text")
        if len(s.text) > MAX_TEXT:
            raise InvalidInput(f"{where}: text is longer than {MAX_TEXT} characters")
        if s.content_hash is not None:
            raise InvalidInput(f"{where}: a text support takes no content hash")
        if s.templates is not None:
            if not s.templates or not all(
                isinstance(t, str) and t.count("{}") == 1 for t in s.templates
            ):
                raise InvalidInput(
                    f"{where}: templates must be a non-empty list of strings with one '{{}}' each"
                )
    else:
        raise InvalidInput(f"{where}: kind must be one of {list(KINDS)}, got {s.kind!r}")
    if s.source is not None and (not isinstance(s.source, str) or len(s.source) > MAX_TEXT):
        raise InvalidInput(f"{where}: source must be a string of at most {MAX_TEXT} characters")
    return _check_embedding(where, s.embedding, metric)
