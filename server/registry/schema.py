"""The registry's SQL schema: the migrations that create it and the row-to-record mapping.

Schema (version 2; applied versions are recorded in ``schema_migrations``)::

    collections  id, name UNIQUE, model, method, metric, threshold NULL,
                 hybrid_alpha, hybrid_beta, dim NULL (fixed by the first support), created_at
    classes      id, collection_id -> collections ON DELETE CASCADE, label, created_at,
                 UNIQUE (collection_id, label)
    supports     id, class_id -> classes ON DELETE CASCADE, kind 'image'|'text',
                 text (kind text) | content_hash + source NULL (kind image),
                 dim, embedding BLOB (little-endian float32, CHECK length = 4 * dim), created_at
    text_prompts support_id -> supports ON DELETE CASCADE, templates (JSON list of the
                 format strings a text support was expanded with into its ensemble embedding)

Version 2 adds the change log that lets several server processes share one data dir
(``server.registry.changes``)::

    changes      seq (AUTOINCREMENT: commit order), op, collection_id, collection (name),
                 class_id NULL, support_ids (JSON list), at

Ids use AUTOINCREMENT: a deleted class or support id is never handed out again, so a client
holding a stale id cannot remove someone else's support.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from server.registry.errors import FailedPrecondition
from server.registry.records import ClassInfo, Collection, Support

__all__ = [
    "CLASS_SELECT",
    "COLLECTION_COLS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SUPPORT_SELECT",
    "class_from_row",
    "collection_from_row",
    "migrate",
    "support_from_row",
]

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
    (
        2,
        "changes: the log other server processes follow",
        (
            """CREATE TABLE changes (
                seq           INTEGER PRIMARY KEY AUTOINCREMENT,
                op            TEXT    NOT NULL CHECK (op IN ('create_collection',
                              'delete_collection', 'add_supports', 'remove_support',
                              'remove_class')),
                collection_id INTEGER NOT NULL,
                collection    TEXT    NOT NULL,
                class_id      INTEGER,
                support_ids   TEXT    NOT NULL DEFAULT '[]',
                at            REAL    NOT NULL
            )""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

COLLECTION_COLS = (
    "id, name, model, method, metric, threshold, hybrid_alpha, hybrid_beta, dim, created_at"
)
SUPPORT_SELECT = """
    SELECT s.id, s.class_id, c.label, s.kind, s.text, s.content_hash, s.source,
           p.templates, s.dim, s.created_at
    FROM supports s JOIN classes c ON c.id = s.class_id
    LEFT JOIN text_prompts p ON p.support_id = s.id
"""
CLASS_SELECT = """
    SELECT c.id, c.label,
           COALESCE(SUM(s.kind = 'image'), 0), COALESCE(SUM(s.kind = 'text'), 0), c.created_at
    FROM classes c LEFT JOIN supports s ON s.class_id = c.id
"""


def collection_from_row(row: Any) -> Collection:
    return Collection(*row)


def support_from_row(row: Any) -> Support:
    templates = None if row[7] is None else tuple(json.loads(row[7]))
    sid, class_id, label, kind, text, content_hash, source, _, dim, created_at = row
    return Support(
        sid, class_id, label, kind, text, content_hash, source, templates, dim, created_at
    )


def class_from_row(row: Any, collection: str) -> ClassInfo:
    """A ``CLASS_SELECT`` row of a class of ``collection`` (by name)."""
    return ClassInfo(row[0], collection, row[1], int(row[2]), int(row[3]), row[4])


def migrate(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Brings the database up to ``SCHEMA_VERSION`` (call inside a write transaction).

    Refuses (FailedPrecondition) a database written by a newer build.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
    newer = sorted(v for v in applied if v > SCHEMA_VERSION)
    if newer:
        raise FailedPrecondition(
            f"data dir {data_dir} has schema version {newer[-1]}, newer than this "
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
