"""The server's state: the durable store (SQLite) and the in-memory indexes, kept in step.

``Registry`` is what the serving layer holds. Each change is committed to the store first
(durable when the call returns) and then applied to the collection's ``CollectionIndex``, both
under one lock, so the indexes change in commit order. Reads of the indexes never take that
lock: classification uses ``registry.index(name)`` and its own readers-writer lock.
If applying a committed change to an index fails, that index is rebuilt from the store
(the store is the truth), so the two cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

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
        self._options = index_options
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._indexes: dict[str, CollectionIndex] = {}
        for coll in store.list_collections():
            self._rebuild(self.store.get_collection(coll.name))

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], **index_options: Any) -> Registry:
        store = Store(data_dir)
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

    # -- reads (no store access) --------------------------------------------------------------
    def collection(self, name: str) -> Collection:
        coll = self._collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} not found")
        return coll

    def collections(self) -> list[Collection]:
        return sorted(self._collections.values(), key=lambda c: c.name)

    def index(self, name: str) -> CollectionIndex:
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

    # -- changes --------------------------------------------------------------------------------
    def create_collection(self, spec: CollectionSpec) -> Collection:
        with self._lock:
            coll = self.store.create_collection(spec)
            self._indexes[coll.name] = CollectionIndex(coll.metric, coll.dim, **self._options)
            self._collections[coll.name] = coll
            return coll

    def delete_collection(self, name: str) -> Collection:
        with self._lock:
            coll = self.store.delete_collection(name)
            self._collections.pop(name, None)
            self._indexes.pop(name, None)
            return coll

    def add_supports(
        self, collection: str, label: str, supports: Sequence[SupportInput]
    ) -> Registration:
        """Registers ``supports`` for class ``label`` (created if new). Durable on return."""
        with self._lock:
            reg = self.store.add_supports(collection, label, supports)
            self._collections[collection] = reg.collection
            items = [
                (s.id, s.kind, inp.embedding) for s, inp in zip(reg.supports, supports, strict=True)
            ]
            self._apply(reg.collection, lambda ix: ix.add(reg.class_id, reg.label, items))
            return reg

    def remove_support(self, collection: str, support_id: int) -> Support:
        with self._lock:
            sup = self.store.remove_support(collection, support_id)
            self._apply(self.collection(collection), lambda ix: ix.remove_support(sup.id))
            return sup

    def remove_class(self, collection: str, label: str) -> ClassInfo:
        with self._lock:
            info = self.store.remove_class(collection, label)
            self._apply(self.collection(collection), lambda ix: ix.remove_class(info.id))
            return info

    def _apply(self, coll: Collection, change: Callable[[CollectionIndex], None]) -> None:
        try:
            change(self.index(coll.name))
        except Exception:
            log.exception("index of collection %r out of step; rebuilding it", coll.name)
            self._rebuild(self.store.get_collection(coll.name))
