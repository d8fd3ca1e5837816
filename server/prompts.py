"""Prompt ensembles for zero-shot classification.

The template sets are open_clip's (``open_clip.zero_shot_metadata``): the 80 OpenAI ImageNet
prompts and their 7-prompt "simple" subset, kept here as format strings such as
``"a photo of a {}."`` instead of lambdas. A class's zero-shot weight is the ensemble of its
prompts' text embeddings, computed as open_clip's ``build_zero_shot_classifier`` does it:
L2-normalise each prompt embedding, average, L2-normalise the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "PromptError",
    "ensemble_embedding",
    "expand",
    "resolve_templates",
]

PLACEHOLDER = "{}"

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
        "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES,
    }
)


class PromptError(ValueError):
    """An unknown template set name, a malformed template or an unusable class name."""


def _check_template(index: int, template: object) -> str:
    if not isinstance(template, str):
        raise TypeError(f"templates[{index}] must be str, got {type(template).__name__}")
    rest = template.replace(PLACEHOLDER, "", 1)
    if PLACEHOLDER not in template:
        raise PromptError(f"templates[{index}] {template!r} has no '{{}}' for the class name")
    if "{" in rest or "}" in rest:
        raise PromptError(
            f"templates[{index}] {template!r} must contain exactly one '{{}}' and no other braces"
        )
    return template


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (see ``TEMPLATE_SETS``) or a custom list, checked.

    A custom template is a string holding exactly one ``{}`` where the class name goes.
    """
    if isinstance(templates, str):
        try:
            return TEMPLATE_SETS[templates]
        except KeyError:
            known = ", ".join(sorted(TEMPLATE_SETS))
            raise PromptError(f"unknown template set {templates!r}; known sets: {known}") from None
    if not isinstance(templates, Sequence):
        raise TypeError(
            f"templates must be a set name or a sequence of str, got {type(templates).__name__}"
        )
    if len(templates) == 0:
        raise PromptError("templates is empty; give at least one template")
    return tuple(_check_template(i, t) for i, t in enumerate(templates))


def expand(classname: str, templates: str | Sequence[str]) -> list[str]:
    """The prompts for one class: each template with ``{}`` replaced by ``classname``.

    Same strings as open_clip's ``template.format(classname)``.
    """
    if not isinstance(classname, str):
        raise TypeError(f"classname must be str, got {type(classname).__name__}")
    if not classname.strip():
        raise PromptError("classname is empty")
    return [t.replace(PLACEHOLDER, classname) for t in resolve_templates(templates)]


def ensemble_embedding(embeddings: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """One class embedding from its prompts' text embeddings ``[T, D]``: float32 ``[D]``.

    Each row is L2-normalised, the rows are averaged and the mean is L2-normalised again
    (open_clip's ``build_zero_shot_classifier``). Computed in float64, returned as float32.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must have shape [T, D] with T, D >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0.0)
    if zero.size:
        raise ValueError(f"embedding row {int(zero[0])} has zero norm")
    mean = (x / norms).mean(axis=0)
    mean_norm = float(np.linalg.norm(mean))
    if mean_norm == 0.0:
        raise ValueError("the normalised embeddings cancel out (mean has zero norm)")
    out: npt.NDArray[np.float32] = (mean / mean_norm).astype(np.float32)
    return out


class _TextEncoder(Protocol):
    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


def class_embedding(
    runtime: _TextEncoder, classname: str, templates: str | Sequence[str] = "openai_imagenet"
) -> npt.NDArray[np.float32]:
    """A class's zero-shot embedding: the normalised mean over its prompts' embeddings."""
    return ensemble_embedding(runtime.encode_texts(expand(classname, templates)))
