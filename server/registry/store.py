"""The registry's source of truth: collections, classes and supports in embedded SQLite.

One database file, ``registry.sqlite3``, lives under the data dir. It is opened in WAL mode
with ``synchronous=FULL``: every commit appends to the write-ahead log and fsyncs it before
``COMMIT`` returns, so a method that has returned survives SIGKILL of the process *and* a
power loss (``NORMAL`` would survive only the former). A transaction that had not committed
is rolled back on the next open, so nothing is ever half-applied.

Concurrency: all writes go through one connection behind a lock (SQLite has one writer at a
time anyway); reads use a small pool of other connections, and WAL lets them read a consistent
snapshot while a write is in progress, so readers and the writer never block each other.
A lock file (``registry.lock``, ``flock``) stops a second process - or a second ``Store`` in
this one - from opening the same data dir.

Schema (version 1; applied versions are recorded in ``schema_migrations``)::

    collections  id, name UNIQUE, model, method, metric, threshold NULL,
                 hybrid_alpha, hybrid_beta, dim NULL (fixed by the first support), created_at
    classes      id, collection_id -> collections ON DELETE CASCADE, label, created_at,
                 UNIQUE (collection_id, label)
    supports     id, class_id -> classes ON DELETE CASCADE, kind 'image'|'text',
                 text (kind text) | content_hash + source NULL (kind image),
                 dim, embedding BLOB (little-endian float32, CHECK length = 4 * dim), created_at
    text_prompts support_id -> supports ON DELETE CASCADE, templates (JSON list of the
                 format strings a text support was expanded with into its ensemble embedding)

Ids use AUTOINCREMENT: a deleted class or support id is never handed out again, so a client
holding a stale id cannot remove someone else's support. A class always has at least one
support (removing the last one is refused: remove the class instead).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from server.registry.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound

__all__ = [
    "DB_FILENAME",
    "DEFAULT_HYBRID_ALPHA",
    "DEFAULT_HYBRID_BETA",
    "SCHEMA_VERSION",
    "ClassInfo",
    "Collection",
    "CollectionSpec",
    "EmbeddingRow",
    "Registration",
    "Store",
    "Support",
    "SupportInput",
    "image_hash",
]

Method = Literal["prototype", "knn", "zero-shot", "hybrid"]
Metric = Literal["cosine", "l2"]
Kind = Literal["image", "text"]
FloatArray = npt.NDArray[np.float32]

METHODS: tuple[str, ...] = ("prototype", "knn", "zero-shot", "hybrid")
METRICS: tuple[str, ...] = ("cosine", "l2")
KINDS: tuple[str, ...] = ("image", "text")
# Tip-Adapter's ImageNet setting (Zhang et al., ECCV 2022): alpha = 1, beta = 5.5.
DEFAULT_HYBRID_ALPHA = 1.0
DEFAULT_HYBRID_BETA = 5.5

DB_FILENAME = "registry.sqlite3"
LOCK_FILENAME = "registry.lock"
MAX_NAME = 128
MAX_LABEL = 256
MAX_TEXT = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# -- records ------------------------------------------------------------------------------
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


# -- schema ---------------------------------------------------------------------------------
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "collections, classes, supports, text_prompts",
        (
            """CREATE TABLE collections (
                id           INTEGER PRIMARY KEY AUTOINCREMENT,
                name         TEXT    NOT NULL UNIQUE,
                model        TEXT    NOT NULL,
                method       TEXT    NOT NULL
                             CHECK (method IN ('prototype', 'knn', 'zero-shot', 'hybrid')),
                metric       TEXT    NOT NULL CHECK (metric IN ('cosine', 'l2')),
                threshold    REAL,
                hybrid_alpha REAL    NOT NULL,
                hybrid_beta  REAL    NOT NULL,
                dim          INTEGER CHECK (dim IS NULL OR dim > 0),
                created_at   REAL    NOT NULL
            )""",
            """CREATE TABLE classes (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
                label         TEXT    NOT NULL,
                created_at    REAL    NOT NULL,
                UNIQUE (collection_id, label)
            )""",
            """CREATE TABLE supports (
                id           INTEGER PRIMARY KEY AUTOINCREMENT,
                class_id     INTEGER NOT NULL REFERENCES classes(id) ON DELETE CASCADE,
                kind         TEXT    NOT NULL CHECK (kind IN ('image', 'text')),
                text         TEXT,
                content_hash TEXT,
                source       TEXT,
                dim          INTEGER NOT NULL CHECK (dim > 0),
                embedding    BLOB    NOT NULL CHECK (length(embedding) = 4 * dim),
                created_at   REAL    NOT NULL,
                CHECK ((kind = 'image' AND content_hash IS NOT NULL AND text IS NULL)
                    OR (kind = 'text' AND text IS NOT NULL AND content_hash IS NULL))
            )""",
            "CREATE INDEX supports_by_class ON supports(class_id)",
            """CREATE TABLE text_prompts (
                support_id INTEGER PRIMARY KEY REFERENCES supports(id) ON DELETE CASCADE,
                templates  TEXT NOT NULL
            )""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COLLECTION_COLS = (
    "id, name, model, method, metric, threshold, hybrid_alpha, hybrid_beta, dim, created_at"
)
_SUPPORT_SELECT = """
    SELECT s.id, s.class_id, c.label, s.kind, s.text, s.content_hash, s.source,
           p.templates, s.dim, s.created_at
    FROM supports s JOIN classes c ON c.id = s.class_id
    LEFT JOIN text_prompts p ON p.support_id = s.id
"""
_CLASS_SELECT = """
    SELECT c.id, c.label,
           COALESCE(SUM(s.kind = 'image'), 0), COALESCE(SUM(s.kind = 'text'), 0), c.created_at
    FROM classes c LEFT JOIN supports s ON s.class_id = c.id
"""


def _collection(row: Any) -> Collection:
    return Collection(*row)


def _support(row: Any) -> Support:
    templates = None if row[7] is None else tuple(json.loads(row[7]))
    sid, class_id, label, kind, text, content_hash, source, _, dim, created_at = row
    return Support(
        sid, class_id, label, kind, text, content_hash, source, templates, dim, created_at
    )


# -- validation -----------------------------------------------------------------------------
def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput("collection name must be a non-empty string")
    if len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"collection name {name!r} must be 1-{MAX_NAME} characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_label(label: object) -> str:
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


def _check_spec(spec: CollectionSpec) -> None:
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


def _check_support(where: str, s: SupportInput, metric: str) -> FloatArray:
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


# -- the store ------------------------------------------------------------------------------
class Store:
    """Durable registry state under ``data_dir`` (created if missing). Thread-safe.

    Every mutating method runs in one ``BEGIN IMMEDIATE`` transaction and returns only after
    ``COMMIT`` (fsynced); on any error it rolls back and raises, leaving nothing behind.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILENAME
        self._busy_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_dir_lock()
        try:
            self._writer = self._connect()
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise FailedPrecondition(
                    f"data dir {self.data_dir}: SQLite cannot use WAL mode here (got {mode!r})"
                )
            self._writer.execute("PRAGMA synchronous=FULL")
            self._migrate()
            _fsync_dir(self.data_dir)
        except BaseException:
            self._closed = True
            if hasattr(self, "_writer"):
                self._writer.close()
            os.close(self._lock_fd)
            raise

    # -- plumbing ---------------------------------------------------------------------------
    def _take_dir_lock(self) -> int:
        fd = os.open(self.data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"data dir {self.data_dir} is already in use by another registry store"
            ) from None
        return fd

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_ms / 1000
        )
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"registry store at {self.data_dir} is closed")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (and fsynced) on exit, rolled back on any error."""
        with self._write_lock:
            self._check_open()
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A pooled reader inside one read transaction (a consistent snapshot)."""
        with self._pool_lock:
            self._check_open()
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        finally:
            with self._pool_lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
            newer = sorted(v for v in applied if v > SCHEMA_VERSION)
            if newer:
                raise FailedPrecondition(
                    f"data dir {self.data_dir} has schema version {newer[-1]}, newer than this "
                    f"build's {SCHEMA_VERSION}: upgrade protoserve"
                )
            for version, description, statements in MIGRATIONS:
                if version in applied:
                    continue
                for sql in statements:
                    conn.execute(sql)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (version, description, time.time()),
                )

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

    def close(self) -> None:
        """Closes every connection and releases the data dir. Idempotent."""
        with self._write_lock, self._pool_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._idle:
                conn.close()
            self._idle.clear()
            self._writer.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _collection_row(conn: sqlite3.Connection, name: str) -> Collection:
        row = conn.execute(
            f"SELECT {_COLLECTION_COLS} FROM collections WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"collection {name!r} not found")
        return _collection(row)

    @staticmethod
    def _class_info(conn: sqlite3.Connection, coll: Collection, label: str) -> ClassInfo:
        row = conn.execute(
            _CLASS_SELECT + " WHERE c.collection_id = ? AND c.label = ? GROUP BY c.id",
            (coll.id, label),
        ).fetchone()
        if row is None:
            raise NotFound(f"class {label!r} not found in collection {coll.name!r}")
        return ClassInfo(row[0], coll.name, row[1], int(row[2]), int(row[3]), row[4])

    # -- collections ------------------------------------------------------------------------
    def create_collection(self, spec: CollectionSpec) -> Collection:
        _check_spec(spec)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"collection {spec.name!r} already exists")
            conn.execute(
                "INSERT INTO collections (name, model, method, metric, threshold, hybrid_alpha, "
                "hybrid_beta, dim, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    spec.name,
                    spec.model,
                    spec.method,
                    spec.metric,
                    None if spec.threshold is None else float(spec.threshold),
                    float(spec.hybrid_alpha),
                    float(spec.hybrid_beta),
                    spec.dim,
                    time.time(),
                ),
            )
            return self._collection_row(conn, spec.name)

    def get_collection(self, name: str) -> Collection:
        with self._read() as conn:
            return self._collection_row(conn, name)

    def list_collections(self) -> list[Collection]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_COLLECTION_COLS} FROM collections ORDER BY name")
            return [_collection(r) for r in rows]

    def delete_collection(self, name: str) -> Collection:
        """Deletes a collection with all its classes and supports; returns what was deleted."""
        with self._write() as conn:
            coll = self._collection_row(conn, name)
            conn.execute("DELETE FROM collections WHERE id = ?", (coll.id,))
            return coll

    # -- classes and supports ---------------------------------------------------------------
    def add_supports(
        self, collection: str, label: str, supports: Sequence[SupportInput]
    ) -> Registration:
        """Creates class ``label`` (if new) and appends ``supports`` to it, in one transaction."""
        _check_label(label)
        if isinstance(supports, SupportInput) or not isinstance(supports, Sequence):
            raise InvalidInput("supports must be a sequence of SupportInput")
        if not supports:
            raise InvalidInput(f"class {label!r}: give at least one support")
        with self._write() as conn:
            coll = self._collection_row(conn, collection)
            where = f"collection {collection!r}, class {label!r}, supports"
            vecs = [_check_support(f"{where}[{i}]", s, coll.metric) for i, s in enumerate(supports)]
            dim = coll.dim if coll.dim is not None else vecs[0].shape[0]
            for i, v in enumerate(vecs):
                if v.shape[0] != dim:
                    raise InvalidInput(
                        f"{where}[{i}]: embedding has dimension {v.shape[0]}, "
                        f"the collection's is {dim}"
                    )
            if coll.dim is None:
                conn.execute("UPDATE collections SET dim = ? WHERE id = ?", (dim, coll.id))
            now = time.time()
            row = conn.execute(
                "SELECT id FROM classes WHERE collection_id = ? AND label = ?", (coll.id, label)
            ).fetchone()
            created = row is None
            if created:
                cur = conn.execute(
                    "INSERT INTO classes (collection_id, label, created_at) VALUES (?, ?, ?)",
                    (coll.id, label, now),
                )
                class_id = int(cur.lastrowid or 0)
            else:
                class_id = int(row[0])
            ids = [
                self._insert_support(conn, class_id, s, v, now)
                for s, v in zip(supports, vecs, strict=True)
            ]
            marks = ",".join("?" * len(ids))
            rows = conn.execute(_SUPPORT_SELECT + f" WHERE s.id IN ({marks}) ORDER BY s.id", ids)
            added = tuple(_support(r) for r in rows)
            return Registration(
                self._collection_row(conn, collection), class_id, label, created, added
            )

    def _insert_support(
        self, conn: sqlite3.Connection, class_id: int, s: SupportInput, vec: FloatArray, now: float
    ) -> int:
        cur = conn.execute(
            "INSERT INTO supports (class_id, kind, text, content_hash, source, dim, embedding, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                class_id,
                s.kind,
                s.text,
                s.content_hash,
                s.source,
                vec.shape[0],
                vec.tobytes(),
                now,
            ),
        )
        support_id = int(cur.lastrowid or 0)
        if s.templates is not None:
            conn.execute(
                "INSERT INTO text_prompts (support_id, templates) VALUES (?, ?)",
                (support_id, json.dumps(list(s.templates))),
            )
        return support_id

    def remove_support(self, collection: str, support_id: int) -> Support:
        """Removes one support; refuses (FailedPrecondition) to remove a class's last one."""
        with self._write() as conn:
            coll = self._collection_row(conn, collection)
            row = conn.execute(
                _SUPPORT_SELECT + " WHERE s.id = ? AND c.collection_id = ?",
                (int(support_id), coll.id),
            ).fetchone()
            if row is None:
                raise NotFound(f"support {support_id} not found in collection {collection!r}")
            sup = _support(row)
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM supports WHERE class_id = ?", (sup.class_id,)
            ).fetchone()
            if count <= 1:
                raise FailedPrecondition(
                    f"support {support_id} is the last support of class {sup.label!r} in "
                    f"collection {collection!r}; remove the class instead"
                )
            conn.execute("DELETE FROM supports WHERE id = ?", (sup.id,))
            return sup

    def remove_class(self, collection: str, label: str) -> ClassInfo:
        """Removes a class and all its supports; returns the class as it was."""
        with self._write() as conn:
            coll = self._collection_row(conn, collection)
            info = self._class_info(conn, coll, label)
            conn.execute("DELETE FROM classes WHERE id = ?", (info.id,))
            return info

    def get_class(self, collection: str, label: str) -> ClassInfo:
        with self._read() as conn:
            return self._class_info(conn, self._collection_row(conn, collection), label)

    def list_classes(self, collection: str) -> list[ClassInfo]:
        """Every class of a collection with its support counts, in creation order."""
        with self._read() as conn:
            coll = self._collection_row(conn, collection)
            rows = conn.execute(
                _CLASS_SELECT + " WHERE c.collection_id = ? GROUP BY c.id ORDER BY c.id",
                (coll.id,),
            )
            return [ClassInfo(r[0], coll.name, r[1], int(r[2]), int(r[3]), r[4]) for r in rows]

    def list_supports(self, collection: str, label: str) -> list[Support]:
        with self._read() as conn:
            info = self._class_info(conn, self._collection_row(conn, collection), label)
            rows = conn.execute(_SUPPORT_SELECT + " WHERE s.class_id = ? ORDER BY s.id", (info.id,))
            return [_support(r) for r in rows]

    def iter_embeddings(self, collection: str, *, batch: int = 1024) -> Iterator[EmbeddingRow]:
        """Every support embedding of a collection (one snapshot), in support-id order.

        A generator: ``NotFound`` is raised on the first ``next``. Embeddings are float32
        copies, independent of the database.
        """
        with self._read() as conn:
            coll = self._collection_row(conn, collection)
            cur = conn.execute(
                "SELECT s.id, s.class_id, c.label, s.kind, s.embedding FROM supports s "
                "JOIN classes c ON c.id = s.class_id WHERE c.collection_id = ? ORDER BY s.id",
                (coll.id,),
            )
            while rows := cur.fetchmany(batch):
                for sid, cid, label, kind, blob in rows:
                    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    yield EmbeddingRow(sid, cid, label, kind, vec)


def _fsync_dir(path: Path) -> None:
    """Makes the directory entries of the database files durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
