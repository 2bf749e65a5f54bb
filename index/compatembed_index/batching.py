"""Micro-batching of concurrent searches: requests that arrive while a search runs share the next one.

FAISS answers a batch of queries far faster per query than the same queries one call at a time (a
flat index reads the gallery once per batch, as one matrix product), and every call pays the routing,
the lock and the merge once. Under load, many clients each send one query; :class:`SearchBatcher`
lets them ride together without adding latency when the service is idle:

* the first request of a key (a collection's query version and search options) runs at once, as the
  batch's *leader*;
* requests of the same key that arrive while a batch runs wait, and when it ends, one of them leads
  the next batch with all that waited (up to ``max_rows`` query rows): natural batching, no timer;
* each request gets the batch's result and the rows that are its own;
* if a batch fails, its requests are retried one by one, so an error (a query that maps to a
  non-finite vector, say) reaches only the request that caused it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass
class _Request(Generic[R]):
    queries: np.ndarray
    done: bool = False
    result: R | None = None
    rows: slice = field(default_factory=lambda: slice(0, 0))
    error: BaseException | None = None


@dataclass
class _Queue:
    pending: list[_Request] = field(default_factory=list)
    busy: bool = False

    def take(self, max_rows: int) -> list[_Request]:
        """The oldest waiting requests, up to ``max_rows`` query rows (always at least one request)."""
        batch, rows = [self.pending[0]], len(self.pending[0].queries)
        for req in self.pending[1:]:
            if rows + len(req.queries) > max_rows:
                break
            batch.append(req)
            rows += len(req.queries)
        del self.pending[: len(batch)]
        return batch


class SearchBatcher:
    """Run concurrent calls of the same key as one call on their stacked query rows.

    Args:
        max_rows: most query rows in one batch (a request larger than this runs alone).
        enabled: False runs every call on its own (the batcher is then a pass-through).
    """

    def __init__(self, max_rows: int = 1024, *, enabled: bool = True) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self.enabled = enabled
        self._cond = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self.batches = 0  # calls of ``fn`` (for tests and metrics)
        self.requests = 0

    def run(self, key: Hashable, queries: np.ndarray, fn: Callable[[np.ndarray], R], *,
            max_rows: int | None = None) -> tuple[R, slice]:
        """``fn`` applied to a batch holding ``queries``; returns its result and the rows of ``queries`` in it.

        ``fn`` must be row-wise: row ``i`` of its result depends on query row ``i`` alone, and any two
        calls with the same ``key`` must compute the same thing. ``max_rows`` lowers the batcher's bound
        for batches this call leads (a larger k: fewer rows, so a batch costs what one request may).
        """
        if not self.enabled:
            with self._cond:
                self.batches += 1
                self.requests += 1
            return fn(queries), slice(0, len(queries))
        req: _Request[R] = _Request(queries)
        with self._cond:
            self.requests += 1
            queue = self._queues.setdefault(key, _Queue())
            queue.pending.append(req)
        while True:
            with self._cond:
                while not req.done and queue.busy:
                    self._cond.wait()
                if req.done:
                    break
                queue.busy = True
                batch = queue.take(min(self.max_rows, max_rows or self.max_rows))
            self._execute(key, queue, batch, fn)
        if req.error is not None:
            raise req.error
        return req.result, req.rows  # type: ignore[return-value]

    def _execute(self, key: Hashable, queue: _Queue, batch: list[_Request], fn: Callable[[np.ndarray], R]) -> None:
        """Run one batch (outside the batcher's lock) and hand every request its outcome."""
        outcomes: list[tuple[R | None, BaseException | None]] = []
        shared = False
        try:
            if len(batch) == 1:
                outcomes = [self._call(fn, batch[0].queries)]
            else:
                result, error = self._call(fn, np.concatenate([r.queries for r in batch]))
                if error is None:
                    outcomes, shared = [(result, None)] * len(batch), True
                else:  # find whose query failed: one by one, each gets its own result or error
                    outcomes = [self._call(fn, r.queries) for r in batch]
        finally:
            with self._cond:
                start = 0
                for r, (result, error) in zip(batch, outcomes):
                    n = len(r.queries)
                    r.result, r.error = result, error
                    r.rows = slice(start, start + n) if shared else slice(0, n)
                    start += n
                    r.done = True
                for r in batch:  # interrupted above (a BaseException): never leave a waiter hanging
                    if not r.done:
                        r.error, r.done = RuntimeError("the batched search was interrupted"), True
                queue.busy = False
                if not queue.pending and self._queues.get(key) is queue:
                    del self._queues[key]
                self._cond.notify_all()

    def _call(self, fn: Callable[[np.ndarray], R], queries: np.ndarray) -> tuple[R | None, BaseException | None]:
        with self._cond:
            self.batches += 1
        try:
            return fn(queries), None
        except Exception as exc:  # handed to the request(s) it belongs to
            return None, exc
