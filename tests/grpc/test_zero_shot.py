"""Zero-shot and hybrid (Tip-Adapter) classification through a real server on an exported model.

A tiny random open_clip model is exported (image and text towers) into a temporary model
repository; every expected score is computed by hand from open_clip's own torch model and
preprocessing, never from the server's code.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from server.client import ImageResult, ProtoserveClient, ProtoserveError  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.grpc.app import ProtoserveServer, build_server  # noqa: E402
from server.prompts import TEMPLATE_SETS  # noqa: E402
from server.registry.records import DEFAULT_HYBRID_ALPHA, DEFAULT_HYBRID_BETA  # noqa: E402
from training.export import export_open_clip  # noqa: E402

ARCH = "protoserve-tiny-zero-shot"
MODEL = "tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ("cat", "dog", "omniglot character")
CUSTOM = ("a drawing of a {}.", "{}", "a scan of the handwritten {}.")
TOL = 1e-3


class Ref:
    """open_clip's torch model: the hand computation's source of embeddings."""

    def __init__(self, checkpoint: Path) -> None:
        model, _, self.preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
        open_clip.load_checkpoint(model, str(checkpoint))
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(ARCH)
        self.logit_scale = float(model.logit_scale.exp().item())

    def images(self, data: list[bytes]) -> np.ndarray:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in data]
        with torch.inference_mode():
            out = self.model.encode_image(torch.stack([self.preprocess(p) for p in pil]))
        return unit(out.numpy().astype(np.float64))

    def texts(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.encode_text(self.tokenizer(texts)).numpy().astype(np.float64)
        return out

    def class_weight(self, name: str, templates: tuple[str, ...]) -> np.ndarray:
        """open_clip's prompt ensemble: normalise, average, normalise."""
        emb = unit(self.texts([t.format(name) for t in templates]))
        return unit(emb.mean(0, keepdims=True))[0]


class Served:
    def __init__(self, repo: Path, data_dir: Path, **cfg: Any) -> None:
        cfg.setdefault("workers", 4)
        config = ServerConfig(port=0, data_dir=data_dir, model_repo=repo, **cfg)
        self.server: ProtoserveServer
        self.server, port = build_server(config)
        self.server.start()
        self.client = ProtoserveClient(f"127.0.0.1:{port}")

    def close(self) -> None:
        self.client.close()
        self.server.stop(grace=5)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)  # type: ignore[no-any-return]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


QUERIES = [png(100 + i, s) for i, s in enumerate([(32, 32), (32, 32), (48, 40), (40, 56)])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tmp_path_factory.mktemp("cfg") / f"{ARCH}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def repo(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    export_open_clip(ARCH, root / MODEL, checkpoint=checkpoint)
    return root


@pytest.fixture(scope="module")
def ref(checkpoint: Path) -> Ref:
    return Ref(checkpoint)


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(repo, tmp_path_factory.mktemp("data"))
    yield s
    s.close()


def by_label(result: ImageResult) -> dict[str, tuple[float, float]]:
    return {p.label: (p.score, p.probability) for p in result.predictions}


def check_results(
    results: list[ImageResult],
    labels: tuple[str, ...],
    scores: np.ndarray,
    logits: np.ndarray,
) -> None:
    """Every class of every image: score == ``scores``, probability == softmax(logits).

    The logits themselves are recovered (up to the softmax's constant) as the centred log
    probabilities, and must equal the hand ``logits`` within ``TOL`` too.
    """
    probs = softmax(logits)
    assert len(results) == len(scores)
    for i, r in enumerate(results):
        got = by_label(r)
        assert set(got) == set(labels)
        for j, label in enumerate(labels):
            assert got[label][0] == pytest.approx(scores[i, j], abs=TOL), (i, label)
            assert got[label][1] == pytest.approx(probs[i, j], abs=TOL), (i, label)
        log_p = np.log([got[label][1] for label in labels])
        np.testing.assert_allclose(
            log_p - log_p.mean(), logits[i] - logits[i].mean(), rtol=0, atol=TOL
        )
        # predictions are best first, and the top-1 is the argmax of the hand logits
        ps = [p.probability for p in r.predictions]
        assert ps == sorted(ps, reverse=True)
        assert r.top.label == labels[int(np.argmax(logits[i]))]
        p = probs[i]
        assert r.entropy == pytest.approx(float(-(p * np.log(p)).sum()), abs=TOL)
        top2 = np.sort(p)[::-1]
        assert r.margin == pytest.approx(float(top2[0] - top2[1]), abs=TOL)


# -- (1) zero-shot --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("templates", "kwargs"),
    [
        (TEMPLATE_SETS["simple_imagenet"], {"template_set": "simple_imagenet"}),
        (CUSTOM, {"templates": CUSTOM}),
    ],
    ids=["template-set", "custom-templates"],
)
def test_zero_shot_scores_match_open_clip(
    served: Served, ref: Ref, templates: tuple[str, ...], kwargs: dict[str, Any]
) -> None:
    c = served.client
    name = f"zs-{'set' if 'template_set' in kwargs else 'custom'}"
    coll = c.create_collection(name, MODEL, method="zero-shot")
    assert coll.method == "zero-shot" and coll.metric == "cosine"
    for label in CLASSES:
        reg = c.register(name, label, texts=[label], **kwargs)
        assert reg.class_info.text_supports == 1 and reg.class_info.image_supports == 0

    results = c.classify(name, QUERIES, top_k=len(CLASSES))
    f = ref.images(QUERIES)
    w = np.stack([ref.class_weight(label, templates) for label in CLASSES])
    cos = f @ w.T
    check_results(results, CLASSES, cos, ref.logit_scale * cos)


def test_zero_shot_text_supports_without_templates(served: Served, ref: Ref) -> None:
    """Several raw prompts per class: the normalised mean of the normalised prompts."""
    c = served.client
    c.create_collection("zs-raw", MODEL, method="zero-shot")
    prompts = {"cat": ["a photo of a cat.", "a cat"], "dog": ["a photo of a dog."]}
    for label, texts in prompts.items():
        c.register("zs-raw", label, texts=texts)
    labels = tuple(prompts)
    w = np.stack([unit(unit(ref.texts(prompts[k])).mean(0)) for k in labels])
    cos = ref.images(QUERIES) @ w.T
    check_results(c.classify("zs-raw", QUERIES, top_k=5), labels, cos, ref.logit_scale * cos)


# -- (2) hybrid -----------------------------------------------------------------------------------
SUPPORTS = {
    "cat": [png(1), png(2, (40, 30))],
    "dog": [png(3)],
    "omniglot character": [png(4), png(5), png(6, (33, 31))],
}


def tip_adapter(ref: Ref, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores s*f*W^T's cosine part and the full Tip-Adapter logits, by hand in numpy."""
    f = ref.images(QUERIES)
    w = np.stack([ref.class_weight(label, TEMPLATE_SETS["simple_imagenet"]) for label in CLASSES])
    keys = np.concatenate([ref.images(SUPPORTS[label]) for label in CLASSES])
    onehot = np.zeros((len(keys), len(CLASSES)))
    row = 0
    for j, label in enumerate(CLASSES):
        onehot[row : row + len(SUPPORTS[label]), j] = 1.0
        row += len(SUPPORTS[label])
    cos = f @ w.T
    affinity = f @ keys.T
    logits = ref.logit_scale * cos + alpha * np.exp(-beta * (1.0 - affinity)) @ onehot
    return cos, logits


def make_hybrid(c: ProtoserveClient, name: str, **kwargs: Any) -> None:
    c.create_collection(name, MODEL, method="hybrid", **kwargs)
    for label in CLASSES:
        # text and images in one registration for one class, separately for the others
        if label == "cat":
            c.register(name, label, SUPPORTS[label], [label], template_set="simple_imagenet")
        else:
            c.register(name, label, texts=[label], template_set="simple_imagenet")
            reg = c.register(name, label, SUPPORTS[label])
            assert reg.class_info.text_supports == 1
            assert reg.class_info.image_supports == len(SUPPORTS[label])


def test_hybrid_default_alpha_beta(served: Served, ref: Ref) -> None:
    c = served.client
    make_hybrid(c, "hy-default")
    coll = c.get_collection("hy-default")
    assert (coll.hybrid_alpha, coll.hybrid_beta) == (DEFAULT_HYBRID_ALPHA, DEFAULT_HYBRID_BETA)
    assert (DEFAULT_HYBRID_ALPHA, DEFAULT_HYBRID_BETA) == (1.0, 5.5)  # as documented
    cos, logits = tip_adapter(ref, DEFAULT_HYBRID_ALPHA, DEFAULT_HYBRID_BETA)
    cache = logits - ref.logit_scale * cos
    assert np.ptp(cache, axis=1).min() > 0.1  # the cache term changes the class distribution
    check_results(c.classify("hy-default", QUERIES, top_k=5), CLASSES, cos, logits)


@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 1.0), (20.0, 0.25)])
def test_hybrid_per_collection_alpha_beta(
    served: Served, ref: Ref, alpha: float, beta: float
) -> None:
    c = served.client
    name = f"hy-{alpha}-{beta}"
    make_hybrid(c, name, hybrid_alpha=alpha, hybrid_beta=beta)
    coll = c.get_collection(name)
    assert (coll.hybrid_alpha, coll.hybrid_beta) == (alpha, beta)
    cos, logits = tip_adapter(ref, alpha, beta)
    # the cache term must matter here, or the test would not see it
    assert np.abs(logits - ref.logit_scale * cos).max() > 0.1
    check_results(c.classify(name, QUERIES, top_k=5), CLASSES, cos, logits)


def test_hybrid_after_removing_a_support(served: Served, ref: Ref) -> None:
    """The cache term follows removals (the FAISS index and the key set stay in step)."""
    c = served.client
    make_hybrid(c, "hy-remove", hybrid_alpha=5.0, hybrid_beta=1.0)
    info = c.get_class("hy-remove", "omniglot character")
    image_ids = list(info.support_ids)
    # support ids are in registration order: the text support first, then the three images
    c.remove_support("hy-remove", "omniglot character", image_ids[-1])
    removed = SUPPORTS["omniglot character"].pop()
    try:
        cos, logits = tip_adapter(ref, 5.0, 1.0)
    finally:
        SUPPORTS["omniglot character"].append(removed)
    check_results(c.classify("hy-remove", QUERIES, top_k=5), CLASSES, cos, logits)


# -- (3) method override per request --------------------------------------------------------------
def test_method_override_per_request(served: Served, ref: Ref) -> None:
    c = served.client
    make_hybrid(c, "override")
    f = ref.images(QUERIES)

    # prototype: cosine to the normalised mean of the class's unit image embeddings
    protos = np.stack([unit(ref.images(SUPPORTS[k]).mean(0)) for k in CLASSES])
    cos = f @ protos.T
    got = c.classify("override", QUERIES, top_k=5, method="prototype")
    check_results(got, CLASSES, cos, ref.logit_scale * cos)

    # zero-shot on the same collection: the text weights only
    w = np.stack([ref.class_weight(k, TEMPLATE_SETS["simple_imagenet"]) for k in CLASSES])
    zs = f @ w.T
    check_results(
        c.classify("override", QUERIES, top_k=5, method="zero-shot"),
        CLASSES,
        zs,
        ref.logit_scale * zs,
    )

    # no override: the collection's own method (hybrid), over the streaming RPC too
    cos_h, logits_h = tip_adapter(ref, DEFAULT_HYBRID_ALPHA, DEFAULT_HYBRID_BETA)
    check_results(c.classify("override", QUERIES, top_k=5), CLASSES, cos_h, logits_h)
    streamed = list(c.classify_stream("override", QUERIES, top_k=5, method="zero-shot"))
    check_results(streamed, CLASSES, zs, ref.logit_scale * zs)


def test_zero_shot_needs_text_classes(served: Served) -> None:
    c = served.client
    c.create_collection("images-only", MODEL, method="prototype")
    c.register("images-only", "cat", SUPPORTS["cat"])
    assert c.classify("images-only", QUERIES[:1])[0].top.label == "cat"
    for method in ("zero-shot", "hybrid"):
        with pytest.raises(ProtoserveError) as e:
            c.classify("images-only", QUERIES[:1], method=method)
        assert e.value.code == "FAILED_PRECONDITION" and "text" in str(e.value)


# -- (4) Embed of texts ---------------------------------------------------------------------------
def test_embed_texts_match_open_clip(served: Served, ref: Ref) -> None:
    c = served.client
    texts = ["a photo of a cat.", "", "Ünïcödé 汉字 🐈‍⬛", "a drawing of the letter A " * 10]
    expected = ref.texts(texts)
    for kwargs in ({"model": MODEL}, {"collection": "zs-raw-embed"}):
        if "collection" in kwargs:
            c.create_collection("zs-raw-embed", MODEL, method="zero-shot")
        out = c.embed(texts=texts, **kwargs)
        got = np.array(out.texts, np.float64)
        assert out.dim == 32 and got.shape == (len(texts), 32) and not out.images
        cos = (unit(got) * unit(expected)).sum(1)
        assert cos.min() >= 0.999
    unit_out = np.array(c.embed(texts=texts, model=MODEL, normalize=True).texts)
    np.testing.assert_allclose(np.linalg.norm(unit_out, axis=1), 1.0, atol=1e-5)

    both = c.embed(QUERIES[:2], texts[:1], model=MODEL)
    img = unit(np.array(both.images, np.float64))
    assert (img * ref.images(QUERIES[:2])).sum(1).min() >= 0.999
    assert (unit(np.array(both.texts, np.float64)) * unit(expected[:1])).sum(1).min() >= 0.999


# -- (5) open-set threshold -----------------------------------------------------------------------
def test_open_set_threshold(served: Served, ref: Ref) -> None:
    c = served.client
    c.create_collection("open-probe", MODEL, method="zero-shot")
    for label in CLASSES:
        c.register("open-probe", label, texts=[label], template_set="simple_imagenet")
    queries = QUERIES + [png(200 + i, (32, 32)) for i in range(8)]
    top1 = sorted(r.top.probability for r in c.classify("open-probe", queries))
    assert all(not r.unknown for r in c.classify("open-probe", queries))  # no threshold
    # thresholds between, below and above the observed top-1 probabilities
    mids = [(a + b) / 2 for a, b in itertools.pairwise(top1) if b - a > 1e-6]
    thresholds = [top1[0] / 2, *mids[:3], top1[-1] + 1e-3, 0.999]
    for k, threshold in enumerate(thresholds):
        name = f"open-{k}"
        coll = c.create_collection(name, MODEL, method="zero-shot", threshold=threshold)
        assert coll.threshold == pytest.approx(threshold)
        for label in CLASSES:
            c.register(name, label, texts=[label], template_set="simple_imagenet")
        results = c.classify(name, queries)
        for r in results:
            assert r.unknown == (r.top.probability < threshold), (threshold, r.top.probability)
        flagged = sum(r.unknown for r in results)
        assert flagged == sum(p < threshold for p in top1)
    # the same through the streaming RPC and with a method override
    name = f"open-{len(thresholds) - 1}"
    for r in c.classify_stream(name, queries, method="zero-shot"):
        assert r.unknown == (r.top.probability < 0.999)


def test_hybrid_needs_cosine(served: Served) -> None:
    """On an l2 collection the cache term would vanish (hybrid == zero-shot): refused."""
    c = served.client
    with pytest.raises(ProtoserveError) as e:
        c.create_collection("hy-l2", MODEL, method="hybrid", metric="l2")
    assert e.value.code == "FAILED_PRECONDITION" and "cosine" in e.value.message
    c.create_collection("zs-l2", MODEL, method="zero-shot", metric="l2")
    c.register("zs-l2", "cat", SUPPORTS["cat"], ["cat"], template_set="simple_imagenet")
    c.register("zs-l2", "dog", SUPPORTS["dog"], ["dog"], template_set="simple_imagenet")
    assert len(c.classify("zs-l2", QUERIES[:1], method="zero-shot")[0].predictions) == 2
    with pytest.raises(ProtoserveError) as e:
        c.classify("zs-l2", QUERIES[:1], method="hybrid")
    assert e.value.code == "FAILED_PRECONDITION" and "cosine" in e.value.message


# -- durability of text prototypes and the cache ---------------------------------------------------
def test_zero_shot_and_hybrid_survive_restart(repo: Path, ref: Ref, tmp_path: Path) -> None:
    """Text prototypes and the support cache are rebuilt from SQLite to the same scores."""
    first = Served(repo, tmp_path / "data")
    try:
        make_hybrid(first.client, "durable", hybrid_alpha=3.0, hybrid_beta=1.0)
        c = first.client
        c.register("durable", "cat", texts=["kitten"], templates=CUSTOM)
        before = c.classify("durable", QUERIES, top_k=5)
    finally:
        first.close()
    second = Served(repo, tmp_path / "data")
    try:
        coll = second.client.get_collection("durable")
        assert (coll.method, coll.hybrid_alpha, coll.hybrid_beta) == ("hybrid", 3.0, 1.0)
        after = second.client.classify("durable", QUERIES, top_k=5)
        zs_after = second.client.classify("durable", QUERIES, top_k=5, method="zero-shot")
    finally:
        second.close()
    for a, b in zip(before, after, strict=True):
        got_a, got_b = by_label(a), by_label(b)
        assert set(got_a) == set(got_b) == set(CLASSES)
        for label in CLASSES:
            np.testing.assert_allclose(got_a[label], got_b[label], rtol=0, atol=1e-5)
    # "cat" now ensembles two text supports: its simple_imagenet weight and "kitten"'s custom one
    w = [ref.class_weight(k, TEMPLATE_SETS["simple_imagenet"]) for k in CLASSES]
    w[0] = unit((w[0] + ref.class_weight("kitten", CUSTOM)) / 2)
    cos = ref.images(QUERIES) @ np.stack(w).T
    check_results(zs_after, CLASSES, cos, ref.logit_scale * cos)
