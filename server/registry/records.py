"""The registry's record types: what the store takes and returns, and the values they allow.

Frozen dataclasses only; checking client input is ``server.registry.validation``'s job and
storing records ``server.registry.store``'s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_HYBRID_ALPHA",
    "DEFAULT_HYBRID_BETA",
    "KINDS",
    "METHODS",
    "METRICS",
    "ClassInfo",
    "Collection",
    "CollectionSpec",
    "EmbeddingRow",
    "FloatArray",
    "IndexArray",
    "Kind",
    "Method",
    "Metric",
    "Registration",
    "Support",
    "SupportInput",
    "image_hash",
]

Method = Literal["prototype", "knn", "zero-shot", "hybrid"]
Metric = Literal["cosine", "l2"]
Kind = Literal["image", "text"]
FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

METHODS: tuple[str, ...] = ("prototype", "knn", "zero-shot", "hybrid")
METRICS: tuple[str, ...] = ("cosine", "l2")
KINDS: tuple[str, ...] = ("image", "text")
# Tip-Adapter's ImageNet setting (Zhang et al., ECCV 2022): alpha = 1, beta = 5.5.
DEFAULT_HYBRID_ALPHA = 1.0
DEFAULT_HYBRID_BETA = 5.5


@dataclass(frozen=True)
class CollectionSpec:
    """What ``create_collection`` takes. ``dim`` may be left for the first support to fix."""

    name: str
    model: str
    method: Method = "prototype"
    metric: Metric = "cosine"
    threshold: float | None = None
    hybrid_alpha: float = DEFAULT_HYBRID_ALPHA
    hybrid_beta: float = DEFAULT_HYBRID_BETA
    dim: int | None = None


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    model: str
    method: Method
    metric: Metric
    threshold: float | None
    hybrid_alpha: float
    hybrid_beta: float
    dim: int | None
    created_at: float


@dataclass(frozen=True)
class SupportInput:
    """One support to register: an image (by content hash) or a text prompt, with its embedding.

    ``templates`` (text only) are the format strings the text was expanded with before its
    prompts' embeddings were ensembled into ``embedding``; ``None`` for a literal prompt.
    """

    kind: Kind
    embedding: Any
    text: str | None = None
    content_hash: str | None = None
    source: str | None = None
    templates: tuple[str, ...] | None = None

    @classmethod
    def from_image(
        cls, embedding: Any, content_hash: str, source: str | None = None
    ) -> SupportInput:
        return cls("image", embedding, content_hash=content_hash, source=source)

    @classmethod
    def from_text(
        cls, embedding: Any, text: str, templates: Sequence[str] | None = None
    ) -> SupportInput:
        return cls(
            "text", embedding, text=text, templates=None if templates is None else tuple(templates)
        )


@dataclass(frozen=True)
class Support:
    id: int
    class_id: int
    label: str
    kind: Kind
    text: str | None
    content_hash: str | None
    source: str | None
    templates: tuple[str, ...] | None
    dim: int
    created_at: float


@dataclass(frozen=True)
class ClassInfo:
    id: int
    collection: str
    label: str
    image_supports: int
    text_supports: int
    created_at: float

    @property
    def num_supports(self) -> int:
        return self.image_supports + self.text_supports


@dataclass(frozen=True)
class Registration:
    """The committed result of ``add_supports``; ``collection`` is its state after the commit."""

    collection: Collection
    class_id: int
    label: str
    created: bool
    supports: tuple[Support, ...]


@dataclass(frozen=True)
class EmbeddingRow:
    support_id: int
    class_id: int
    label: str
    kind: Kind
    embedding: FloatArray


def image_hash(data: bytes) -> str:
    """The content hash stored for an image support: SHA-256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()
