"""server.prompts: template sets, expansion, ensemble maths, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.prompts import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
    PromptError,
    ensemble_embedding,
    expand,
    resolve_templates,
)


def test_counts_and_registry() -> None:
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert dict(TEMPLATE_SETS) == {
        "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
        "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES,
    }
    with pytest.raises(TypeError):
        TEMPLATE_SETS["mine"] = ("a {}.",)  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(TEMPLATE_SETS))
def test_every_builtin_template_has_one_placeholder(name: str) -> None:
    for template in TEMPLATE_SETS[name]:
        assert template.count("{}") == 1, template
        assert template.replace("{}", "").count("{") == 0, template
    assert resolve_templates(name) == TEMPLATE_SETS[name]


def test_expand() -> None:
    assert expand("cat", ["a photo of a {}.", "{} art"]) == ["a photo of a cat.", "cat art"]
    assert expand("cat", "simple_imagenet")[0] == "itap of a cat."
    assert len(expand("golden retriever", "openai_imagenet")) == 80
    assert expand("tabby cat", ("a {} in a video game.",)) == ["a tabby cat in a video game."]
    # The class name is inserted verbatim, even with braces in it.
    assert expand("{odd}", ["a {}."]) == ["a {odd}."]
    for template in OPENAI_IMAGENET_TEMPLATES:
        assert expand("x y", [template]) == [template.format("x y")]


def test_ensemble_matches_hand_computation() -> None:
    # Two 2-D embeddings: (3, 4) -> (0.6, 0.8); (0, 2) -> (0, 1).
    # Mean (0.3, 0.9), norm sqrt(0.9), result (0.3, 0.9) / sqrt(0.9).
    out = ensemble_embedding([[3.0, 4.0], [0.0, 2.0]])
    assert out.dtype == np.float32 and out.shape == (2,)
    norm = math.sqrt(0.9)
    np.testing.assert_allclose(out, [0.3 / norm, 0.9 / norm], rtol=1e-6)


def test_ensemble_general_properties() -> None:
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((80, 512)).astype(np.float32)
    out = ensemble_embedding(emb)
    assert out.shape == (512,) and out.dtype == np.float32
    assert abs(float(np.linalg.norm(out)) - 1.0) < 1e-6
    # Scaling any row does not change the result (rows are normalised first).
    scaled = emb.copy()
    scaled[3] *= 1000.0
    np.testing.assert_allclose(ensemble_embedding(scaled), out, atol=1e-6)
    # A single template gives that template's unit vector.
    np.testing.assert_allclose(
        ensemble_embedding(emb[:1]), emb[0] / np.linalg.norm(emb[0]), atol=1e-6
    )
    # Reference: the formula in open_clip's build_zero_shot_classifier, written in numpy.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    np.testing.assert_allclose(out, mean / np.linalg.norm(mean), atol=1e-6)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((0, 4)), "shape"),
        (np.zeros(4), "shape"),
        (np.zeros((2, 3, 4)), "shape"),
        ([[1.0, float("nan")]], "NaN"),
        ([[1.0, 0.0], [0.0, 0.0]], "row 1 has zero norm"),
        ([[1.0, 0.0], [-2.0, 0.0]], "cancel"),
    ],
)
def test_ensemble_errors(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ensemble_embedding(bad)  # type: ignore[arg-type]


def test_bad_names_and_templates() -> None:
    with pytest.raises(PromptError, match="unknown template set 'imagenet'.*openai_imagenet"):
        resolve_templates("imagenet")
    with pytest.raises(PromptError, match="unknown template set"):
        expand("cat", "nope")
    with pytest.raises(PromptError, match=r"templates\[1\].*no '\{\}'"):
        expand("cat", ["a {}.", "a photo of a cat."])
    with pytest.raises(PromptError, match="exactly one"):
        expand("cat", ["a {} and a {}."])
    with pytest.raises(PromptError, match="exactly one"):
        expand("cat", ["a {0} photo {}."])
    with pytest.raises(PromptError, match="empty"):
        resolve_templates([])
    with pytest.raises(TypeError, match=r"templates\[0\]"):
        resolve_templates([1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="set name or a sequence"):
        resolve_templates(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="classname"):
        expand(3, ["a {}."])  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="classname is empty"):
        expand("  ", ["a {}."])
    assert issubclass(PromptError, ValueError)


def test_templates_equal_open_clip() -> None:
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    for ours, theirs in [
        (OPENAI_IMAGENET_TEMPLATES, metadata.OPENAI_IMAGENET_TEMPLATES),
        (SIMPLE_IMAGENET_TEMPLATES, metadata.SIMPLE_IMAGENET_TEMPLATES),
    ]:
        assert len(ours) == len(theirs)
        for name in ["golden retriever", "cat", "{}"]:
            assert [t.format(name) for t in ours] == [f(name) for f in theirs]
            assert expand(name, ours) == [f(name) for f in theirs]
