from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from server.registry import (
    CollectionIndex,
    CollectionSpec,
    InvalidInput,
    NotFound,
    Registry,
    SupportInput,
)
from server.registry.index import ivf_nlist

D = 12


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_prototypes(
    supports: dict[int, tuple[int, str, np.ndarray]], kind: str, metric: str
) -> dict[int, np.ndarray]:
    """Recomputes every class prototype of ``kind`` from scratch (float64)."""
    by_class: dict[int, list[np.ndarray]] = {}
    for cid, k, v in supports.values():
        if k == kind:
            by_class.setdefault(cid, []).append(v.astype(np.float64))
    out = {}
    for cid, vs in by_class.items():
        x = np.stack(vs)
        if metric == "cosine" or kind == "text":
            out[cid] = unit(unit(x).mean(axis=0))
        else:
            out[cid] = x.mean(axis=0)
    return out


def assert_prototypes(
    index: CollectionIndex, supports: dict[int, tuple[int, str, np.ndarray]], metric: str
) -> None:
    for kind in ("image", "text"):
        expected = reference_prototypes(supports, kind, metric)
        ids, rows = index.prototypes(kind)  # type: ignore[arg-type]
        assert sorted(ids.tolist()) == sorted(expected), kind
        for cid, row in zip(ids.tolist(), rows, strict=True):
            np.testing.assert_allclose(row, expected[cid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_prototypes_follow_random_edits(metric: str) -> None:
    rng = np.random.default_rng(7)
    index = CollectionIndex(metric)
    supports: dict[int, tuple[int, str, np.ndarray]] = {}
    next_sid, next_cid = 1, 1
    for step in range(300):
        op = rng.random()
        classes = sorted({c for c, _, _ in supports.values()})
        if op < 0.55 or not classes:
            if classes and rng.random() < 0.7:
                cid = int(rng.choice(classes))
            else:
                cid, next_cid = next_cid, next_cid + 1
            batch = []
            for _ in range(int(rng.integers(1, 4))):
                kind = "text" if rng.random() < 0.25 else "image"
                v = (rng.standard_normal(D) * rng.uniform(0.5, 3)).astype(np.float32)
                batch.append((next_sid, kind, v))
                supports[next_sid] = (cid, kind, v)
                next_sid += 1
            index.add(cid, f"c{cid}", batch)
        elif op < 0.9:
            sid = int(rng.choice(sorted(supports)))
            index.remove_support(sid)
            del supports[sid]
        else:
            cid = int(rng.choice(classes))
            index.remove_class(cid)
            supports = {s: t for s, t in supports.items() if t[0] != cid}
        if step % 25 == 0:
            assert_prototypes(index, supports, metric)
    assert_prototypes(index, supports, metric)
    assert index.support_ids() == {s: t[0] for s, t in supports.items()}
    assert index.labels() == {t[0]: f"c{t[0]}" for t in supports.values()}
    assert index.num_supports() == len(supports)


def test_scores_and_topk_agree() -> None:
    rng = np.random.default_rng(1)
    index = CollectionIndex("cosine")
    for cid in range(1, 9):
        index.add(
            cid, f"label{cid}", [(cid * 10 + j, "image", rng.standard_normal(D)) for j in range(3)]
        )
    q = rng.standard_normal((5, D)).astype(np.float32)
    full = index.class_scores(q)
    assert full.scores.shape == (5, 8) and len(full.labels) == 8
    assert full.labels == tuple(f"label{c}" for c in full.class_ids)
    top = index.prototype_topk(q, 3)
    order = np.argsort(-full.scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top.class_ids, full.class_ids[order])
    np.testing.assert_allclose(top.scores, np.take_along_axis(full.scores, order, 1), atol=1e-6)
    assert top.labels[0] == tuple(f"label{c}" for c in top.class_ids[0])
    # the prototype score is the cosine with the normalised mean of normalised supports
    _, protos = index.prototypes()
    np.testing.assert_allclose(full.scores, unit(q) @ protos.T, atol=1e-5)
    assert index.prototype_topk(q, 50).scores.shape == (5, 8)


def test_text_prototypes_are_cosine_in_l2_collections() -> None:
    index = CollectionIndex("l2")
    index.add(1, "cat", [(1, "image", [3.0, 0.0]), (2, "text", [0.0, 5.0])])
    np.testing.assert_allclose(index.class_scores([[1.0, 1.0]], "image").scores, [[-5.0]])
    np.testing.assert_allclose(
        index.class_scores([[1.0, 1.0]], "text").scores, [[math.sqrt(0.5)]], rtol=1e-6
    )
    assert index.class_scores([[1.0, 1.0]], "text").labels == ("cat",)


def test_knn_votes_by_hand() -> None:
    """Cosine, 2-D: supports at known angles, votes computed by hand."""
    index = CollectionIndex("cosine")
    deg = np.deg2rad
    at = lambda a: [math.cos(deg(a)), math.sin(deg(a))]  # noqa: E731
    index.add(1, "A", [(11, "image", at(0)), (12, "image", at(20))])
    index.add(2, "B", [(21, "image", at(50)), (22, "image", at(180))])
    index.add(3, "C", [(31, "text", at(10))])  # text: no vote, no column
    q = np.array([at(10)], np.float32)
    # 3 nearest to 10 degrees: 0 and 20 (A, cos 10), 50 (B, cos 40)
    nb = index.nearest_supports(q, 3)
    assert set(nb.support_ids[0, :2].tolist()) == {11, 12} and nb.support_ids[0, 2] == 21
    np.testing.assert_array_equal(nb.class_ids[0], [1, 1, 2])
    s = np.cos(deg([10, 10, 40]))
    np.testing.assert_allclose(nb.scores[0], s, rtol=1e-6)
    votes = index.knn(q, 3, temperature=0.1)
    assert votes.labels == ("A", "B") and votes.class_ids.tolist() == [1, 2]
    w = np.exp((s - s.max()) / 0.1)
    np.testing.assert_allclose(votes.scores[0], [w[:2].sum() / w.sum(), w[2] / w.sum()], rtol=1e-5)
    majority = index.knn(q, 3, temperature=math.inf)
    np.testing.assert_allclose(majority.scores[0], [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(index.knn(q, 10, temperature=math.inf).scores[0], [0.5, 0.5])
    np.testing.assert_allclose(index.knn(q, 1).scores[0], [1.0, 0.0])


def test_l2_neighbour_scores_are_negative_squared_distances() -> None:
    rng = np.random.default_rng(3)
    index = CollectionIndex("l2")
    x = rng.standard_normal((20, D)).astype(np.float32)
    index.add(1, "a", [(i + 1, "image", x[i]) for i in range(10)])
    index.add(2, "b", [(i + 1, "image", x[i]) for i in range(10, 20)])
    q = rng.standard_normal((4, D)).astype(np.float32)
    nb = index.nearest_supports(q, 20)
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nb.support_ids, np.argsort(d2, axis=1, kind="stable") + 1)
    np.testing.assert_allclose(nb.scores, -np.sort(d2, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(nb.class_ids, np.where(nb.support_ids <= 10, 1, 2))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_support_vectors(metric: str) -> None:
    """Each query's nearest image support and its stored vector (unit for cosine); text
    supports are never neighbours; an index without image supports gives -1 and zeros."""
    rng = np.random.default_rng(5)
    index = CollectionIndex(metric)
    q = rng.standard_normal((3, D)).astype(np.float32)
    index.add(9, "t", [(100, "text", rng.standard_normal(D))])
    ids, vecs = index.nearest_support_vectors(q)
    assert ids.tolist() == [-1, -1, -1] and not vecs.any()
    x = rng.standard_normal((8, D)).astype(np.float32)
    index.add(1, "a", [(i + 1, "image", x[i]) for i in range(8)])
    stored = unit(x) if metric == "cosine" else x
    ids, vecs = index.nearest_support_vectors(q)
    if metric == "cosine":
        want = np.argmax(unit(q) @ stored.T, axis=1)
    else:
        want = np.argmin(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1)
    assert ids.tolist() == (want + 1).tolist()
    np.testing.assert_allclose(vecs, stored[want], rtol=1e-6, atol=1e-6)


def test_empty_and_bad_queries() -> None:
    index = CollectionIndex("cosine")
    assert index.class_scores(np.ones((2, 5))).scores.shape == (2, 0)
    assert index.prototype_topk(np.ones(5), 3).class_ids.shape == (1, 0)
    assert index.knn(np.ones((2, 5)), 3).scores.shape == (2, 0)
    assert index.nearest_supports(np.ones((2, 5)), 3).support_ids.shape == (2, 0)
    index.add(1, "a", [(1, "image", np.ones(D))])
    with pytest.raises(InvalidInput, match="dimension 5, the collection's is 12"):
        index.class_scores(np.ones((2, 5)))
    with pytest.raises(InvalidInput, match="NaN"):
        index.knn(np.full(D, np.nan), 3)
    with pytest.raises(InvalidInput, match="k must be a positive integer"):
        index.prototype_topk(np.ones(D), 0)
    with pytest.raises(InvalidInput, match="kind"):
        index.class_scores(np.ones(D), "audio")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="temperature"):
        index.knn(np.ones(D), 1, temperature=0)


def test_bad_edits_change_nothing() -> None:
    index = CollectionIndex("cosine")
    index.add(1, "a", [(1, "image", np.ones(D))])
    with pytest.raises(InvalidInput, match="support 1 is already in the index"):
        index.add(2, "b", [(2, "image", np.ones(D)), (1, "image", np.ones(D))])
    with pytest.raises(InvalidInput, match="class 1 is 'a', not 'b'"):
        index.add(1, "b", [(3, "image", np.ones(D))])
    with pytest.raises(InvalidInput, match="dimension 3"):
        index.add(2, "b", [(3, "image", np.ones(D)), (4, "image", np.ones(3))])
    with pytest.raises(NotFound, match="support 9"):
        index.remove_support(9)
    with pytest.raises(NotFound, match="class 9"):
        index.remove_class(9)
    assert index.support_ids() == {1: 1} and index.labels() == {1: "a"}


def test_ivf_above_the_flat_limit_and_back() -> None:
    rng = np.random.default_rng(5)
    centers = unit(rng.standard_normal((40, 32)))
    index = CollectionIndex("cosine", flat_limit=400, nprobe=8)
    supports: dict[int, tuple[int, str, np.ndarray]] = {}
    sid = 0
    for rep in range(12):
        for c in range(40):
            sid += 1
            v = (centers[c] + 0.3 * rng.standard_normal(32)).astype(np.float32)
            supports[sid] = (c + 1, "image", v)
            index.add(c + 1, f"c{c + 1}", [(sid, "image", v)])
        assert index.support_index_kind == ("ivf" if sid > 400 else "flat"), rep
    assert ivf_nlist(sid) == 12
    assert_prototypes(index, supports, "cosine")
    x = unit(np.stack([t[2] for t in supports.values()]))
    ids = np.array(list(supports))
    q = unit(centers + 0.3 * rng.standard_normal((40, 32))).astype(np.float32)
    exact = ids[np.argmax(q @ x.T, axis=1)]
    assert np.mean(index.nearest_supports(q, 1).support_ids[:, 0] == exact) >= 0.9
    for s in list(supports)[:300]:  # 480 -> 180 supports: below 400 // 2 it is flat again
        index.remove_support(s)
        del supports[s]
    assert index.support_index_kind == "flat"
    assert_prototypes(index, supports, "cosine")
    x = unit(np.stack([t[2] for t in supports.values()]))
    ids = np.array(list(supports))
    np.testing.assert_array_equal(
        index.nearest_supports(q, 1).support_ids[:, 0], ids[np.argmax(q @ x.T, axis=1)]
    )


# -- the registry: store and index in step -----------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(tmp_path / "data", flat_limit=30)
    yield r
    r.close()


def random_registry_edits(registry: Registry, name: str, seed: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        classes = registry.list_classes(name)
        op = rng.random()
        if op < 0.6 or not classes:
            label = f"class{rng.integers(0, 12)}"
            sups = [
                SupportInput.from_image(rng.standard_normal(D) + 1, f"h{rng.integers(1e9)}")
                if rng.random() < 0.8
                else SupportInput.from_text(rng.standard_normal(D), label, ["a {}."])
                for _ in range(int(rng.integers(1, 4)))
            ]
            registry.add_supports(name, label, sups)
        elif op < 0.85:
            c = classes[int(rng.integers(len(classes)))]
            sups = registry.list_supports(name, c.label)
            if len(sups) > 1:
                registry.remove_support(name, sups[int(rng.integers(len(sups)))].id)
        else:
            registry.remove_class(name, classes[int(rng.integers(len(classes)))].label)


def assert_same_state(a: CollectionIndex, b: CollectionIndex) -> None:
    assert a.support_ids() == b.support_ids()
    assert a.labels() == b.labels()
    for kind in ("image", "text"):
        ia, pa = a.prototypes(kind)  # type: ignore[arg-type]
        ib, pb = b.prototypes(kind)  # type: ignore[arg-type]
        oa, ob = np.argsort(ia), np.argsort(ib)
        np.testing.assert_array_equal(ia[oa], ib[ob])
        np.testing.assert_allclose(pa[oa], pb[ob], atol=1e-5)
    q = np.random.default_rng(0).standard_normal((6, D))
    ka, kb = a.knn(q, 5), b.knn(q, 5)
    np.testing.assert_allclose(
        ka.scores[:, np.argsort(ka.class_ids)], kb.scores[:, np.argsort(kb.class_ids)], atol=1e-5
    )


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_rebuild_equals_incremental(tmp_path: Path, metric: str) -> None:
    data = tmp_path / "data"
    with Registry.open(data, flat_limit=30) as registry:
        registry.create_collection(CollectionSpec("pets", "m", metric=metric))  # type: ignore[arg-type]
        random_registry_edits(registry, "pets", seed=11, steps=120)
        live = registry.index("pets")
        assert live.support_index_kind == "ivf"  # this sequence ends above the limit
        rebuilt = CollectionIndex.from_rows(
            registry.store.iter_embeddings("pets"), metric, D, flat_limit=30
        )
        assert_same_state(live, rebuilt)
        counts = {c.label: c.num_supports for c in registry.list_classes("pets")}
        labels = list(live.labels().values())
        assert sorted(labels) == sorted(counts)
    with Registry.open(data, flat_limit=30) as reopened:
        assert_same_state(live, reopened.index("pets"))
        assert reopened.collection("pets").dim == D


def test_registry_reads_and_errors(registry: Registry) -> None:
    registry.create_collection(CollectionSpec("pets", "m"))
    reg = registry.add_supports("pets", "cat", [SupportInput.from_image(np.ones(D), "h")])
    top = registry.index("pets").prototype_topk(np.ones(D), 1)
    assert top.labels == (("cat",),) and top.class_ids[0, 0] == reg.class_id
    assert registry.collection("pets").dim == D
    with pytest.raises(NotFound, match="collection 'nope'"):
        registry.index("nope")
    with pytest.raises(NotFound, match="collection 'nope'"):
        registry.collection("nope")
    registry.delete_collection("pets")
    assert registry.collections() == []
    with pytest.raises(NotFound):
        registry.index("pets")


def test_registry_heals_an_index_that_failed_to_apply(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.create_collection(CollectionSpec("pets", "m"))

    def broken(self: CollectionIndex, *args: object) -> None:
        raise RuntimeError("index bug")

    monkeypatch.setattr(CollectionIndex, "add", broken)
    reg = registry.add_supports("pets", "cat", [SupportInput.from_image(np.ones(D), "h")])
    monkeypatch.undo()
    assert registry.index("pets").support_ids() == {reg.supports[0].id: reg.class_id}


def test_concurrent_registration_and_queries(registry: Registry) -> None:
    """Writers add and remove classes while readers classify; answers stay consistent.

    Class ``stayN`` is fixed for the whole test and all its supports point along axis N, so
    a query along axis N must always get it first with score 1, whatever else is changing.
    """
    registry.create_collection(CollectionSpec("pets", "m"))
    eye = np.eye(D, dtype=np.float32)
    for n in range(4):
        registry.add_supports("pets", f"stay{n}", [SupportInput.from_image(eye[n], f"s{n}")])
    errors: list[BaseException] = []
    stop = threading.Event()
    index = registry.index("pets")

    def writer(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            for i in range(25):
                label = f"w{t}-{i % 3}"
                v = eye[4 + t] + 0.1 * rng.standard_normal(D).astype(np.float32)
                registry.add_supports("pets", label, [SupportInput.from_image(v, f"{t}-{i}")] * 2)
                if i % 4 == 3:
                    registry.remove_class("pets", label)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def reader() -> None:
        q = eye[:4]
        try:
            while not stop.is_set():
                top = index.prototype_topk(q, 2)
                assert [lab[0] for lab in top.labels] == [f"stay{n}" for n in range(4)]
                np.testing.assert_allclose(top.scores[:, 0], 1.0, rtol=1e-5)
                full = index.class_scores(q)
                assert full.scores.shape == (4, len(full.labels)) == (4, len(full.class_ids))
                knn = index.knn(q, 3)
                assert knn.scores.shape[1] == len(knn.labels)
                np.testing.assert_allclose(knn.scores.sum(axis=1), 1.0, rtol=1e-5)
                assert [knn.labels[j] for j in knn.scores.argmax(axis=1)] == [
                    f"stay{n}" for n in range(4)
                ]
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert not errors, errors[0]
    rebuilt = CollectionIndex.from_rows(registry.store.iter_embeddings("pets"), "cosine", D)
    assert_same_state(index, rebuilt)


def test_gpu_mirror_with_a_cpu_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU copy's bookkeeping (add in place, re-upload after removal, fall back on error),
    with ``index_cpu_to_gpu`` replaced by a CPU clone so that it runs without a GPU."""
    uploads: list[int] = []

    def to_gpu(res: object, device: int, index: object) -> object:
        uploads.append(index.ntotal)  # type: ignore[attr-defined]
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    rng = np.random.default_rng(2)
    gpu, cpu = CollectionIndex("l2", use_gpu=True), CollectionIndex("l2", use_gpu=False)
    q = rng.standard_normal((3, D))

    def same() -> None:
        a, b = gpu.nearest_supports(q, 4), cpu.nearest_supports(q, 4)
        np.testing.assert_array_equal(a.support_ids, b.support_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)

    first = [(i, "image", rng.standard_normal(D)) for i in range(1, 6)]
    for index in (gpu, cpu):
        index.add(1, "a", first)
    same()
    for index in (gpu, cpu):
        index.add(2, "b", [(i, "image", np.full(D, 0.1 * i)) for i in range(6, 9)])
    same()
    assert uploads == [5]  # the addition went to the GPU copy in place
    for index in (gpu, cpu):
        index.remove_support(7)
    same()
    assert uploads == [5, 7]  # a removal makes the next search upload again
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: 1 / 0, raising=False)
    for index in (gpu, cpu):
        index.remove_support(8)
    same()  # the GPU failed: searched on the CPU, and from now on
