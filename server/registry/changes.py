"""The change log: every committed change to the registry, in commit order.

A server may run as several processes over one data dir (``protoserve serve --processes N``).
Each keeps its own in-memory indexes, so a registration acknowledged by one process has to
reach the others. Each mutating ``Store`` method therefore appends one row to the ``changes``
table *in the same transaction* as the change itself: the row is durable exactly when the
change is. ``seq`` is an AUTOINCREMENT key and SQLite has one writer at a time, so ``seq``
order is commit order. Other processes read the rows past the last ``seq`` they applied
(``server.registry.Registry`` in shared mode) and apply them to their indexes in that order.

A row names what changed, not the data: ``add_supports`` lists the new support ids, whose
embeddings the follower reads from the ``supports`` table. Applying a row twice, or a row
whose supports are gone by now, is harmless (``Registry`` skips what is already applied),
which is what makes a follower's start-up simple: note the last ``seq``, load every
collection, then replay the rows past that ``seq``.

The log keeps the last ``KEEP`` rows; a follower that fell further behind reloads everything.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["KEEP", "Change", "Op", "latest", "record", "since"]

Op = Literal[
    "create_collection", "delete_collection", "add_supports", "remove_support", "remove_class"
]

KEEP = 10_000  # rows kept; older ones are pruned as new ones arrive
_PRUNE_EVERY = 256


@dataclass(frozen=True)
class Change:
    seq: int
    op: Op
    collection_id: int
    collection: str
    class_id: int | None
    support_ids: tuple[int, ...]


def record(
    conn: sqlite3.Connection,
    op: Op,
    collection_id: int,
    collection: str,
    *,
    class_id: int | None = None,
    support_ids: Sequence[int] = (),
) -> int:
    """Appends a change (call inside the write transaction of the change); returns its seq."""
    cur = conn.execute(
        "INSERT INTO changes (op, collection_id, collection, class_id, support_ids, at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            op,
            collection_id,
            collection,
            class_id,
            json.dumps([int(i) for i in support_ids]),
            time.time(),
        ),
    )
    seq = int(cur.lastrowid or 0)
    if seq % _PRUNE_EVERY == 0:
        conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - KEEP,))
    return seq


def latest(conn: sqlite3.Connection) -> int:
    """The seq of the last change committed (0: none yet)."""
    row = conn.execute("SELECT MAX(seq) FROM changes").fetchone()
    return int(row[0] or 0)


def since(conn: sqlite3.Connection, seq: int) -> tuple[list[Change], bool]:
    """The changes after ``seq`` in commit order, and whether all of them are still in the log
    (False: some were pruned, the follower must reload everything)."""
    rows = conn.execute(
        "SELECT seq, op, collection_id, collection, class_id, support_ids FROM changes "
        "WHERE seq > ? ORDER BY seq",
        (seq,),
    ).fetchall()
    changes = [
        Change(
            int(s), op, int(cid), name, None if cls is None else int(cls), tuple(json.loads(ids))
        )
        for s, op, cid, name, cls, ids in rows
    ]
    # Committed AUTOINCREMENT seqs are consecutive (a rolled-back transaction takes its
    # sqlite_sequence update back with it), so a first row past ``seq + 1`` means pruned rows.
    return changes, not changes or changes[0].seq == seq + 1
