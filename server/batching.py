"""A dynamic batcher in front of a batched function (the backbone), as Triton's dynamic batching.

Callers ``submit`` single items from any thread and get a ``concurrent.futures.Future`` each
(``await asyncio.wrap_future(f)`` from asyncio). Worker threads group queued items into
batches and call ``fn(items) -> results`` once per batch: one worker by default, or
``instances`` of them taking batches in turn, so that many batches run at once (Triton's
``instance_group`` count; ``fn`` must then be safe to call from several threads). Which
items run now is decided by ``collate``, a pure function of the queue and the clock: a batch
is taken when it is full or when its oldest item has waited ``max_delay_s`` (timestamps taken
at enqueue).

``max_batch_size=1`` or ``max_delay_s=0`` switches batching off in effect: with a delay of 0 a
batch is taken as soon as anything is queued (only what piled up while the previous batch ran
is grouped); with a size of 1 every item runs alone.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from server.errors import BatchSizeMismatch, Closed, Overloaded

__all__ = ["BatcherStats", "DynamicBatcher", "Timestamped", "collate"]

T = TypeVar("T")
R = TypeVar("R")


class Timestamped(Protocol):
    """A queued entry: ``enqueued_at`` is the ``time.monotonic()`` reading taken at enqueue."""

    @property
    def enqueued_at(self) -> float: ...


Q = TypeVar("Q", bound=Timestamped)


def collate(
    queue_items: Sequence[Q], now: float, max_batch_size: int, max_delay_s: float
) -> tuple[list[Q], list[Q]]:
    """Decides what runs now: ``(batch, remaining)``, both in FIFO order.

    ``queue_items`` is oldest first. A batch of the first ``max_batch_size`` items is taken when
    that many are queued, or, with fewer queued, all of them once the oldest has waited
    ``max_delay_s``; otherwise the batch is empty. Never more than ``max_batch_size`` items.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if not queue_items:
        return [], []
    full = len(queue_items) >= max_batch_size
    expired = now - queue_items[0].enqueued_at >= max_delay_s
    if not (full or expired):
        return [], list(queue_items)
    return list(queue_items[:max_batch_size]), list(queue_items[max_batch_size:])


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot for metrics: ``batch_sizes`` maps a batch size to how many batches had it."""

    name: str
    queue_depth: int
    batches_run: int
    items_run: int
    failed_batches: int
    rejected: int
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    enqueued_at: float


class DynamicBatcher(Generic[T, R]):
    """Groups submitted items into calls of ``fn(list_of_items) -> list_of_results``.

    ``fn`` must return one result per input, in order; otherwise every caller in that batch
    gets ``BatchSizeMismatch``. It may instead return an iterator of them, produced as they
    are computed: each caller's future then completes with its own result at once, and an
    error or a short count fails only the callers still waiting. An exception from ``fn``
    fails that batch's futures only and the batcher keeps serving. ``submit`` raises
    ``Overloaded`` once ``max_queue`` items wait, and ``Closed`` after ``close``. A cancelled
    future is dropped before its batch runs.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R] | Iterator[R]],
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 1024,
        name: str = "batcher",
        instances: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"batcher {name!r}: max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"batcher {name!r}: max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"batcher {name!r}: max_queue must be >= 1, got {max_queue}")
        if instances < 1:
            raise ValueError(f"batcher {name!r}: instances must be >= 1, got {instances}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.name = name
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batches_run = 0
        self._running = 0  # batches inside fn right now
        self._unanswered = 0  # items of those batches without their result yet
        self._items_run = 0
        self._failed_batches = 0
        self._rejected = 0
        self._batch_sizes: Counter[int] = Counter()
        self.instances = instances
        self._workers = [
            threading.Thread(target=self._run, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(instances)
        ]
        for w in self._workers:
            w.start()

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, item: T) -> Future[R]:
        """Queues one item; its future completes with ``fn``'s result for it."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        """Queues all of ``items`` or none of them (``Overloaded`` if they do not all fit)."""
        with self._cond:
            if self._closed:
                raise Closed(f"batcher {self.name!r} is closed and takes no new items")
            if len(self._queue) + len(items) > self.max_queue:
                self._rejected += len(items)
                raise Overloaded(
                    f"batcher {self.name!r}: queue full ({len(self._queue)} of {self.max_queue} "
                    f"waiting, {len(items)} more refused); retry later"
                )
            now = time.monotonic()
            pending = [_Pending(item, Future[R](), now) for item in items]
            self._queue.extend(pending)
            self._cond.notify()
        return [p.future for p in pending]

    def run_here(self, items: Sequence[T]) -> Sequence[R] | None:
        """Runs ``items`` as one batch in the calling thread when nothing waits, an instance is
        free and the batcher does not hold items to fill batches (``max_delay_s`` 0): the same
        ``fn`` call a worker would make now, without the hand-off to it and back. ``None``
        (nothing run) otherwise: then ``submit_many``. Raises what ``fn`` raises."""
        if self.max_delay_s > 0 or not 0 < len(items) <= self.max_batch_size:
            return None
        with self._cond:
            if self._closed:
                raise Closed(f"batcher {self.name!r} is closed and takes no new items")
            if self._queue or self._running >= self.instances:
                return None
            self._running += 1
            self._unanswered += len(items)
        results, error = self._call(list(items))
        if error is not None:
            raise error
        return results

    async def submit_async(self, item: T) -> R:
        """``submit`` for asyncio callers: awaits the result without blocking the loop."""
        return await asyncio.wrap_future(self.submit(item))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking items. ``drain``: run what is queued first; else fail it with ``Closed``.

        Waits up to ``timeout`` seconds for the workers (batches running now always finish).
        Idempotent; safe to call from inside ``fn`` (it then does not wait).
        """
        with self._cond:
            self._closed = True
            dropped: list[_Pending[T, R]] = []
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
            self._cond.notify_all()
        for p in dropped:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(Closed(f"batcher {self.name!r} closed before this item ran"))
        if threading.current_thread() in self._workers:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            w.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    def load(self) -> tuple[int, int]:
        """``(batches running now, items waiting)``: from inside ``fn``, ``(1, 0)`` means this
        batch has the model to itself (e.g. to use every core for it)."""
        with self._cond:
            return self._running, len(self._queue)

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                name=self.name,
                queue_depth=len(self._queue),
                batches_run=self._batches_run,
                items_run=self._items_run,
                failed_batches=self._failed_batches,
                rejected=self._rejected,
                batch_sizes=dict(self._batch_sizes),
            )

    # -- the worker ---------------------------------------------------------------------------

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Blocks until a batch is due; ``None`` once closed and empty."""
        with self._cond:
            while True:
                if self._closed and not self._queue:
                    return None
                if self._running >= self.instances:  # every instance busy (some inline)
                    self._cond.wait()
                    continue
                # Only the head matters to collate: the first max_batch_size items decide.
                head = list(itertools.islice(self._queue, self.max_batch_size))
                delay = 0.0 if self._closed else self.max_delay_s
                now = time.monotonic()
                batch, _ = collate(head, now, self.max_batch_size, delay)
                if batch and self.instances > 1:
                    # An even share of the work in hand (what waits, and what running batches
                    # have still to answer) per instance: one instance does not take the whole
                    # queue while another is idle, or about to be.
                    share = -(-(len(self._queue) + self._unanswered) // self.instances)
                    batch = batch[: max(1, share)]
                if batch:
                    for _ in batch:
                        self._queue.popleft()
                    self._running += 1
                    self._unanswered += len(batch)
                    if self._queue and self.instances > 1:
                        self._cond.notify()  # what is left may be due for an idle worker
                    return batch
                self._cond.wait(head[0].enqueued_at + delay - now if head else None)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            with self._cond:
                self._unanswered -= len(batch) - len(live)
                if not live:
                    self._running -= 1
            if live:
                self._run_batch(live)

    def _call(
        self, items: list[T], deliver: Callable[[int, R], None] | None = None
    ) -> tuple[Sequence[R], BaseException | None]:
        """``fn(items)`` with its result checked, then the books kept (this batch was counted
        as running when it was taken). ``fn`` may return an iterator: then ``deliver(i, r)``
        gets each result as soon as it is produced (a model that runs a batch in slices
        answers the first slice's callers first), and the list comes back empty."""
        error: BaseException | None = None
        results: Sequence[R] = ()
        produced = streamed = 0
        try:
            out = self.fn(items)
            if isinstance(out, Iterator):
                collected: list[R] = []
                for r in out:
                    if produced < len(items):
                        if deliver is None:
                            collected.append(r)
                        else:
                            deliver(produced, r)
                            streamed += 1
                            with self._cond:  # the shares of _next_batch count on it
                                self._unanswered -= 1
                    produced += 1
                results = collected
            else:
                results, produced = out, len(out)
            if produced != len(items):
                raise BatchSizeMismatch(
                    f"batcher {self.name!r}: fn returned {produced} results "
                    f"for a batch of {len(items)} items"
                )
        except Exception as e:  # isolated to this batch; the worker keeps serving
            error = e
        with self._cond:
            self._running -= 1
            self._unanswered -= len(items) - streamed
            self._batches_run += 1
            self._items_run += len(items)
            self._batch_sizes[len(items)] += 1
            if error is not None:
                self._failed_batches += 1
            if self._queue:
                self._cond.notify()  # an instance is free for what waits
        return results, error

    def _run_batch(self, batch: list[_Pending[T, R]]) -> None:
        delivered = 0

        def deliver(i: int, r: R) -> None:
            nonlocal delivered
            batch[i].future.set_result(r)
            delivered = i + 1

        results, error = self._call([p.item for p in batch], deliver)
        for i, p in enumerate(batch[delivered:], start=delivered):
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(results[i])
