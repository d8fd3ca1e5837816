"""Shared mode: registries over one data dir follow each other through the change log.

Two ``Registry(shared=True)`` objects in one process stand for two server processes (each has
its own SQLite connections and in-memory indexes; the lock and the log are the same as across
processes). ``tests/grpc/test_processes.py`` runs the real multi-process server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.registry import CollectionSpec, NotFound, Registry, changes
from tests.registry.test_store import img, vec


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Registry, Registry]]:
    a = Registry.open(tmp_path, shared=True)
    b = Registry.open(tmp_path, shared=True)
    yield a, b
    a.close()
    b.close()


def state(reg: Registry, name: str) -> tuple[dict[int, str], dict[int, int], list[float]]:
    """What a collection's index holds: labels, support -> class, and its prototypes."""
    index = reg.index(name)
    ids, protos = index.prototypes()
    order = np.argsort(ids)
    return index.labels(), index.support_ids(), np.round(protos[order], 5).ravel().tolist()


def truth(tmp_path: Path, name: str) -> tuple[dict[int, str], dict[int, int], list[float]]:
    """The same, from an index built from the store alone."""
    with Registry.open(tmp_path, shared=True) as fresh:
        return state(fresh, name)


def test_every_change_is_logged_in_order(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as reg:
        coll = reg.create_collection(CollectionSpec("pets", "m"))
        cat = reg.add_supports("pets", "cat", [img(1), img(2)])
        reg.add_supports("pets", "dog", [img(3)])
        reg.remove_support("pets", cat.supports[0].id)
        reg.remove_class("pets", "dog")
        reg.delete_collection("pets")
        log, complete = reg.store.changes_since(0)
    assert complete
    assert [c.seq for c in log] == [1, 2, 3, 4, 5, 6]
    assert [c.op for c in log] == [
        "create_collection",
        "add_supports",
        "add_supports",
        "remove_support",
        "remove_class",
        "delete_collection",
    ]
    assert {c.collection_id for c in log} == {coll.id}
    assert log[1].class_id == cat.class_id
    assert log[1].support_ids == tuple(s.id for s in cat.supports)
    assert log[3].support_ids == (cat.supports[0].id,)


def test_a_failed_change_logs_nothing(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as reg:
        reg.create_collection(CollectionSpec("pets", "m"))
        with pytest.raises(NotFound):
            reg.add_supports("birds", "owl", [img(1)])
        reg.add_supports("pets", "cat", [img(1)])
        with pytest.raises(Exception, match="dimension"):
            reg.add_supports("pets", "cat", [img(2, d=8)])
        log, complete = reg.store.changes_since(0)
    assert complete and [c.seq for c in log] == [1, 2]


def test_changes_reach_the_other_registry(pair: tuple[Registry, Registry], tmp_path: Path) -> None:
    a, b = pair
    a.create_collection(CollectionSpec("pets", "m"))
    assert b.collection("pets").dim is None
    cat = a.add_supports("pets", "cat", [img(1), img(2)])
    assert b.collection("pets").dim == 16
    assert state(b, "pets") == state(a, "pets") == truth(tmp_path, "pets")
    b.add_supports("pets", "dog", [img(3)])
    a.remove_support("pets", cat.supports[0].id)
    assert state(a, "pets") == state(b, "pets") == truth(tmp_path, "pets")
    assert b.index("pets").num_supports() == 2
    b.remove_class("pets", "cat")
    assert a.index("pets").labels() == b.index("pets").labels() == {cat.class_id + 1: "dog"}
    a.delete_collection("pets")
    with pytest.raises(NotFound):
        b.index("pets")
    # The same name again: a new collection, nothing of the old one comes back.
    a.create_collection(CollectionSpec("pets", "m", metric="l2"))
    assert b.collection("pets").metric == "l2"
    assert b.index("pets").num_supports() == 0


def test_a_late_starter_loads_and_replays(tmp_path: Path) -> None:
    """A registry that opens after changes (some undone since) ends equal to the store."""
    with Registry.open(tmp_path, shared=True) as a:
        a.create_collection(CollectionSpec("pets", "m"))
        a.create_collection(CollectionSpec("gone", "m"))
        first = a.add_supports("pets", "cat", [img(1), img(2), img(3)])
        a.remove_support("pets", first.supports[1].id)
        a.add_supports("pets", "dog", [img(4)])
        a.remove_class("pets", "dog")
        a.add_supports("gone", "x", [img(5)])
        a.delete_collection("gone")
        with Registry.open(tmp_path, shared=True) as b:
            # Replaying every row onto the loaded state changes nothing.
            b._seq = 0
            b._follow()
            assert state(b, "pets") == state(a, "pets")
            assert [c.name for c in b.collections()] == ["pets"]
            assert b.index("pets").num_supports() == 2


def test_a_pruned_log_reloads_everything(
    pair: tuple[Registry, Registry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(changes, "KEEP", 3)
    monkeypatch.setattr(changes, "_PRUNE_EVERY", 1)
    a, b = pair
    a.create_collection(CollectionSpec("pets", "m"))
    assert b.index("pets").num_supports() == 0
    for i in range(6):
        a.add_supports("pets", f"c{i}", [img(i)])
    assert a.store.changes_since(0)[1] is False  # rows 1..4 are gone
    assert state(b, "pets") == state(a, "pets") == truth(tmp_path, "pets")
    assert "reloading every index" in caplog.text
    assert b.index("pets").num_classes() == 6


def test_concurrent_writers_in_both_end_equal(
    pair: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = pair
    a.create_collection(CollectionSpec("pets", "m"))
    errors: list[BaseException] = []

    def write(reg: Registry, tag: str) -> None:
        try:
            for i in range(25):
                reg.add_supports("pets", f"{tag}{i % 5}", [img(i * 7 + len(tag))])
                reg.index("pets").class_scores(vec(i)[None, :])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(r, t)) for r, t in ((a, "a"), (b, "bb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert state(a, "pets") == state(b, "pets") == truth(tmp_path, "pets")
    assert a.index("pets").num_supports() == 50
