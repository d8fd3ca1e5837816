"""The dynamic batcher: ``collate`` on hand-built queues, then the worker with a real thread.

Batch composition is made deterministic with a gate: the worker is held inside ``fn`` on a
"gate" item while the test queues more, so what the next batch holds is known exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import pytest

from server.batching import DynamicBatcher, collate
from server.errors import BatchSizeMismatch, Closed, Overloaded

WAIT = 10.0  # generous bound for anything that should happen "at once"


@dataclass
class Item:
    name: str
    enqueued_at: float


def names(items: Sequence[Item]) -> list[str]:
    return [i.name for i in items]


def queue(*times: float) -> list[Item]:
    return [Item(f"i{k}", t) for k, t in enumerate(times)]


# -- collate: pure ----------------------------------------------------------------------------


def test_collate_empty_queue() -> None:
    assert collate([], now=100.0, max_batch_size=4, max_delay_s=0.0) == ([], [])


def test_collate_full_batch_is_taken_before_the_delay() -> None:
    q = queue(10.0, 10.0, 10.0, 10.0)
    batch, rest = collate(q, now=10.0, max_batch_size=4, max_delay_s=1.0)
    assert names(batch) == ["i0", "i1", "i2", "i3"] and rest == []


def test_collate_never_more_than_max_and_fifo() -> None:
    q = queue(*[float(k) for k in range(10)])
    for now in (0.0, 1000.0):  # neither fresh nor long-expired queues exceed the maximum
        batch, rest = collate(q, now=now, max_batch_size=4, max_delay_s=5.0)
        assert names(batch) == ["i0", "i1", "i2", "i3"]
        assert names(rest) == [f"i{k}" for k in range(4, 10)]


def test_collate_partial_batch_waits_until_oldest_expires() -> None:
    q = queue(10.0, 10.2, 10.4)
    batch, rest = collate(q, now=10.49, max_batch_size=8, max_delay_s=0.5)
    assert batch == [] and names(rest) == ["i0", "i1", "i2"]
    batch, rest = collate(q, now=10.5, max_batch_size=8, max_delay_s=0.5)  # exactly the delay
    assert names(batch) == ["i0", "i1", "i2"] and rest == []


def test_collate_delay_is_measured_from_the_oldest_item() -> None:
    q = queue(0.0, 9.9)  # the newest is fresh, but the oldest has waited long enough
    batch, _ = collate(q, now=10.0, max_batch_size=8, max_delay_s=1.0)
    assert names(batch) == ["i0", "i1"]


def test_collate_batching_off() -> None:
    q = queue(5.0, 5.0, 5.0)
    batch, rest = collate(q, now=5.0, max_batch_size=8, max_delay_s=0.0)  # no delay: go now
    assert len(batch) == 3 and rest == []
    batch, rest = collate(q, now=5.0, max_batch_size=1, max_delay_s=1.0)  # size 1: alone
    assert names(batch) == ["i0"] and names(rest) == ["i1", "i2"]


def test_collate_rejects_bad_max() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        collate(queue(0.0), now=0.0, max_batch_size=0, max_delay_s=0.0)


# -- the batcher ------------------------------------------------------------------------------


@pytest.fixture
def make() -> Iterator[Callable[..., DynamicBatcher[object, object]]]:
    made: list[DynamicBatcher[object, object]] = []

    def factory(fn: Callable[[list[object]], Sequence[object]], **kw: object) -> DynamicBatcher:
        b: DynamicBatcher[object, object] = DynamicBatcher(fn, **kw)
        made.append(b)
        return b

    yield factory
    for b in made:
        b.close(drain=False, timeout=WAIT)


class Gated:
    """``fn`` that records each batch and blocks on a batch holding "gate" until released."""

    def __init__(self, fail_on: str | None = None, mismatch: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[object]] = []
        self.fail_on = fail_on
        self.mismatch = mismatch

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        if "gate" in items:
            self.entered.set()
            assert self.release.wait(WAIT)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"boom on {self.fail_on}")
        out = [f"{x}!" for x in items]
        return out[:-1] if self.mismatch else out

    def hold(self, b: DynamicBatcher[object, object]) -> Future[object]:
        """Submits the gate item and waits until the worker is blocked on it."""
        f = b.submit("gate")
        assert self.entered.wait(WAIT)
        return f


def test_results_reach_their_callers_under_concurrency(make) -> None:
    # max_queue above the 1,600 items in total: a slow worker (a loaded machine) must not
    # turn this into an overload test.
    b = make(lambda xs: [x * 2 for x in xs], max_batch_size=16, max_delay_s=0.001, max_queue=2000)
    errors: list[str] = []

    def client(base: int) -> None:
        try:
            futures = [(i, b.submit(i)) for i in range(base, base + 200)]
            errors.extend(f"{i}" for i, f in futures if f.result(timeout=WAIT) != i * 2)
        except Exception as e:  # a dying thread must fail the test, not vanish
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(t * 1000,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    s = b.stats()
    assert s.items_run == 1600 and s.queue_depth == 0
    assert sum(size * n for size, n in s.batch_sizes.items()) == 1600
    assert sum(s.batch_sizes.values()) == s.batches_run
    assert max(s.batch_sizes) <= 16


def test_items_queued_while_busy_run_together_in_fifo_batches(make) -> None:
    fn = Gated()
    b = make(fn, max_batch_size=4, max_delay_s=0.001)
    gate = fn.hold(b)
    futures = [b.submit(f"x{k}") for k in range(10)]
    assert b.stats().queue_depth == 10
    fn.release.set()
    assert gate.result(timeout=WAIT) == "gate!"
    assert [f.result(timeout=WAIT) for f in futures] == [f"x{k}!" for k in range(10)]
    assert fn.batches[1:] == [["x0", "x1", "x2", "x3"], ["x4", "x5", "x6", "x7"], ["x8", "x9"]]
    assert b.stats().batch_sizes == {1: 1, 4: 2, 2: 1}


def test_batching_off_runs_each_item_alone(make) -> None:
    fn = Gated()
    b = make(fn, max_batch_size=1, max_delay_s=0.0)
    gate = fn.hold(b)
    futures = b.submit_many(["a", "b", "c"])
    fn.release.set()
    assert [f.result(timeout=WAIT) for f in [gate, *futures]] == ["gate!", "a!", "b!", "c!"]
    assert fn.batches == [["gate"], ["a"], ["b"], ["c"]]


def test_length_mismatch_fails_every_caller_naming_the_batcher(make) -> None:
    fn = Gated(mismatch=True)
    b = make(fn, max_batch_size=8, max_delay_s=0.001, name="backbone-x")
    gate = fn.hold(b)
    futures = [gate, *b.submit_many(["a", "b"])]
    fn.release.set()
    expected = [r"0 results for a batch of 1", r"1 results for a batch of 2", "1 results"]
    for f, msg in zip(futures, expected, strict=True):
        with pytest.raises(BatchSizeMismatch, match=rf"batcher 'backbone-x': fn returned {msg}"):
            f.result(timeout=WAIT)
    assert BatchSizeMismatch.code == "INTERNAL"
    fn.mismatch = False
    assert b.submit("c").result(timeout=WAIT) == "c!"  # still serving


def test_fn_exception_fails_only_its_batch(make) -> None:
    fn = Gated(fail_on="bad")
    b = make(fn, max_batch_size=2, max_delay_s=0.001)
    gate = fn.hold(b)
    first = b.submit_many(["bad", "x"])
    second = b.submit_many(["y", "z"])
    fn.release.set()
    assert gate.result(timeout=WAIT) == "gate!"
    for f in first:
        with pytest.raises(RuntimeError, match="boom on bad"):
            f.result(timeout=WAIT)
    assert [f.result(timeout=WAIT) for f in second] == ["y!", "z!"]
    assert b.submit("later").result(timeout=WAIT) == "later!"
    s = b.stats()
    assert s.failed_batches == 1 and s.batches_run == 4


def test_overloaded_at_exactly_max_queue_pending(make) -> None:
    fn = Gated()
    b = make(fn, max_batch_size=8, max_delay_s=0.001, max_queue=3, name="q")
    gate = fn.hold(b)  # the running batch does not count against the queue
    accepted = [b.submit(k) for k in range(3)]
    with pytest.raises(Overloaded, match=r"'q'.*3 of 3") as e:
        b.submit(3)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    s = b.stats()
    assert s.queue_depth == 3 and s.rejected == 1
    fn.release.set()
    assert [f.result(timeout=WAIT) for f in [gate, *accepted]] == ["gate!", "0!", "1!", "2!"]
    assert b.submit(4).result(timeout=WAIT) == "4!"  # capacity is back


def test_submit_many_is_all_or_nothing(make) -> None:
    fn = Gated()
    b = make(fn, max_batch_size=8, max_delay_s=0.001, max_queue=3)
    fn.hold(b)
    b.submit("a")
    with pytest.raises(Overloaded):
        b.submit_many(["b", "c", "d"])
    assert b.stats().queue_depth == 1
    assert len(b.submit_many(["b", "c"])) == 2
    fn.release.set()


def test_close_drain_runs_queued_work_then_refuses(make) -> None:
    calls: list[list[object]] = []
    b = make(lambda xs: calls.append(list(xs)) or xs, max_batch_size=4, max_delay_s=3600.0)
    futures = b.submit_many(list(range(6)))  # would wait an hour without the drain
    b.close(drain=True, timeout=WAIT)
    assert [f.result(timeout=0) for f in futures] == list(range(6))
    assert calls == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(Closed, match="closed") as e:
        b.submit(7)
    assert e.value.code == "UNAVAILABLE" and b.closed
    b.close()  # idempotent


def test_close_without_drain_fails_queued_but_finishes_running(make) -> None:
    fn = Gated()
    b = make(fn, max_batch_size=1, max_delay_s=3600.0)  # size 1: the gate runs at once
    gate = fn.hold(b)
    queued = b.submit_many(["a", "b"])
    b.close(drain=False, timeout=0)  # do not wait: the worker is still held inside fn
    for f in queued:
        with pytest.raises(Closed, match="before this item ran"):
            f.result(timeout=0)
    fn.release.set()
    assert gate.result(timeout=WAIT) == "gate!"
    assert fn.batches == [["gate"]]


def test_cancelled_futures_are_dropped_before_running(make) -> None:
    calls: list[list[object]] = []
    b = make(lambda xs: calls.append(list(xs)) or xs, max_batch_size=8, max_delay_s=3600.0)
    a, keep = b.submit_many(["a", "keep"])
    assert a.cancel()
    b.close(drain=True, timeout=WAIT)
    assert keep.result(timeout=0) == "keep" and calls == [["keep"]]


def test_usable_from_asyncio(make) -> None:
    b = make(lambda xs: [x + 1 for x in xs], max_batch_size=8, max_delay_s=0.001)

    async def main() -> list[object]:
        wrapped = [asyncio.wrap_future(b.submit(i)) for i in range(20)]
        direct = [b.submit_async(i) for i in range(20, 40)]
        return list(await asyncio.wait_for(asyncio.gather(*wrapped, *direct), WAIT))

    assert asyncio.run(main()) == list(range(1, 41))


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_delay_s": -1.0}, "max_delay_s"),
        ({"max_queue": 0}, "max_queue"),
    ],
)
def test_rejects_bad_configuration(kw: dict[str, float], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        DynamicBatcher(lambda xs: xs, name="cfg", **kw)


def test_instances_run_batches_side_by_side(make) -> None:
    """With two instances, a batch blocked in ``fn`` does not hold the next one back; every
    item still gets its own result, and close joins both workers."""
    gate = Gated()
    b = make(gate, max_batch_size=2, max_delay_s=0.0, instances=2)
    held = gate.hold(b)  # instance 1 is blocked inside fn
    assert b.submit("x").result(WAIT) == "x!"  # instance 2 ran it meanwhile
    assert not held.done()
    gate.release.set()
    assert held.result(WAIT) == "gate!"
    futures = [b.submit(i) for i in range(50)]
    assert [f.result(WAIT) for f in futures] == [f"{i}!" for i in range(50)]
    assert b.stats().items_run == 52
    b.close(timeout=WAIT)
    assert not any(w.is_alive() for w in b._workers)
    with pytest.raises(ValueError, match="instances"):
        DynamicBatcher(gate, instances=0)


def test_instances_share_a_due_queue(make) -> None:
    """Six items due at once, two idle instances: each takes three (not one takes all six)."""
    seen: list[int] = []
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=WAIT)

    def fn(items: list[object]) -> list[object]:
        with lock:
            seen.append(len(items))
        both.wait()  # both instances are inside fn at once
        return items

    b = make(fn, max_batch_size=8, max_delay_s=0.2, instances=2)
    futures = b.submit_many(list(range(6)))
    assert [f.result(WAIT) for f in futures] == list(range(6))
    assert sorted(seen) == [3, 3]
    assert b.load() == (0, 0)


def test_a_free_instance_leaves_a_share_for_the_busy_one(make) -> None:
    """One instance busy on one item, six items due: the free instance takes four (an even
    share of the seven in hand), not all six; the rest go to whichever instance is free next."""
    gate = Gated()
    b = make(gate, max_batch_size=8, max_delay_s=0.0, instances=2)
    held = gate.hold(b)  # instance 1 busy
    futures = b.submit_many(list(range(6)))
    assert [f.result(WAIT) for f in futures[:4]] == ["0!", "1!", "2!", "3!"]
    assert gate.batches[1] == [0, 1, 2, 3]
    gate.release.set()
    assert held.result(WAIT) == "gate!"
    assert [f.result(WAIT) for f in futures[4:]] == ["4!", "5!"]
    assert sum(map(len, gate.batches[2:])) == 2
    deadline = time.monotonic() + WAIT
    while b.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert b.load() == (0, 0) and b._unanswered == 0


def test_streamed_results_answer_each_caller_as_they_come(make) -> None:
    """``fn`` returning an iterator: each caller's future completes as its result is
    produced; a short count fails only the callers still waiting."""
    produced_first, go_on = threading.Event(), threading.Event()

    def fn(items: list[object]) -> Iterator[object]:
        for i, x in enumerate(items):
            if x == "short":
                return
            yield f"{x}!"
            if i == 0:
                produced_first.set()
                assert go_on.wait(WAIT)

    b = make(fn, max_batch_size=8, max_delay_s=0.05, name="s")
    first, second = b.submit_many(["a", "b"])
    assert produced_first.wait(WAIT)
    assert first.result(WAIT) == "a!" and not second.done()  # a! before b is computed
    go_on.set()
    assert second.result(WAIT) == "b!"
    ok, short = b.submit_many(["c", "short"])
    assert ok.result(WAIT) == "c!"
    with pytest.raises(BatchSizeMismatch, match="fn returned 1 results for a batch of 2"):
        short.result(WAIT)
    assert b.stats().failed_batches == 1
    assert b.run_here(["d", "e"]) is None  # holds items (delay > 0): never inline
    inline = make(fn, max_batch_size=8, max_delay_s=0.0)
    assert inline.run_here(["d", "e"]) == ["d!", "e!"]  # collected in the caller's thread


def test_run_here_only_when_an_instance_is_free(make) -> None:
    """``run_here`` runs in the caller's thread while an instance is free and nothing waits,
    counts as a batch, never lets more than ``instances`` batches run, and declines
    (``None``) when the batcher holds items to fill batches."""
    gate = Gated()
    b = make(gate, max_batch_size=4, max_delay_s=0.0, instances=1)
    assert b.run_here(["a", "b"]) == ["a!", "b!"]
    assert b.stats().batch_sizes == {2: 1} and b.load() == (0, 0)
    assert b.run_here([]) is None and b.run_here(list(range(5))) is None  # 0 or > max
    held = gate.hold(b)  # the one instance is busy
    assert b.run_here(["c"]) is None
    queued = b.submit("d")  # waits for the instance, not run beside it
    assert b.load() == (1, 1)
    gate.release.set()
    assert held.result(WAIT) == "gate!" and queued.result(WAIT) == "d!"
    with pytest.raises(RuntimeError, match="boom"):
        make(Gated(fail_on="x"), max_delay_s=0.0).run_here(["x"])
    assert make(Gated(), max_delay_s=0.01).run_here(["y"]) is None  # holds items: never inline
    b.close()
    with pytest.raises(Closed):
        b.run_here(["z"])


def test_a_worker_waits_while_inline_batches_fill_the_instances(make) -> None:
    """Two instances both busy in callers' threads: a submitted item waits for one of them."""
    entered, release = threading.Barrier(3, timeout=WAIT), threading.Event()

    def fn(items: list[object]) -> list[object]:
        if "hold" in items:
            entered.wait()
            assert release.wait(WAIT)
        return items

    b = make(fn, max_batch_size=4, max_delay_s=0.0, instances=2)
    callers = [threading.Thread(target=b.run_here, args=(["hold"],)) for _ in range(2)]
    for t in callers:
        t.start()
    entered.wait()  # both instances are inside fn, in the callers' threads
    assert b.load() == (2, 0)
    f = b.submit("later")
    time.sleep(0.05)
    assert not f.done() and b.load() == (2, 1)
    release.set()
    assert f.result(WAIT) == "later"
    for t in callers:
        t.join(WAIT)
