"""In-memory serving state of one collection: class prototypes and the support index.

Built from the store at start-up (``CollectionIndex.from_rows``) and then changed
incrementally on every registration or removal; nothing is rebuilt per change. The parts:
the ``"image"`` and ``"text"`` prototypes (``server.registry.prototypes``), the FAISS index of
the image supports (``server.registry.support_index``), and here the bookkeeping that ties
supports to classes, the cached class id/label views and the lock over all of it.

Scores are "larger is better" everywhere: cosine similarities, and **negative** squared L2
distances for l2 (as ``server.kernels``).

``knn`` votes: each query's ``k`` nearest image supports vote for their classes with weights
``softmax(score / temperature)`` over those ``k`` (default temperature 0.1; ``math.inf`` gives
one vote each). A class's score is its summed weight, so each row sums to 1 (a distribution
for entropy/margin) and classes without a neighbour score 0.

Thread-safety: a readers-writer lock per collection. Queries share it (the kernels and FAISS
release the GIL, so they run in parallel); edits take it exclusively, so a query sees a class
either entirely before or entirely after a change, and the returned class ids and labels are
those of the rows that were scanned. Writers are preferred, so registrations do not starve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from server import kernels
from server.registry.errors import InvalidInput, NotFound
from server.registry.locking import RWLock
from server.registry.prototypes import Prototypes
from server.registry.records import EmbeddingRow, FloatArray, IndexArray, Kind
from server.registry.results import ClassScores, Neighbours, TopK
from server.registry.support_index import DEFAULT_NPROBE, FLAT_LIMIT, SupportIndex
from server.registry.support_index import ivf_nlist as ivf_nlist

__all__ = [
    "DEFAULT_NPROBE",
    "DEFAULT_TEMPERATURE",
    "FLAT_LIMIT",
    "ClassScores",
    "CollectionIndex",
    "Neighbours",
    "RWLock",
    "TopK",
]

DEFAULT_TEMPERATURE = 0.1
_KINDS: tuple[Kind, ...] = ("image", "text")


def _unit_rows(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    out: FloatArray = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return out


def _as_rows(x: Any, what: str) -> FloatArray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidInput(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidInput(f"{what} must be [n, dim], got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidInput(f"{what} contain NaN or infinity")
    return out


def _no_classes(queries: int) -> ClassScores:
    """The scores of a collection without classes (yet)."""
    return ClassScores(np.empty((queries, 0), np.float32), np.empty(0, np.int64), ())


class CollectionIndex:
    """Prototypes and supports of one collection. ``metric`` is the collection's (cosine|l2).

    ``dim`` may be ``None`` until the first support arrives. All methods are thread-safe.
    """

    def __init__(
        self,
        metric: str,
        dim: int | None = None,
        *,
        flat_limit: int = FLAT_LIMIT,
        nprobe: int = DEFAULT_NPROBE,
        use_gpu: bool | None = None,
        dtype: kernels.Dtype = "float32",
    ) -> None:
        if metric not in ("cosine", "l2"):
            raise InvalidInput(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if flat_limit < 1 or nprobe < 1:
            raise InvalidInput("flat_limit and nprobe must be positive")
        self.metric = metric
        self._flat_limit = flat_limit
        self._nprobe = nprobe
        self._use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._dtype: kernels.Dtype = dtype
        self._lock = RWLock()
        self._dim: int | None = None
        self._protos: dict[Kind, Prototypes] = {}
        self._faiss: SupportIndex | None = None
        self._labels: dict[int, str] = {}
        self._class_supports: dict[int, set[int]] = {}
        self._support_class: dict[int, int] = {}
        self._text: dict[int, FloatArray] = {}  # text support id -> stored vector
        self._views: dict[Kind, tuple[IndexArray, tuple[str, ...]]] = {}
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InvalidInput(f"dim must be a positive integer, got {dim!r}")
        image_metric: kernels.Metric = "cosine" if self.metric == "cosine" else "l2"
        self._protos = {
            "image": Prototypes(dim, image_metric, self._dtype),
            "text": Prototypes(dim, "cosine", self._dtype),
        }
        self._faiss = SupportIndex(dim, self.metric, self._flat_limit, self._nprobe, self._use_gpu)
        self._dim = dim

    @classmethod
    def from_rows(
        cls, rows: Iterable[EmbeddingRow], metric: str, dim: int | None = None, **options: Any
    ) -> CollectionIndex:
        """Builds the state from a store's ``iter_embeddings`` (one FAISS build, not N adds)."""
        index = cls(metric, dim, **options)
        classes: dict[int, tuple[str, list[tuple[int, Kind, FloatArray]]]] = {}
        for r in rows:
            classes.setdefault(r.class_id, (r.label, []))[1].append(
                (r.support_id, r.kind, r.embedding)
            )
        if not classes:
            return index
        batches = [(cid, label, index._prepare(sups)) for cid, (label, sups) in classes.items()]
        with index._lock.write():
            if index._dim is None:
                index._init(batches[0][2][0][2].shape[0])
            for cid, label, prepared in batches:
                index._check(cid, label, prepared)
                index._apply(cid, label, prepared, to_faiss=False)
            assert index._faiss is not None
            images = [(sid, v) for _, _, p in batches for sid, kind, v in p if kind == "image"]
            ids = np.array([sid for sid, _ in images], np.int64)
            vecs = np.stack([v for _, v in images]) if images else np.empty((0, index._dim or 0))
            index._faiss.build(ids, np.ascontiguousarray(vecs, np.float32))
        return index

    # -- edits --------------------------------------------------------------------------------
    def _prepare(
        self, supports: Sequence[tuple[int, str, Any]]
    ) -> list[tuple[int, Kind, FloatArray]]:
        if not supports:
            raise InvalidInput("no supports given")
        out: list[tuple[int, Kind, FloatArray]] = []
        for sid, kind, emb in supports:
            if kind not in _KINDS:
                raise InvalidInput(f"support {sid}: kind must be 'image' or 'text', got {kind!r}")
            vec = _as_rows(emb, f"support {sid} embedding")
            if vec.shape[0] != 1:
                raise InvalidInput(f"support {sid}: expected one embedding, got {vec.shape[0]}")
            if self.metric == "cosine" or kind == "text":
                vec = _unit_rows(vec)
            out.append((int(sid), kind, vec[0]))
        return out

    def _check(
        self, class_id: int, label: str, prepared: list[tuple[int, Kind, FloatArray]]
    ) -> None:
        known = self._labels.get(class_id)
        if known is not None and known != label:
            raise InvalidInput(f"class {class_id} is {known!r}, not {label!r}")
        seen: set[int] = set()
        for sid, _, vec in prepared:
            if vec.shape[0] != self._dim:
                raise InvalidInput(
                    f"support {sid}: embedding has dimension {vec.shape[0]}, "
                    f"the index's is {self._dim}"
                )
            if sid in self._support_class or sid in seen:
                raise InvalidInput(f"support {sid} is already in the index")
            seen.add(sid)

    def _apply(
        self,
        class_id: int,
        label: str,
        prepared: list[tuple[int, Kind, FloatArray]],
        *,
        to_faiss: bool,
    ) -> None:
        for kind in _KINDS:
            items = [(sid, v) for sid, k, v in prepared if k == kind]
            if not items:
                continue
            ids = np.array([sid for sid, _ in items], np.int64)
            vecs = np.stack([v for _, v in items])
            if kind == "image" and to_faiss:
                assert self._faiss is not None
                self._faiss.add(ids, vecs)
            self._protos[kind].add(class_id, vecs)
            if kind == "text":
                self._text.update((sid, v) for sid, v in items)
        self._labels[class_id] = label
        self._class_supports.setdefault(class_id, set()).update(sid for sid, _, _ in prepared)
        self._support_class.update((sid, class_id) for sid, _, _ in prepared)
        self._views.clear()

    def add(self, class_id: int, label: str, supports: Sequence[tuple[int, str, Any]]) -> None:
        """Adds supports ``(support_id, kind, embedding)`` to a class (created if new)."""
        prepared = self._prepare(supports)
        with self._lock.write():
            if self._dim is None:
                self._init(prepared[0][2].shape[0])
            self._check(int(class_id), label, prepared)
            self._apply(int(class_id), label, prepared, to_faiss=True)

    def remove_support(self, support_id: int) -> None:
        with self._lock.write():
            sid = int(support_id)
            cid = self._support_class.get(sid)
            if cid is None:
                raise NotFound(f"support {sid} is not in the index")
            if sid in self._text:
                self._protos["text"].subtract(cid, self._text.pop(sid).reshape(1, -1))
            else:
                assert self._faiss is not None
                ids = np.array([sid], np.int64)
                vec = self._faiss.vectors(ids)
                self._faiss.remove(ids)
                self._protos["image"].subtract(cid, vec)
            del self._support_class[sid]
            left = self._class_supports[cid]
            left.discard(sid)
            if not left:
                del self._class_supports[cid], self._labels[cid]
            self._views.clear()

    def remove_class(self, class_id: int) -> None:
        with self._lock.write():
            cid = int(class_id)
            sids = self._class_supports.pop(cid, None)
            if sids is None:
                raise NotFound(f"class {cid} is not in the index")
            images = np.array(sorted(s for s in sids if s not in self._text), np.int64)
            if images.size:
                assert self._faiss is not None
                self._faiss.remove(images)
            for sid in sids:
                self._text.pop(sid, None)
                del self._support_class[sid]
            for protos in self._protos.values():
                protos.drop(cid)
            del self._labels[cid]
            self._views.clear()

    # -- queries ------------------------------------------------------------------------------
    def _queries(self, queries: Any) -> FloatArray:
        q = _as_rows(queries, "queries")
        if self._dim is not None and q.shape[1] != self._dim:
            raise InvalidInput(
                f"queries have dimension {q.shape[1]}, the collection's is {self._dim}"
            )
        return q

    def _view(self, kind: Kind) -> tuple[IndexArray, tuple[str, ...]]:
        """Class ids and labels in row order of ``kind``'s matrix (cached; call under the lock)."""
        view = self._views.get(kind)
        if view is None:
            ids = self._protos[kind].matrix.ids.copy()
            ids.flags.writeable = False
            view = (ids, tuple(self._labels[int(c)] for c in ids))
            self._views[kind] = view
        return view

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in _KINDS:
            raise InvalidInput(f"kind must be 'image' or 'text', got {kind!r}")

    @staticmethod
    def _check_k(k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")

    def class_scores(self, queries: Any, kind: Kind = "image") -> ClassScores:
        """Every class's prototype score [Q, C] (for softmax, entropy and margins)."""
        self._check_kind(kind)
        q = self._queries(queries)
        with self._lock.read():
            if self._dim is None:
                return _no_classes(q.shape[0])
            scores = kernels.scores(q, self._protos[kind].matrix)
            ids, labels = self._view(kind)
        return ClassScores(scores, ids, labels)

    def transductive_class_scores(self, queries: Any, logit_scale: float) -> ClassScores:
        """Image-prototype scores [Q, C] after refining the prototypes with these queries
        (``server.transduction``: soft k-means weighted by the class probabilities)."""
        from server.transduction import refine

        q = self._queries(queries)
        with self._lock.read():
            if self._dim is None:
                return _no_classes(q.shape[0])
            protos = self._protos["image"]
            ids, labels = self._view("image")
            sums = np.stack([protos.sums[int(c)] for c in ids]) if len(ids) else None
            counts = np.array([protos.counts[int(c)] for c in ids], np.float64)
        if sums is None:
            return ClassScores(np.zeros((q.shape[0], 0), np.float32), ids, labels)
        metric: kernels.Metric = "cosine" if self.metric == "cosine" else "l2"
        refined = refine(sums, counts, q, metric, logit_scale)
        return ClassScores(kernels.scores(q, refined, metric=metric), ids, labels)

    def prototype_topk(self, queries: Any, k: int, kind: Kind = "image") -> TopK:
        """The ``k`` best classes per query by prototype score (``server.kernels.topk``)."""
        self._check_kind(kind)
        self._check_k(k)
        q = self._queries(queries)
        with self._lock.read():
            if self._dim is None:
                empty = np.empty((q.shape[0], 0))
                return TopK(empty.astype(np.float32), empty.astype(np.int64), ((),) * q.shape[0])
            scores, rows = kernels.topk(q, self._protos[kind].matrix, k)
            ids, labels = self._view(kind)
        class_ids = ids[rows]
        return TopK(scores, class_ids, tuple(tuple(labels[j] for j in r) for r in rows))

    def nearest_supports(self, queries: Any, k: int) -> Neighbours:
        """The ``k`` nearest image supports per query (exact below ``flat_limit``)."""
        self._check_k(k)
        q = self._queries(queries)
        with self._lock.read():
            return self._nearest(q, k)

    def _nearest(self, q: FloatArray, k: int) -> Neighbours:
        if self._faiss is None:
            empty = np.empty((q.shape[0], 0))
            return Neighbours(
                empty.astype(np.float32), empty.astype(np.int64), empty.astype(np.int64)
            )
        search_q = _unit_rows(q) if self.metric == "cosine" else q
        scores, sids = self._faiss.search(search_q, k)
        get = self._support_class.get
        cids = np.array([get(int(s), -1) for s in sids.ravel()], np.int64).reshape(sids.shape)
        return Neighbours(scores, sids, cids)

    def nearest_support_vectors(self, queries: Any) -> tuple[IndexArray, FloatArray]:
        """Each query's nearest image support: its id (-1: none) and its vector as stored
        (unit-norm for cosine; zeros for none), both read under one lock."""
        q = self._queries(queries)
        with self._lock.read():
            nb = self._nearest(q, 1)
            ids = np.full(q.shape[0], -1, np.int64)
            vecs = np.zeros((q.shape[0], self._dim or q.shape[1]), np.float32)
            if nb.support_ids.shape[1]:
                ids = nb.support_ids[:, 0].astype(np.int64)
                found = ids >= 0
                if found.any():
                    assert self._faiss is not None
                    vecs[found] = self._faiss.vectors(ids[found])
        return ids, vecs

    def knn(self, queries: Any, k: int, *, temperature: float = DEFAULT_TEMPERATURE) -> ClassScores:
        """Class votes of the ``k`` nearest image supports (see the module docstring).

        Columns are the image classes in the order of ``class_scores(kind="image")``.
        """
        if not temperature > 0:
            raise InvalidInput(f"temperature must be positive, got {temperature!r}")
        self._check_k(k)
        q = self._queries(queries)
        with self._lock.read():
            nb = self._nearest(q, k)
            if self._dim is None:
                return _no_classes(q.shape[0])
            ids, labels = self._view("image")
            rows = self._protos["image"].rows
            cols = np.array([rows.get(int(c), -1) for c in nb.class_ids.ravel()], np.int64)
        cols = cols.reshape(nb.class_ids.shape)
        valid = cols >= 0
        if math.isinf(temperature):
            weights = valid.astype(np.float64)
        else:
            s = np.where(valid, nb.scores.astype(np.float64), -np.inf)
            top = np.max(s, axis=1, keepdims=True, initial=-np.inf)
            weights = np.where(
                valid, np.exp((s - np.where(np.isfinite(top), top, 0)) / temperature), 0
            )
        total = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        votes = np.zeros((q.shape[0], len(ids)), np.float64)
        qi = np.broadcast_to(np.arange(q.shape[0])[:, None], cols.shape)
        np.add.at(votes, (qi[valid], cols[valid]), weights[valid])
        return ClassScores(votes.astype(np.float32), ids, labels)

    # -- introspection ------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def support_index_kind(self) -> str:
        """``"flat"`` (exact) or ``"ivf"`` (approximate), see ``FLAT_LIMIT``."""
        with self._lock.read():
            return "flat" if self._faiss is None else self._faiss.kind

    def labels(self) -> dict[int, str]:
        with self._lock.read():
            return dict(self._labels)

    def support_ids(self) -> dict[int, int]:
        """Support id -> class id, every support."""
        with self._lock.read():
            return dict(self._support_class)

    def missing_supports(self, support_ids: Iterable[int]) -> set[int]:
        """Those of ``support_ids`` not in the index (without copying the whole map)."""
        with self._lock.read():
            return {sid for sid in support_ids if sid not in self._support_class}

    def prototypes(self, kind: Kind = "image") -> tuple[IndexArray, FloatArray]:
        """(class ids, rows as stored: normalised for cosine), a consistent copy."""
        self._check_kind(kind)
        with self._lock.read():
            if self._dim is None:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            m = self._protos[kind].matrix
            return m.ids.copy(), m.to_numpy().copy()

    def num_supports(self) -> int:
        with self._lock.read():
            return len(self._support_class)

    def num_classes(self) -> int:
        with self._lock.read():
            return len(self._labels)
