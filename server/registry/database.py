"""The registry's SQLite database file: opening it durably, one writer, a pool of readers.

One database file, ``registry.sqlite3``, lives under the data dir. It is opened in WAL mode
with ``synchronous=FULL``: every commit appends to the write-ahead log and fsyncs it before
``COMMIT`` returns, so a method that has returned survives SIGKILL of the process *and* a
power loss (``NORMAL`` would survive only the former). A transaction that had not committed
is rolled back on the next open, so nothing is ever half-applied.

Concurrency: all writes go through one connection behind a lock (SQLite has one writer at a
time anyway); reads use a small pool of other connections, and WAL lets them read a consistent
snapshot while a write is in progress, so readers and the writer never block each other.
A lock file (``registry.lock``, ``flock``) stops a second process - or a second ``Store`` in
this one - from opening the same data dir. ``shared=True`` takes that lock shared instead: the
processes of one multi-process server open the data dir together, each following the others'
changes through the change log (``server.registry.changes``); a store that does not follow
(``shared=False``, the single-process server) still needs the data dir to itself.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from server.registry.errors import FailedPrecondition
from server.registry.schema import migrate

__all__ = ["DB_FILENAME", "LOCK_FILENAME", "Database"]

DB_FILENAME = "registry.sqlite3"
LOCK_FILENAME = "registry.lock"


class Database:
    """The database under ``data_dir`` (created if missing), migrated to the current schema.

    ``_write()`` and ``_read()`` hand out transactions; thread-safe.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 10.0,
        shared: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.shared = shared
        self.path = self.data_dir / DB_FILENAME
        self._busy_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
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
            with self._write() as conn:
                migrate(conn, self.data_dir)
            _fsync_dir(self.data_dir)
        except BaseException:
            self._closed = True
            if hasattr(self, "_writer"):
                self._writer.close()
            os.close(self._lock_fd)
            raise

    def _take_dir_lock(self) -> int:
        fd = os.open(self.data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"data dir {self.data_dir} is already in use by another registry store "
                + (
                    "that needs it alone (a single-process server)"
                    if self.shared
                    else "(another server, or the processes of a multi-process one)"
                )
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

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on a connection of its own: it changes whenever any
        other connection - this process's writer or another process - commits (a few us)."""
        with self._watch_lock:
            self._check_open()
            if self._watch is None:
                self._watch = self._connect()
            return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

    def close(self) -> None:
        """Closes every connection and releases the data dir. Idempotent."""
        with self._write_lock, self._pool_lock, self._watch_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._idle:
                conn.close()
            self._idle.clear()
            if self._watch is not None:
                self._watch.close()
            self._writer.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
