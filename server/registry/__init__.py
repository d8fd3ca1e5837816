"""The server's state: the durable store (SQLite) and the in-memory indexes, kept in step.

``Registry`` is what the serving layer holds. Each change is committed to the store together
with its row in the change log (``server.registry.changes``), durable when the call returns;
then, under one lock, the registry applies the log rows it has not applied yet to the
collections' ``CollectionIndex`` objects, in commit order, its own change among them. Reads of
the indexes never take that lock: classification uses ``registry.index(name)`` and its own
readers-writer lock. If applying a committed change to an index fails, that index is rebuilt
from the store (the store is the truth), so the two cannot drift apart.

``shared=True`` is for the processes of a multi-process server, which share one data dir: the
same log then also carries the other processes' changes, so every read of the indexes first
checks SQLite's ``data_version`` (a few microseconds) and, when any connection has committed
since, applies the rows it has not applied yet. A change acknowledged by any process is
therefore seen by the next read in every process. A lone registry (the default) has the data
dir to itself and skips that check.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from server.registry.changes import Change
from server.registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RegistryError,
)
from server.registry.index import ClassScores, CollectionIndex, Neighbours, TopK
from server.registry.store import (
    ClassInfo,
    Collection,
    CollectionSpec,
    EmbeddingRow,
    Registration,
    Store,
    Support,
    SupportInput,
    image_hash,
)

__all__ = [
    "AlreadyExists",
    "ClassInfo",
    "ClassScores",
    "Collection",
    "CollectionIndex",
    "CollectionSpec",
    "EmbeddingRow",
    "FailedPrecondition",
    "InvalidInput",
    "Neighbours",
    "NotFound",
    "Registration",
    "Registry",
    "RegistryError",
    "Store",
    "Support",
    "SupportInput",
    "TopK",
    "image_hash",
]

log = logging.getLogger(__name__)


class Registry:
    """Collections, classes and supports: durable in ``store``, servable from ``index(name)``.

    ``index_options`` go to every ``CollectionIndex`` (``flat_limit``, ``nprobe``,
    ``use_gpu``, ``dtype``). Every index is rebuilt from the store here.
    """

    def __init__(self, store: Store, **index_options: Any) -> None:
        self.store = store
        self.shared = store.shared
        self._options = index_options
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._indexes: dict[str, CollectionIndex] = {}
        self._seq = 0  # the last change-log row applied
        self._seen_version = -1  # data_version when the log was last read (shared mode)
        with self._lock:
            self._load_all()

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], *, shared: bool = False, **index_options: Any
    ) -> Registry:
        store = Store(data_dir, shared=shared)
        try:
            return cls(store, **index_options)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rebuild(self, coll: Collection) -> None:
        rows = self.store.iter_embeddings(coll.name)
        self._indexes[coll.name] = CollectionIndex.from_rows(
            rows, coll.metric, coll.dim, **self._options
        )
        self._collections[coll.name] = coll

    def _load_all(self) -> None:
        """Every index rebuilt from the store, then the log replayed past the point where
        loading began (in shared mode, others may write meanwhile; replaying what loading
        already saw is harmless)."""
        self._seen_version = self.store.data_version()
        self._seq = self.store.latest_change()
        names = {coll.name for coll in self.store.list_collections()}
        for name in set(self._collections) - names:
            self._collections.pop(name, None)
            self._indexes.pop(name, None)
        for name in names:
            with suppress(NotFound):  # deleted since the listing
                self._rebuild(self.store.get_collection(name))
        self._follow()

    # -- applying the change log ---------------------------------------------------------------
    def refresh(self) -> None:
        """Applies what other processes committed since the last look (shared mode; else a
        no-op). Every read of the indexes below calls it."""
        if not self.shared or self.store.data_version() == self._seen_version:
            return
        with self._lock:
            self._follow()

    def _follow(self) -> None:
        """Applies the log rows past ``_seq`` in order (hold ``_lock``)."""
        version = self.store.data_version()  # before reading: a later commit changes it again
        pending, complete = self.store.changes_since(self._seq)
        if not complete:
            log.warning("the change log was pruned past seq %d: reloading every index", self._seq)
            self._load_all()
            return
        for change in pending:
            try:
                self._apply_change(change)
            except Exception:
                log.exception(
                    "applying change %d to %r failed; rebuilding it", change.seq, change.collection
                )
                self._collections.pop(change.collection, None)
                self._indexes.pop(change.collection, None)
                with suppress(NotFound):
                    self._rebuild(self.store.get_collection(change.collection))
            self._seq = change.seq
        self._seen_version = version

    def _apply_change(self, change: Change) -> None:
        """One log row, skipped where it is already applied or superseded (idempotent)."""
        name = change.collection
        local = self._collections.get(name)
        current = local is not None and local.id == change.collection_id
        if change.op == "create_collection":
            if not current:
                with suppress(NotFound):
                    coll = self.store.get_collection(name)
                    if coll.id == change.collection_id:
                        self._rebuild(coll)
        elif change.op == "delete_collection":
            if current:
                self._collections.pop(name, None)
                self._indexes.pop(name, None)
        elif not current:
            return  # a collection deleted (or re-created) since: later rows say so
        elif change.op == "add_supports":
            index = self._indexes[name]
            missing = index.missing_supports(change.support_ids)
            rows = self.store.embeddings_by_id(change.collection_id, sorted(missing))
            if rows:
                items = [(r.support_id, r.kind, r.embedding) for r in rows]
                index.add(rows[0].class_id, rows[0].label, items)
            if local is not None and local.dim is None:
                with suppress(NotFound):
                    self._collections[name] = self.store.get_collection(name)
        elif change.op == "remove_support":
            with suppress(NotFound):
                self._indexes[name].remove_support(change.support_ids[0])
        elif change.op == "remove_class" and change.class_id is not None:
            with suppress(NotFound):
                self._indexes[name].remove_class(change.class_id)

    # -- reads (no store access; in shared mode, a data_version check) -------------------------
    def collection(self, name: str) -> Collection:
        self.refresh()
        coll = self._collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} not found")
        return coll

    def collections(self) -> list[Collection]:
        self.refresh()
        return sorted(self._collections.values(), key=lambda c: c.name)

    def index(self, name: str) -> CollectionIndex:
        self.refresh()
        index = self._indexes.get(name)
        if index is None:
            raise NotFound(f"collection {name!r} not found")
        return index

    def list_classes(self, collection: str) -> list[ClassInfo]:
        return self.store.list_classes(collection)

    def get_class(self, collection: str, label: str) -> ClassInfo:
        return self.store.get_class(collection, label)

    def list_supports(self, collection: str, label: str) -> list[Support]:
        return self.store.list_supports(collection, label)

    # -- changes: each committed with its log row, then the log applied -----------------------
    def create_collection(self, spec: CollectionSpec) -> Collection:
        with self._lock:
            coll = self.store.create_collection(spec)
            self._follow()
            return coll

    def delete_collection(self, name: str) -> Collection:
        with self._lock:
            coll = self.store.delete_collection(name)
            self._follow()
            return coll

    def add_supports(
        self, collection: str, label: str, supports: Sequence[SupportInput]
    ) -> Registration:
        """Registers ``supports`` for class ``label`` (created if new). Durable on return."""
        with self._lock:
            reg = self.store.add_supports(collection, label, supports)
            self._follow()
            return reg

    def remove_support(self, collection: str, support_id: int) -> Support:
        with self._lock:
            sup = self.store.remove_support(collection, support_id)
            self._follow()
            return sup

    def remove_class(self, collection: str, label: str) -> ClassInfo:
        with self._lock:
            info = self.store.remove_class(collection, label)
            self._follow()
            return info
