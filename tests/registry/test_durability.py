"""SIGKILL in the middle of a concurrent registration burst, then reopen.

A child process registers 3-support batches from 4 threads and prints ``ACK <tag> <ids>``
(flushed) only after ``add_supports`` has returned. The parent kills it with SIGKILL while it
is still writing, reopens the data dir and checks that every acknowledged support is there
with its exact embedding, and that no batch is partly there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from server.registry import Registry, Store

REPO = Path(__file__).resolve().parents[2]
PER_BATCH = 3
DIM = 32

CHILD = """
import sys, threading
from server.registry import AlreadyExists, CollectionSpec, Store, SupportInput
from tests.registry.test_durability import PER_BATCH, embedding

data_dir, burst = sys.argv[1], sys.argv[2]
store = Store(data_dir)
try:
    store.create_collection(CollectionSpec("burst", "m"))
except AlreadyExists:
    pass
out = threading.Lock()

def register(t):
    n = 0
    while True:
        tag = f"{burst}:{t}:{n}"
        sups = [
            SupportInput.from_image(embedding(f"{tag}/{j}"), f"{tag}/{j}", f"{tag}/{j}")
            for j in range(PER_BATCH)
        ]
        reg = store.add_supports("burst", f"b{burst}-t{t}-c{n % 4}", sups)
        ids = ",".join(str(s.id) for s in reg.supports)
        with out:
            sys.stdout.write(f"ACK {tag} {ids}\\n")
            sys.stdout.flush()
        n += 1

for t in range(4):
    threading.Thread(target=register, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def embedding(source: str) -> np.ndarray:
    """The embedding the child registers for a support, recomputable by the parent."""
    raw = hashlib.sha256(source.encode()).digest()
    return np.frombuffer(raw, np.uint8).astype(np.float32) / 255.0 + 0.01


def burst_then_kill(
    data_dir: Path, burst: str, acks_before_kill: int, delay_s: float
) -> dict[int, str]:
    """Runs the child until it acknowledged ``acks_before_kill`` batches, SIGKILLs it
    ``delay_s`` later (so that the kill is not timed by an acknowledgement), and returns
    support id -> source for every acknowledgement it printed in full."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PROTOSERVE_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), burst],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []
    try:
        while len(lines) < acks_before_kill:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child exited early:\n{proc.stderr.read().decode()}")
            lines.append(line)
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: the four threads are still committing
        lines.extend(proc.stdout.read().splitlines(keepends=True))
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    acked: dict[int, str] = {}
    for line in lines:
        if not line.endswith(b"\n"):  # cut off by the kill: not an acknowledgement
            continue
        _, tag, ids = line.decode().split()
        for j, sid in enumerate(ids.split(",")):
            acked[int(sid)] = f"{tag}/{j}"
    return acked


def check_data_dir(data_dir: Path, acked: dict[int, str]) -> int:
    """Everything acknowledged is present and exact; nothing is half-present. Returns rows."""
    with sqlite3.connect(data_dir / "registry.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = conn.execute(
            "SELECT s.id, c.label, s.source, s.dim, length(s.embedding), s.embedding "
            "FROM supports s JOIN classes c ON c.id = s.class_id"
        ).fetchall()
        empty = conn.execute(
            "SELECT label FROM classes WHERE id NOT IN (SELECT class_id FROM supports)"
        ).fetchall()
    assert empty == [], f"classes without supports: {empty}"
    found = {sid: source for sid, _, source, _, _, _ in rows}
    missing = {sid: src for sid, src in acked.items() if found.get(sid) != src}
    assert not missing, f"acknowledged supports lost or changed: {missing}"
    for sid, label, source, dim, nbytes, blob in rows:
        assert (dim, nbytes) == (DIM, 4 * DIM), f"support {sid}: dim {dim}, {nbytes} bytes"
        np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), embedding(source))
        burst, t, n = source.split("/")[0].split(":")
        assert label == f"b{burst}-t{t}-c{int(n) % 4}", (sid, label, source)
    per_batch = Counter(source.split("/")[0] for _, _, source, _, _, _ in rows)
    partial = {tag: k for tag, k in per_batch.items() if k != PER_BATCH}
    assert not partial, f"half-applied registrations: {partial}"
    with Store(data_dir) as store:
        for c in store.list_classes("burst"):
            listed = store.list_supports("burst", c.label)
            assert c.num_supports == len(listed) == c.image_supports > 0
            assert c.num_supports % PER_BATCH == 0
    return len(rows)


def test_acknowledged_registrations_survive_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked: dict[int, str] = {}
    # each burst after the first runs on the data dir the previous one left behind
    for burst, delay in (("1", 0.0), ("2", 0.0067), ("3", 0.0173), ("4", 0.0411)):
        acked |= burst_then_kill(data, burst, acks_before_kill=30, delay_s=delay)
        rows = check_data_dir(data, acked)
        assert rows >= len(acked)  # committed but killed before printing is allowed
    with Registry.open(data) as registry:  # the indexes rebuild from the recovered store
        index = registry.index("burst")
        assert index.num_supports() == rows
        assert set(acked) <= set(index.support_ids())
