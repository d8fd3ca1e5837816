"""The registry's source of truth: collections, classes and supports, one transaction a change.

``Store`` runs each operation on the durable database of ``server.registry.database`` (WAL,
``synchronous=FULL``, one writer and a reader pool) with the tables of
``server.registry.schema``, after ``server.registry.validation`` has checked the input. A class
always has at least one support (removing the last one is refused: remove the class instead).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from server.registry import changes
from server.registry.database import DB_FILENAME, Database
from server.registry.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from server.registry.records import (
    DEFAULT_HYBRID_ALPHA,
    DEFAULT_HYBRID_BETA,
    ClassInfo,
    Collection,
    CollectionSpec,
    EmbeddingRow,
    FloatArray,
    Registration,
    Support,
    SupportInput,
    image_hash,
)
from server.registry.schema import (
    CLASS_SELECT,
    COLLECTION_COLS,
    SCHEMA_VERSION,
    SUPPORT_SELECT,
    class_from_row,
    collection_from_row,
    support_from_row,
)
from server.registry.validation import check_label, check_spec, check_support

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


class Store(Database):
    """Durable registry state under ``data_dir`` (created if missing). Thread-safe.

    Every mutating method runs in one ``BEGIN IMMEDIATE`` transaction and returns only after
    ``COMMIT`` (fsynced); on any error it rolls back and raises, leaving nothing behind.
    """

    @staticmethod
    def _collection_row(conn: sqlite3.Connection, name: str) -> Collection:
        row = conn.execute(
            f"SELECT {COLLECTION_COLS} FROM collections WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"collection {name!r} not found")
        return collection_from_row(row)

    @staticmethod
    def _class_info(conn: sqlite3.Connection, coll: Collection, label: str) -> ClassInfo:
        row = conn.execute(
            CLASS_SELECT + " WHERE c.collection_id = ? AND c.label = ? GROUP BY c.id",
            (coll.id, label),
        ).fetchone()
        if row is None:
            raise NotFound(f"class {label!r} not found in collection {coll.name!r}")
        return class_from_row(row, coll.name)

    # -- collections ------------------------------------------------------------------------
    def create_collection(self, spec: CollectionSpec) -> Collection:
        check_spec(spec)
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
            coll = self._collection_row(conn, spec.name)
            changes.record(conn, "create_collection", coll.id, coll.name)
            return coll

    def get_collection(self, name: str) -> Collection:
        with self._read() as conn:
            return self._collection_row(conn, name)

    def list_collections(self) -> list[Collection]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {COLLECTION_COLS} FROM collections ORDER BY name")
            return [collection_from_row(r) for r in rows]

    def delete_collection(self, name: str) -> Collection:
        """Deletes a collection with all its classes and supports; returns what was deleted."""
        with self._write() as conn:
            coll = self._collection_row(conn, name)
            conn.execute("DELETE FROM collections WHERE id = ?", (coll.id,))
            changes.record(conn, "delete_collection", coll.id, coll.name)
            return coll

    # -- classes and supports ---------------------------------------------------------------
    def add_supports(
        self, collection: str, label: str, supports: Sequence[SupportInput]
    ) -> Registration:
        """Creates class ``label`` (if new) and appends ``supports`` to it, in one transaction."""
        check_label(label)
        if isinstance(supports, SupportInput) or not isinstance(supports, Sequence):
            raise InvalidInput("supports must be a sequence of SupportInput")
        if not supports:
            raise InvalidInput(f"class {label!r}: give at least one support")
        with self._write() as conn:
            coll = self._collection_row(conn, collection)
            where = f"collection {collection!r}, class {label!r}, supports"
            vecs = [check_support(f"{where}[{i}]", s, coll.metric) for i, s in enumerate(supports)]
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
            rows = conn.execute(SUPPORT_SELECT + f" WHERE s.id IN ({marks}) ORDER BY s.id", ids)
            added = tuple(support_from_row(r) for r in rows)
            changes.record(
                conn, "add_supports", coll.id, coll.name, class_id=class_id, support_ids=ids
            )
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
                SUPPORT_SELECT + " WHERE s.id = ? AND c.collection_id = ?",
                (int(support_id), coll.id),
            ).fetchone()
            if row is None:
                raise NotFound(f"support {support_id} not found in collection {collection!r}")
            sup = support_from_row(row)
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM supports WHERE class_id = ?", (sup.class_id,)
            ).fetchone()
            if count <= 1:
                raise FailedPrecondition(
                    f"support {support_id} is the last support of class {sup.label!r} in "
                    f"collection {collection!r}; remove the class instead"
                )
            conn.execute("DELETE FROM supports WHERE id = ?", (sup.id,))
            changes.record(
                conn,
                "remove_support",
                coll.id,
                coll.name,
                class_id=sup.class_id,
                support_ids=[sup.id],
            )
            return sup

    def remove_class(self, collection: str, label: str) -> ClassInfo:
        """Removes a class and all its supports; returns the class as it was."""
        with self._write() as conn:
            coll = self._collection_row(conn, collection)
            info = self._class_info(conn, coll, label)
            conn.execute("DELETE FROM classes WHERE id = ?", (info.id,))
            changes.record(conn, "remove_class", coll.id, coll.name, class_id=info.id)
            return info

    def get_class(self, collection: str, label: str) -> ClassInfo:
        with self._read() as conn:
            return self._class_info(conn, self._collection_row(conn, collection), label)

    def list_classes(self, collection: str) -> list[ClassInfo]:
        """Every class of a collection with its support counts, in creation order."""
        with self._read() as conn:
            coll = self._collection_row(conn, collection)
            rows = conn.execute(
                CLASS_SELECT + " WHERE c.collection_id = ? GROUP BY c.id ORDER BY c.id",
                (coll.id,),
            )
            return [class_from_row(r, coll.name) for r in rows]

    def list_supports(self, collection: str, label: str) -> list[Support]:
        with self._read() as conn:
            info = self._class_info(conn, self._collection_row(conn, collection), label)
            rows = conn.execute(SUPPORT_SELECT + " WHERE s.class_id = ? ORDER BY s.id", (info.id,))
            return [support_from_row(r) for r in rows]

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
                yield from map(_embedding_row, rows)

    # -- the change log (server.registry.changes) ---------------------------------------------
    def latest_change(self) -> int:
        """The seq of the last committed change (0: none)."""
        with self._read() as conn:
            return changes.latest(conn)

    def changes_since(self, seq: int) -> tuple[list[changes.Change], bool]:
        """The changes committed after ``seq``, and whether the log still holds all of them."""
        with self._read() as conn:
            return changes.since(conn, seq)

    def embeddings_by_id(
        self, collection_id: int, support_ids: Sequence[int]
    ) -> list[EmbeddingRow]:
        """The supports among ``support_ids`` that still exist in collection ``collection_id``
        (by id, so a re-created collection of the same name does not match), in id order."""
        ids = [int(i) for i in support_ids]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._read() as conn:
            rows = conn.execute(
                "SELECT s.id, s.class_id, c.label, s.kind, s.embedding FROM supports s "
                "JOIN classes c ON c.id = s.class_id "
                f"WHERE c.collection_id = ? AND s.id IN ({marks}) ORDER BY s.id",
                (int(collection_id), *ids),
            ).fetchall()
        return [_embedding_row(r) for r in rows]


def _embedding_row(row: Any) -> EmbeddingRow:
    """``(support id, class id, label, kind, embedding blob)`` -> a float32 ``EmbeddingRow``."""
    sid, cid, label, kind, blob = row
    return EmbeddingRow(sid, cid, label, kind, np.frombuffer(blob, dtype="<f4").astype(np.float32))
