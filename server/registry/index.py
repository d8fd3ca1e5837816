"""In-memory serving state of one collection: class prototypes and the support index.

Built from the store at start-up (``CollectionIndex.from_rows``) and then changed
incrementally on every registration or removal; nothing is rebuilt per change.

* **Prototypes** (ProtoNet class means) live in ``server.kernels.PrototypeMatrix`` rows keyed by
  the store's class ids (``PrototypeMatrix.ids``; removal is a swap-remove, and the
  ``class id -> row`` map follows the moved row). There are two matrices per collection:
  ``"image"`` - the mean of a class's image supports (each L2-normalised first for cosine, so
  the prototype is the normalised mean of unit vectors; the plain mean for l2) - and ``"text"``
  - the zero-shot class weights, the normalised mean of the class's normalised text supports
  (open_clip's prompt ensemble), always cosine as CLIP's zero-shot logits are. A class appears
  in a matrix only while it has supports of that kind. Per class and kind a float64 running sum
  and count are kept, so adding or removing a support costs O(D).
* **Supports**: every image support is in a FAISS index keyed by its support id (text supports
  are not: they are a zero-shot signal, not a neighbour to vote with). Up to ``flat_limit``
  (default ``FLAT_LIMIT`` = 50,000) supports it is exact: ``IndexIDMap2`` over
  ``IndexFlatIP`` (cosine, on unit vectors) or ``IndexFlatL2``. Above it the index is rebuilt
  once as ``IndexIVFFlat`` with ``nlist = round(sqrt(N))`` lists trained on the current
  supports and ``nprobe = 32`` lists probed per query (a hashtable direct map keeps removal
  and reconstruction by id). Why 50,000: a flat scan costs N*D multiply-adds per query -
  25.6 M at D = 512, about 1-2 ms of one core - and grows linearly, while IVF at that size scans
  about 13% of the supports (a 7x speed-up measured at N = 60,000) for **approximate** results:
  recall@10 against the exact search measured 0.998 on clustered embeddings (2,000 classes,
  D = 128) but only 0.66 on near-uniform ones, so smaller collections stay exact. The switch
  (k-means training, ~1 s single-threaded at 50,000 x 128) happens under the write lock, so it
  pauses that collection once; below ``flat_limit // 2`` supports the index goes back to flat
  (the gap stops flapping). New supports added to an IVF index use the centroids trained at the
  switch; a restart retrains them. Where ``faiss.get_num_gpus() > 0`` searches run on a GPU
  copy of the index: additions are applied to it directly, a removal marks it stale and the
  next search uploads it again; the CPU index stays the source, and any GPU error falls back to
  it for good.

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

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from server import kernels
from server.registry.errors import InvalidInput, NotFound
from server.registry.store import EmbeddingRow

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

log = logging.getLogger(__name__)

Kind = Literal["image", "text"]
FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

FLAT_LIMIT = 50_000
DEFAULT_NPROBE = 32
DEFAULT_TEMPERATURE = 0.1
GPU_MAX_K = 2048  # FAISS GPU k-selection limit
_KINDS: tuple[Kind, ...] = ("image", "text")


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassScores:
    """Scores of every class of one kind: ``scores[q, j]`` is for ``class_ids[j]``/``labels[j]``."""

    scores: FloatArray
    class_ids: IndexArray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class TopK:
    """Best-first: ``scores``/``class_ids`` are [Q, k'] with ``k' = min(k, classes)``."""

    scores: FloatArray
    class_ids: IndexArray
    labels: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Neighbours:
    """Nearest image supports, best first, [Q, k']; missing ones are id -1 with score -inf."""

    scores: FloatArray
    support_ids: IndexArray
    class_ids: IndexArray


# -- locking --------------------------------------------------------------------------------
class RWLock:
    """Many readers or one writer; a waiting writer holds new readers back. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- helpers --------------------------------------------------------------------------------
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


def ivf_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: about sqrt(n), with >= 39 training points per list."""
    return max(1, min(round(math.sqrt(n)), n // 39))


# -- class prototypes of one kind -----------------------------------------------------------
class _Prototypes:
    """Per-class running sums/counts and the PrototypeMatrix rows they produce."""

    def __init__(self, dim: int, metric: kernels.Metric, dtype: kernels.Dtype) -> None:
        self.matrix = kernels.PrototypeMatrix(
            np.zeros((0, dim), np.float32), dtype=dtype, metric=metric, dim=dim
        )
        self.sums: dict[int, npt.NDArray[np.float64]] = {}
        self.counts: dict[int, int] = {}
        self.rows: dict[int, int] = {}

    def add(self, class_id: int, vecs: FloatArray) -> None:
        total = vecs.sum(axis=0, dtype=np.float64)
        if class_id in self.sums:
            self.sums[class_id] += total
            self.counts[class_id] += vecs.shape[0]
        else:
            self.sums[class_id] = total
            self.counts[class_id] = vecs.shape[0]
        self._write_row(class_id)

    def subtract(self, class_id: int, vecs: FloatArray) -> None:
        self.sums[class_id] -= vecs.sum(axis=0, dtype=np.float64)
        self.counts[class_id] -= vecs.shape[0]
        if self.counts[class_id] <= 0:
            self.drop(class_id)
        else:
            self._write_row(class_id)

    def drop(self, class_id: int) -> None:
        self.sums.pop(class_id, None)
        self.counts.pop(class_id, None)
        row = self.rows.pop(class_id, None)
        if row is None:
            return
        if self.matrix.remove(row) is not None:  # the last row moved into `row`
            self.rows[int(self.matrix.ids[row])] = row

    def _write_row(self, class_id: int) -> None:
        mean = (self.sums[class_id] / self.counts[class_id]).astype(np.float32)
        row = self.rows.get(class_id)
        if row is None:
            self.matrix.append(mean.reshape(1, -1), ids=[class_id])
            self.rows[class_id] = len(self.matrix) - 1
        else:
            self.matrix.update(row, mean)


# -- the FAISS support index ----------------------------------------------------------------
class _GpuMirror:
    """A GPU copy of a CPU FAISS index for searching (GPU indexes are not thread-safe)."""

    def __init__(self) -> None:
        self._res = faiss.StandardGpuResources()
        self._index: Any = None
        self._lock = threading.Lock()

    def search(self, cpu: Any, q: FloatArray, k: int) -> tuple[Any, Any]:
        with self._lock:
            if self._index is None:
                self._index = faiss.index_cpu_to_gpu(self._res, 0, cpu)
            return self._index.search(q, k)  # type: ignore[no-any-return]

    def add(self, vecs: FloatArray, ids: IndexArray) -> None:
        with self._lock:
            if self._index is not None:
                try:
                    self._index.add_with_ids(vecs, ids)
                except RuntimeError:
                    self._index = None

    def invalidate(self) -> None:
        with self._lock:
            self._index = None


class _SupportIndex:
    """Image supports by id: exact flat search, IVF above ``flat_limit``. Caller locks."""

    def __init__(self, dim: int, metric: str, flat_limit: int, nprobe: int, use_gpu: bool) -> None:
        self.dim = dim
        self.ip = metric == "cosine"
        self.flat_limit = flat_limit
        self.nprobe = nprobe
        self.kind = "flat"
        self._keep: list[Any] = []  # sub-indexes FAISS refers to
        self.index: Any = self._flat()
        self._gpu: _GpuMirror | None = None
        if use_gpu:
            try:
                self._gpu = _GpuMirror()
            except Exception:
                log.warning("FAISS GPU resources unavailable; searching on the CPU", exc_info=True)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _flat(self) -> Any:
        base = faiss.IndexFlatIP(self.dim) if self.ip else faiss.IndexFlatL2(self.dim)
        self._keep = [base]
        return faiss.IndexIDMap2(base)

    def _ivf(self, vecs: FloatArray) -> Any:
        nlist = ivf_nlist(vecs.shape[0])
        quantizer = faiss.IndexFlatIP(self.dim) if self.ip else faiss.IndexFlatL2(self.dim)
        metric = faiss.METRIC_INNER_PRODUCT if self.ip else faiss.METRIC_L2
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
        ivf.cp.min_points_per_centroid = 1  # nlist is already capped at n // 39
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.train(vecs)
        ivf.nprobe = min(self.nprobe, nlist)
        self._keep = [quantizer]
        return ivf

    def build(self, ids: IndexArray, vecs: FloatArray) -> None:
        """Replaces the contents with ``vecs`` (flat or IVF by size)."""
        if vecs.shape[0] > self.flat_limit:
            index, kind = self._ivf(vecs), "ivf"
        else:
            index, kind = self._flat(), "flat"
        if vecs.shape[0]:
            index.add_with_ids(vecs, ids)
        self.index, self.kind = index, kind
        if self._gpu is not None:
            self._gpu.invalidate()

    def add(self, ids: IndexArray, vecs: FloatArray) -> None:
        self.index.add_with_ids(vecs, ids)
        if self._gpu is not None:
            self._gpu.add(vecs, ids)
        if self.kind == "flat" and self.ntotal > self.flat_limit:
            self._switch()

    def remove(self, ids: IndexArray) -> None:
        self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        if self._gpu is not None:
            self._gpu.invalidate()
        if self.kind == "ivf" and self.ntotal < self.flat_limit // 2:
            self._switch()

    def vectors(self, ids: IndexArray) -> FloatArray:
        out: FloatArray = np.asarray(
            self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64)), np.float32
        ).reshape(len(ids), self.dim)
        return out

    def _switch(self) -> None:
        if self.kind == "flat":
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        else:
            ids = self._ivf_ids()
        vecs = self.vectors(ids)
        before = self.kind
        self.build(ids, vecs)
        log.info("support index: %s -> %s at %d supports", before, self.kind, len(ids))

    def _ivf_ids(self) -> IndexArray:
        lists = self.index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(self.index.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def search(self, q: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        k = min(k, self.ntotal)
        if k == 0:
            return np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64)
        d: Any = None
        if self._gpu is not None and k <= GPU_MAX_K:
            try:
                d, i = self._gpu.search(self.index, q, k)
            except Exception:
                log.warning("FAISS GPU search failed; using the CPU from now on", exc_info=True)
                self._gpu = None
        if d is None:
            d, i = self.index.search(q, k)
        ids = np.asarray(i, dtype=np.int64)
        scores = np.asarray(d, dtype=np.float32)
        if not self.ip:
            scores = -scores
        scores[ids < 0] = -np.inf
        return scores, ids


# -- one collection -------------------------------------------------------------------------
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
        self._protos: dict[Kind, _Prototypes] = {}
        self._faiss: _SupportIndex | None = None
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
            "image": _Prototypes(dim, image_metric, self._dtype),
            "text": _Prototypes(dim, "cosine", self._dtype),
        }
        self._faiss = _SupportIndex(dim, self.metric, self._flat_limit, self._nprobe, self._use_gpu)
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

    def class_scores(self, queries: Any, kind: Kind = "image") -> ClassScores:
        """Every class's prototype score [Q, C] (for softmax, entropy and margins)."""
        self._check_kind(kind)
        q = self._queries(queries)
        with self._lock.read():
            if self._dim is None:
                return ClassScores(np.empty((q.shape[0], 0), np.float32), np.empty(0, np.int64), ())
            scores = kernels.scores(q, self._protos[kind].matrix)
            ids, labels = self._view(kind)
        return ClassScores(scores, ids, labels)

    def prototype_topk(self, queries: Any, k: int, kind: Kind = "image") -> TopK:
        """The ``k`` best classes per query by prototype score (``server.kernels.topk``)."""
        self._check_kind(kind)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
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

    def knn(self, queries: Any, k: int, *, temperature: float = DEFAULT_TEMPERATURE) -> ClassScores:
        """Class votes of the ``k`` nearest image supports (see the module docstring).

        Columns are the image classes in the order of ``class_scores(kind="image")``.
        """
        if not temperature > 0:
            raise InvalidInput(f"temperature must be positive, got {temperature!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        q = self._queries(queries)
        with self._lock.read():
            nb = self._nearest(q, k)
            if self._dim is None:
                return ClassScores(np.empty((q.shape[0], 0), np.float32), np.empty(0, np.int64), ())
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
