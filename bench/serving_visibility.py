"""Registration visibility for ``bench/serving.py``: how soon a new class answers Classify.

Each trial registers a new class (5 drawings of an Omniglot background character not in
run01), then polls Classify with a 6th drawing of it until the new label appears in the
answer. Embedding time is excluded on both sides: the supports' embedding happens before the
RegisterClass acknowledgement (the clock starts at the ack), and the query image's own
decode + embed + RPC time is subtracted as that trial's baseline (the fastest of 3 Classify
calls with the same image just before registering). The queries go over a connection of
their own, opened per trial: against a multi-process server (``serve --processes N``) the
kernel may put it on any worker, so some trials measure a registration acknowledged by one
process and seen by another.
"""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

from server.client import ProtoserveClient

__all__ = ["measure_visibility", "new_characters"]


def new_characters(n: int, background_zip: Path) -> list[tuple[str, list[bytes]]]:
    """``n`` (label, 6 drawings) from the Omniglot background set (not in run01)."""
    out: list[tuple[str, list[bytes]]] = []
    with zipfile.ZipFile(background_zip) as z:
        by_char: dict[str, list[str]] = {}
        for name in sorted(z.namelist()):
            if name.endswith(".png"):
                by_char.setdefault(name.rsplit("/", 1)[0], []).append(name)
        for char, files in by_char.items():
            if len(files) >= 6:
                label = "new-" + re.sub(r"[^A-Za-z0-9_.-]", "_", char.split("/", 1)[1])
                out.append((label, [z.read(f) for f in files[:6]]))
            if len(out) == n:
                break
    return out


def measure_visibility(
    target: str, collection: str, trials: int, background_zip: Path
) -> tuple[list[float], list[float], list[int]]:
    """Per trial: (ack -> first answer naming the class - baseline, raw, polls), in s."""
    net: list[float] = []
    raw: list[float] = []
    polls: list[int] = []
    with ProtoserveClient(target) as c:
        top_k = c.get_collection(collection).class_count + 1  # every class: presence, not rank
        for label, drawings in new_characters(trials, background_zip):
            supports, query = drawings[:5], drawings[5]
            with ProtoserveClient(target) as q:
                baseline = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    (r,) = q.classify(collection, [query], top_k=top_k)
                    baseline = min(baseline, time.perf_counter() - t0)
                    assert all(p.label != label for p in r.predictions)
                c.register(collection, label, images=supports)
                t_ack = time.perf_counter()
                n = 0
                while True:
                    n += 1
                    (r,) = q.classify(collection, [query], top_k=top_k)
                    t = time.perf_counter()
                    if any(p.label == label for p in r.predictions):
                        break
                    if t - t_ack > 5:
                        raise RuntimeError(f"class {label!r} not visible 5 s after registration")
            raw.append(t - t_ack)
            net.append(max(0.0, t - t_ack - baseline))
            polls.append(n)
            c.remove_class(collection, label)
    return net, raw, polls
