from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.registry import (
    AlreadyExists,
    CollectionSpec,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Store,
    SupportInput,
    image_hash,
)
from server.registry.store import DB_FILENAME, SCHEMA_VERSION

D = 16


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "data")
    yield s
    s.close()


def vec(seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def img(seed: int, d: int = D) -> SupportInput:
    return SupportInput.from_image(vec(seed, d), image_hash(str(seed).encode()), f"img{seed}.png")


def raw(store: Store) -> sqlite3.Connection:
    return sqlite3.connect(store.path)


def counts(store: Store) -> dict[str, int]:
    with raw(store) as conn:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("collections", "classes", "supports", "text_prompts")
        }


# -- collections ------------------------------------------------------------------------------
def test_collection_crud(store: Store) -> None:
    a = store.create_collection(CollectionSpec("pets", "clip-b32"))
    assert (a.method, a.metric, a.threshold, a.dim) == ("prototype", "cosine", None, None)
    assert (a.hybrid_alpha, a.hybrid_beta) == (1.0, 5.5)
    b = store.create_collection(
        CollectionSpec("birds", "m", "hybrid", "l2", 0.3, hybrid_alpha=2.0, hybrid_beta=1.0, dim=8)
    )
    assert store.get_collection("birds") == b
    assert b.threshold == pytest.approx(0.3) and b.dim == 8
    assert [c.name for c in store.list_collections()] == ["birds", "pets"]
    assert store.delete_collection("pets") == a
    assert [c.name for c in store.list_collections()] == ["birds"]
    with pytest.raises(NotFound, match="collection 'pets' not found"):
        store.get_collection("pets")
    with pytest.raises(NotFound, match="'pets'"):
        store.delete_collection("pets")


def test_duplicate_collection(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    with pytest.raises(AlreadyExists, match="collection 'pets' already exists"):
        store.create_collection(CollectionSpec("pets", "other"))
    assert store.get_collection("pets").model == "m"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (CollectionSpec("", "m"), "non-empty"),
        (CollectionSpec("has space", "m"), "letters, digits"),
        (CollectionSpec("x" * 200, "m"), "1-128"),
        (CollectionSpec("ok", ""), "model"),
        (CollectionSpec("ok", "m", method="svm"), "method must be one of"),  # type: ignore[arg-type]
        (CollectionSpec("ok", "m", metric="ip"), "metric must be one of"),  # type: ignore[arg-type]
        (CollectionSpec("ok", "m", threshold=float("nan")), "threshold must be finite"),
        (CollectionSpec("ok", "m", hybrid_beta=-1.0), "hybrid_beta must be finite and >= 0"),
        (CollectionSpec("ok", "m", dim=0), "dim must be a positive integer"),
    ],
)
def test_invalid_collection_specs(store: Store, spec: CollectionSpec, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        store.create_collection(spec)
    assert store.list_collections() == []


# -- classes and supports ---------------------------------------------------------------------
def test_register_creates_then_appends(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    r1 = store.add_supports(
        "pets",
        "cat",
        [img(1), SupportInput.from_text(vec(2), "cat", templates=["a photo of a {}."])],
    )
    assert r1.created and r1.label == "cat" and r1.collection.dim == D
    assert [s.kind for s in r1.supports] == ["image", "text"]
    image, text = r1.supports
    assert image.content_hash == image_hash(b"1") and image.source == "img1.png"
    assert image.text is None and image.templates is None
    assert text.text == "cat" and text.templates == ("a photo of a {}.",)
    r2 = store.add_supports("pets", "cat", [img(3), img(4)])
    assert not r2.created and r2.class_id == r1.class_id
    assert r2.supports[0].id > text.id
    info = store.get_class("pets", "cat")
    assert (info.image_supports, info.text_supports, info.num_supports) == (3, 1, 4)
    store.add_supports("pets", "dog", [img(5)])
    assert sorted((c.label, c.num_supports) for c in store.list_classes("pets")) == [
        ("cat", 4),
        ("dog", 1),
    ]
    assert [s.id for s in store.list_supports("pets", "cat")] == [
        *(s.id for s in r1.supports),
        *(s.id for s in r2.supports),
    ]


def test_labels_unique_per_collection(store: Store) -> None:
    store.create_collection(CollectionSpec("a", "m"))
    store.create_collection(CollectionSpec("b", "m"))
    ra = store.add_supports("a", "cat", [img(1)])
    rb = store.add_supports("b", "cat", [img(2)])
    assert ra.class_id != rb.class_id
    assert store.add_supports("a", "cat", [img(3)]).class_id == ra.class_id
    assert store.get_class("a", "cat").num_supports == 2
    assert store.get_class("b", "cat").num_supports == 1


def test_dimension_is_fixed_by_the_collection(store: Store) -> None:
    store.create_collection(CollectionSpec("fixed", "m", dim=D))
    with pytest.raises(InvalidInput, match=r"'fixed', class 'cat', supports\[0\].*dimension 8"):
        store.add_supports("fixed", "cat", [img(1, d=8)])
    store.create_collection(CollectionSpec("free", "m"))
    with pytest.raises(InvalidInput, match=r"supports\[1\]: embedding has dimension 8.*is 16"):
        store.add_supports("free", "cat", [img(1), img(2, d=8)])
    assert store.get_collection("free").dim is None
    store.add_supports("free", "cat", [img(1)])
    with pytest.raises(InvalidInput, match="dimension 8"):
        store.add_supports("free", "dog", [img(2, d=8)])
    assert counts(store)["supports"] == 1


@pytest.mark.parametrize(
    ("label", "supports", "needle"),
    [
        ("", [img(1)], "label must be a non-empty"),
        (" cat", [img(1)], "leading/trailing"),
        ("c\nat", [img(1)], "control"),
        ("cat", [], "at least one support"),
        ("cat", [SupportInput.from_image(np.full(D, np.nan), "h")], "NaN"),
        ("cat", [SupportInput.from_image(np.zeros(D), "h")], "all zeros"),
        ("cat", [SupportInput.from_image(np.ones((2, D)), "h")], "1-D"),
        ("cat", [SupportInput.from_image(np.array(["a"] * D), "h")], "numeric"),
        ("cat", [SupportInput("image", vec(1))], "content hash"),
        ("cat", [SupportInput("text", vec(1))], "non-empty text"),
        ("cat", [SupportInput("text", vec(1), text="t", content_hash="h")], "no content hash"),
        ("cat", [SupportInput.from_text(vec(1), "cat", ["no placeholder"])], "one '{}'"),
        ("cat", [SupportInput("video", vec(1))], "kind must be one of"),  # type: ignore[arg-type]
    ],
)
def test_invalid_supports(
    store: Store, label: str, supports: list[SupportInput], needle: str
) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    with pytest.raises(InvalidInput, match=needle):
        store.add_supports("pets", label, supports)
    assert counts(store) == {"collections": 1, "classes": 0, "supports": 0, "text_prompts": 0}


def test_l2_collections_accept_zero_embeddings(store: Store) -> None:
    store.create_collection(CollectionSpec("l2", "m", metric="l2"))
    store.add_supports("l2", "origin", [SupportInput.from_image(np.zeros(D), "h")])


def test_not_found_messages(store: Store) -> None:
    with pytest.raises(NotFound, match="collection 'nope' not found"):
        store.add_supports("nope", "cat", [img(1)])
    with pytest.raises(NotFound, match="collection 'nope'"):
        store.list_classes("nope")
    store.create_collection(CollectionSpec("pets", "m"))
    with pytest.raises(NotFound, match="class 'cat' not found in collection 'pets'"):
        store.get_class("pets", "cat")
    with pytest.raises(NotFound, match="class 'cat' not found in collection 'pets'"):
        store.remove_class("pets", "cat")
    with pytest.raises(NotFound, match="support 42 not found in collection 'pets'"):
        store.remove_support("pets", 42)


def test_remove_support(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    store.create_collection(CollectionSpec("other", "m"))
    reg = store.add_supports("pets", "cat", [img(1), img(2), img(3)])
    elsewhere = store.add_supports("other", "cat", [img(4), img(5)])
    with pytest.raises(NotFound, match=f"support {elsewhere.supports[0].id} not found in"):
        store.remove_support("pets", elsewhere.supports[0].id)
    last = reg.supports[-1]
    assert store.remove_support("pets", last.id) == last
    assert [s.id for s in store.list_supports("pets", "cat")] == [s.id for s in reg.supports[:2]]
    store.remove_support("pets", reg.supports[0].id)
    with pytest.raises(FailedPrecondition, match="last support of class 'cat'.*remove the class"):
        store.remove_support("pets", reg.supports[1].id)
    # ids are never handed out again, even the largest one just removed
    again = store.add_supports("pets", "cat", [img(6)])
    assert again.supports[0].id > max(s.id for s in elsewhere.supports)


def test_remove_class_and_collection_cascade(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    templ = ["a photo of a {}.", "a {}."]
    store.add_supports("pets", "cat", [img(1), SupportInput.from_text(vec(2), "cat", templ)])
    store.add_supports("pets", "dog", [img(3), SupportInput.from_text(vec(4), "dog", templ)])
    gone = store.remove_class("pets", "cat")
    assert (gone.label, gone.image_supports, gone.text_supports) == ("cat", 1, 1)
    assert counts(store) == {"collections": 1, "classes": 1, "supports": 2, "text_prompts": 1}
    assert [r.label for r in store.iter_embeddings("pets")] == ["dog", "dog"]
    cat_again = store.add_supports("pets", "cat", [img(5)])
    assert cat_again.created and cat_again.class_id > gone.id
    store.delete_collection("pets")
    assert counts(store) == {"collections": 0, "classes": 0, "supports": 0, "text_prompts": 0}


def test_iter_embeddings_round_trip(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    sent = {}
    for i in range(5):
        label = "cat" if i % 2 else "dog"
        reg = store.add_supports("pets", label, [img(10 + i), img(20 + i)])
        for s, seed in zip(reg.supports, (10 + i, 20 + i), strict=True):
            sent[s.id] = (label, vec(seed))
    rows = list(store.iter_embeddings("pets", batch=3))
    assert [r.support_id for r in rows] == sorted(sent)
    for r in rows:
        assert r.label == sent[r.support_id][0] and r.kind == "image"
        assert r.embedding.dtype == np.float32
        np.testing.assert_array_equal(r.embedding, sent[r.support_id][1])
    with pytest.raises(NotFound):
        next(store.iter_embeddings("nope"))


# -- all-or-nothing -----------------------------------------------------------------------------
def test_failure_mid_registration_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    store.add_supports("pets", "cat", [img(1)])
    before = counts(store)
    real = Store._insert_support
    calls = {"n": 0}

    def flaky(self: Store, *args: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_insert_support", flaky)
    many = [img(2), SupportInput.from_text(vec(3), "cat", ["a {}."]), img(4), img(5)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.add_supports("pets", "cat", many)  # appends to an existing class
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.add_supports("pets", "dog", many)  # would create the class
    assert counts(store) == before
    assert [c.label for c in store.list_classes("pets")] == ["cat"]
    assert store.get_class("pets", "cat").num_supports == 1
    monkeypatch.undo()
    assert store.add_supports("pets", "dog", many).created  # the store still works


def test_constraint_failure_mid_registration_rolls_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside SQLite itself (a CHECK on the blob size) also rolls everything back."""
    store.create_collection(CollectionSpec("pets", "m"))
    real = Store._insert_support
    calls = {"n": 0}

    def bad_second(self: Store, conn: sqlite3.Connection, cid: int, *rest: object) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # a blob 4 bytes short of its declared dim
            conn.execute(
                "INSERT INTO supports (class_id, kind, content_hash, dim, embedding, created_at) "
                "VALUES (?, 'image', 'h', ?, ?, 0)",
                (cid, D, vec(0)[:-1].tobytes()),
            )
        return real(self, conn, cid, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_insert_support", bad_second)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        store.add_supports("pets", "cat", [img(1), img(2), img(3)])
    assert counts(store) == {"collections": 1, "classes": 0, "supports": 0, "text_prompts": 0}
    assert store.get_collection("pets").dim is None


# -- files, schema, durability settings ---------------------------------------------------------
def test_reopen_keeps_everything(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.create_collection(CollectionSpec("pets", "m", threshold=0.5))
        reg = s.add_supports("pets", "cat", [img(1), img(2)])
    with Store(tmp_path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 2
        assert s.get_collection("pets").threshold == 0.5
        assert [x.id for x in s.list_supports("pets", "cat")] == [x.id for x in reg.supports]


def test_wal_and_full_sync(store: Store) -> None:
    with raw(store) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT version, description FROM schema_migrations").fetchall()
        assert rows == [
            (1, "collections, classes, supports, text_prompts"),
            (2, "changes: the log other server processes follow"),
        ]
    assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_one_store_per_data_dir(store: Store) -> None:
    with pytest.raises(FailedPrecondition, match="already in use"):
        Store(store.data_dir)
    with pytest.raises(FailedPrecondition, match="that needs it alone"):
        Store(store.data_dir, shared=True)


def test_shared_stores_exclude_a_lone_one(tmp_path: Path) -> None:
    with Store(tmp_path, shared=True), Store(tmp_path, shared=True):
        with pytest.raises(FailedPrecondition, match="multi-process"):
            Store(tmp_path)
    Store(tmp_path).close()


def test_a_version_1_data_dir_is_migrated(tmp_path: Path) -> None:
    """A data dir written before the change log (schema 1) opens, keeps its rows, gains the log."""
    with Store(tmp_path) as s:
        s.create_collection(CollectionSpec("pets", "m"))
        s.add_supports("pets", "cat", [img(1)])
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        conn.execute("DROP TABLE changes")
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'changes'")
        conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    with Store(tmp_path) as s:
        assert s.schema_version() == 2
        assert [c.label for c in s.list_classes("pets")] == ["cat"]
        assert s.latest_change() == 0
        s.add_supports("pets", "dog", [img(2)])
        assert s.latest_change() == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (7, 'future', 0)")
    with pytest.raises(FailedPrecondition, match="schema version 7, newer than this build's 2"):
        Store(tmp_path)
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 7")
    Store(tmp_path).close()


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    s.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        s.list_collections()
    with pytest.raises(FailedPrecondition, match="closed"):
        s.create_collection(CollectionSpec("x", "m"))


def test_concurrent_writers_and_readers(store: Store) -> None:
    store.create_collection(CollectionSpec("pets", "m"))
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            for i in range(15):
                store.add_supports("pets", f"class{t}", [img(100 * t + i), img(100 * t + 50 + i)])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            while not done.is_set():
                for c in store.list_classes("pets"):
                    assert c.num_supports % 2 == 0 and c.num_supports > 0
                sum(1 for _ in store.iter_embeddings("pets"))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    done.set()
    for th in readers:
        th.join()
    assert not errors, errors
    assert sorted((c.label, c.num_supports) for c in store.list_classes("pets")) == [
        (f"class{t}", 30) for t in range(4)
    ]
