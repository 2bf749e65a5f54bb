"""A gallery whose segments are Milvus collections, behind the same routes as the FAISS backend.

Routes, query transforms, forward copies and score calibration are
:class:`~compatembed_index.routing.RoutedCollection`'s; the merge of per-segment results runs here,
client-side of Milvus. Nothing per item is held in this process: which version holds an item and its
metadata are read from Milvus, so several service replicas can serve one gallery.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from compatembed_index.errors import (
    ConfigError,
    DuplicateIdError,
    InvalidInputError,
    ItemNotFoundError,
    LimitExceededError,
)
from compatembed_index.limits import Limits
from compatembed_index.merge import Searchable, drop_duplicate_ids, search_plans
from compatembed_index.milvus.spaces import META_BYTES, GallerySpaces, MilvusSpace, MoveLog, milvus_index
from compatembed_index.registry import VersionRegistry
from compatembed_index.routing import CollectionConfig, RoutedCollection, _Batch
from compatembed_index.store import Catalog
from compatembed_index.validation import as_ids

_logger = logging.getLogger(__name__)

MAX_TOPK = 16_384
"""Milvus servers cap a search's top-k here."""
MAX_PASSES = 4
"""Search passes tried before a pass slower than the move grace is served anyway (it is logged)."""


_CALLS: ThreadPoolExecutor | None = None
_CALLS_LOCK = threading.Lock()


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Results of ``calls`` in order, made at once on a shared pool of threads: each Milvus call of a search
    pass (a count, a segment search, a metadata query) mostly waits, with Strong consistency, for the
    server's next time tick, so a pass over three segments costs one wait per round, not three."""
    global _CALLS
    if len(calls) <= 1:
        return [call() for call in calls]
    with _CALLS_LOCK:
        if _CALLS is None:
            _CALLS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="milvus-call")
    return [f.result() for f in [_CALLS.submit(call) for call in calls]]


class MilvusCollection(RoutedCollection):
    """One gallery in Milvus: a collection per version space and per forward copy.

    Args:
        name: gallery name.
        config: collection settings; ``factory``/``factories`` map to Milvus indexes (:func:`milvus_index`).
        registry: registered model versions.
        store: the catalog the config is persisted in.
        client: a connected ``pymilvus.MilvusClient``.
        prefix: namespace of this deployment's Milvus collections.
        move_grace_s: see :class:`~compatembed_index.milvus.spaces.GallerySpaces`.
        max_k, max_batch, limits, batch_searches: as for the FAISS collection.
    """

    def __init__(self, name: str, config: CollectionConfig, registry: VersionRegistry, store: Catalog, *,
                 client: Any, prefix: str = "ce_", move_grace_s: float = 0.5, max_k: int = 1000,
                 max_batch: int = 100_000, limits: Limits | None = None, batch_searches: bool = True) -> None:
        super().__init__(name, config, registry, store, max_k=max_k, max_batch=max_batch, limits=limits,
                         batch_searches=batch_searches)
        self.client = client
        moves = store if isinstance(store, MoveLog) else None  # the shared MilvusCatalog records moves
        self.spaces = GallerySpaces(client, prefix, name, move_grace_s=move_grace_s, moves=moves)
        for f in {config.factory, *config.factories.values()}:
            milvus_index(f, config.search_params)  # refuse what Milvus cannot build before anything is stored

    # -- spaces -----------------------------------------------------------------------------------------
    def _index(self, space: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        return milvus_index(self.config.factory_for(space), self.config.search_params)

    def _ensure(self, key: tuple[str, ...]) -> None:
        v = self.registry.get(key[-1])
        kind, build, _ = self._index(key[-1])
        self.spaces.ensure(key, v.dim, v.metric, (kind, build))

    def _views(self, reachable_from: str | None = None) -> tuple[dict[str, Searchable], dict[tuple[str, str], Searchable]]:
        """Non-empty segments and wanted copies. A view's ``ntotal`` is :data:`MAX_TOPK`, not its count, so
        the merge asks each segment for the full k: items may move into a segment while the pass runs,
        and on milvus-lite a search limited to the counts read at plan time missed moved items during a
        backfill (seen in the backfill test; a count read mid-upsert is the suspect, not yet isolated).

        With ``reachable_from`` only the segments its queries cannot reach are counted (a Strong count
        waits for the server's time tick, about a second per round on a standalone server here); the
        others are given as non-empty, searched whatever their size, and marked ``counted=False``."""
        wanted = {tuple(p) for p in self.config.materialised}
        keys = [key for key in self.spaces.keys() if key[-1] in self.registry]

        def reachable(v: str) -> bool:
            return reachable_from is not None and (v == reachable_from or self.registry.query_route(reachable_from, v)
                                                   is not None)

        to_count = [key for key in keys if len(key) == 1 and not reachable(key[0])]
        counts = dict(zip(to_count, concurrently([partial(self.spaces.count, key) for key in to_count])))
        segments: dict[str, Searchable] = {}
        copies: dict[tuple[str, str], Searchable] = {}
        for key in keys:
            v = self.registry.get(key[-1])
            view = MilvusSpace(self.client, self.spaces.name(key), v.dim, v.metric, MAX_TOPK,
                               self._index(key[-1])[2], counted=key in counts)
            if len(key) == 1 and counts.get(key, 1) > 0:
                segments[key[0]] = view
            elif len(key) == 2 and key in wanted:
                copies[(key[0], key[1])] = view
        return segments, copies

    def _forward_copies(self, version: str, x: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        for s, t in (tuple(p) for p in self.config.materialised):
            if s == version:
                y = out[(s, t)] = self._forward(s, t).apply(x)
                self._check_space(y, t, f"vectors forwarded from {s} into {t}")
        return out

    # -- search -----------------------------------------------------------------------------------------
    def _search_pass(self, version: str, q: np.ndarray, k: int, allow_partial: bool,
                     include_metadata: bool) -> _Batch:
        for attempt in range(MAX_PASSES):
            t0, started_ns = time.monotonic(), time.time_ns()
            plans, skipped = self._plan(version, allow_partial, lazy_counts=True)
            depth = k
            while True:
                scores, ids, cols = search_plans(plans, q, depth, run=concurrently)
                full = bool((ids[:, -1] >= 0).any())  # some row filled every slot: there may be more
                scores, ids, cols, lost = drop_duplicate_ids(scores, ids, cols, k)
                if not lost or not full or depth >= MAX_TOPK:
                    break
                depth = min(2 * depth, MAX_TOPK)  # a move in flight took slots: search deeper
            took = time.monotonic() - t0
            if took <= self.spaces.move_grace_s or not self.spaces.moved_during(started_ns, time.time_ns()):
                break
            _logger.warning("%s: search pass %d took %.3fs, longer than the move grace %.3fs, while items moved%s",
                            self.name, attempt + 1, took, self.spaces.move_grace_s,
                            ": run again" if attempt + 1 < MAX_PASSES else ": served (raise move_grace_s)")
        names = [p.version for p in plans]
        raw = None
        if include_metadata:
            raw = self._hit_metadata(ids, cols, names)
        # a segment planned without its count that answered nothing was empty: it took no route (as in FAISS)
        routes = {p.version: p.how for p in plans if p.segment.counted or p.segment.answered}
        return _Batch(scores, ids, cols, names, routes, skipped, raw)

    def _hit_metadata(self, ids: np.ndarray, cols: np.ndarray, names: list[str]) -> list[list[str | None]]:
        by_v: dict[str, list[int]] = {}
        for i, c in zip(ids.ravel().tolist(), cols.ravel().tolist()):
            if i >= 0:
                by_v.setdefault(names[c], []).append(i)
        meta: dict[int, str | None] = {}
        for found in concurrently([partial(self.spaces.metadata, v, sorted(set(vids))) for v, vids in by_v.items()]):
            meta.update(found)
        missing = sorted({i for vids in by_v.values() for i in vids} - set(meta))
        if missing:  # moved since the search: read it where it is now
            arr = np.array(missing, np.int64)
            for i, v in zip(missing, self.spaces.locate(arr)):
                if v is not None:
                    meta.update(self.spaces.metadata(v, [i]))
        return [[meta.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]

    # -- writes -----------------------------------------------------------------------------------------
    def _check_meta_size(self, meta: list[str | None] | None) -> None:
        for j, m in enumerate(meta or []):
            if m is not None and len(m.encode()) > META_BYTES:
                raise LimitExceededError(f"metadata of item {j} takes {len(m.encode())} bytes as JSON; the Milvus "
                                         f"backend stores at most {META_BYTES} (a VARCHAR field)")

    def add(self, version: str, ids: Any, vectors: Any, metadata: list[dict[str, Any] | None] | None = None, *,
            upsert: bool = False) -> int:
        """Add items of ``version`` (``upsert`` replaces, possibly moving them); returns the sequence number.

        Raises:
            DuplicateIdError: an id exists and ``upsert`` is false.
        """
        def check(ids_a: np.ndarray, holders: dict[int, Any]) -> None:
            if holders and not upsert:
                present = sorted(holders)
                raise DuplicateIdError(f"{len(present)} id(s) already in collection {self.name!r} "
                                       f"(e.g. {present[:5]}); use upsert to replace them")

        return self._write(version, ids, vectors, metadata, check, keep_metadata=False)

    def upgrade(self, version: str, ids: Any, vectors: Any, metadata: list[dict[str, Any] | None] | None = None) -> int:
        """Move existing items to ``version`` with new vectors (metadata kept unless given).

        Raises:
            ItemNotFoundError: an id is not in the collection.
        """
        def check(ids_a: np.ndarray, holders: dict[int, Any]) -> None:
            missing = [i for i in ids_a.tolist() if i not in holders]
            if missing:
                raise ItemNotFoundError(f"{len(missing)} id(s) not in collection {self.name!r} "
                                        f"(e.g. {missing[:5]}); add them instead")

        return self._write(version, ids, vectors, metadata, check, keep_metadata=True)

    def _write(self, version: str, ids: Any, vectors: Any, metadata: list[dict[str, Any] | None] | None,
               check: Callable[[np.ndarray, dict[int, Any]], None], *, keep_metadata: bool) -> int:
        """The one write path of add and upgrade: checks, then, under the write lock, ``check`` against the
        ids' current holders, the forward copies, and the write (an upgrade without metadata keeps the old)."""
        ids_a, x = self._prepare(version, ids, vectors)
        meta = self._metadata(metadata, len(ids_a))
        self._check_meta_size(meta)
        with self.lock.write():
            self._check_live()
            self._ensure((version,))
            holders = self.spaces.holders(ids_a)
            check(ids_a, holders)
            forwarded = self._forward_copies(version, x)
            self.applied_seq = self.spaces.write(version, ids_a, x, meta if keep_metadata else meta or [None] * len(ids_a),
                                                 forwarded, holders=holders)
        return self.applied_seq

    def delete(self, ids: Any) -> tuple[int, int]:
        """Delete items (absent ids are ignored); returns (sequence number, number deleted)."""
        ids_a = as_ids(ids, max_rows=self.max_batch)
        with self.lock.write():
            self._check_live()
            n = self.spaces.remove(ids_a)
            self.applied_seq = self.spaces.next_seq()
        return self.applied_seq, n

    def materialise(self, source: str, target: str) -> dict[str, Any]:
        """Build a forward-upgraded copy of segment ``source`` in ``target``'s space (a Milvus collection)."""
        self.registry.get(source), self.registry.get(target)
        if source == target:
            raise InvalidInputError("materialise needs two different versions")
        route = self._forward(source, target)
        tv = self.registry.get(target)
        kind, build, _ = self._index(target)

        def forward(x: np.ndarray) -> np.ndarray:
            y = route.apply(x)
            self._check_space(y, target, f"vectors forwarded from {source} into {target}")
            return y

        with self.lock.write():
            self._check_live()
            before = self._calibrated_routes()
            t0 = time.perf_counter()
            n = self.spaces.build_copy(source, target, tv.dim, tv.metric, (kind, build), forward)
            seconds = time.perf_counter() - t0
            self.config.materialised = [p for p in self.config.materialised if p != [source, target]] + [[source, target]]
            self._drop_stale_calibration(before)
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())
        return {"source": source, "target": target, "vectors": n, "seconds": seconds, "route": ">".join(route.path)}

    def drop_materialised(self, source: str, target: str) -> None:
        """Forget the forward copy ``source → target`` (queries fall back to query routes)."""
        with self.lock.write():
            self._check_live()
            if [source, target] not in self.config.materialised:
                raise ItemNotFoundError(f"collection {self.name!r} has no materialised copy {source} → {target}")
            before = self._calibrated_routes()
            self.config.materialised = [p for p in self.config.materialised if p != [source, target]]
            self.spaces.drop((source, target))
            self._drop_stale_calibration(before)
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())

    # -- lifecycle ----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the gallery's Milvus collections (they come back released after a server restart)."""
        self.spaces.load()

    def drop(self) -> None:
        """Drop every Milvus collection of the gallery."""
        self.spaces.drop()

    def repair(self) -> int:
        """Finish moves a dead writer left half done (item in two segments); returns rows deleted."""
        with self.lock.write():
            return self.spaces.repair()

    def snapshot(self) -> Any:
        """Milvus persists every acknowledged write itself; snapshots belong to the FAISS backend.

        Raises:
            ConfigError: always.
        """
        raise ConfigError("the Milvus backend has no snapshots: Milvus persists every acknowledged write itself")

    # -- introspection ------------------------------------------------------------------------------------
    def versions_of(self, ids: Any) -> list[str | None]:
        """The version holding each item (None where absent), read from Milvus."""
        return self.spaces.locate(as_ids(ids, max_rows=self.max_batch))

    def get_points(self, ids: Any, *, include_vectors: bool = True,
                   include_metadata: bool = True) -> list[dict[str, Any] | None]:
        """The stored items ``ids``, in order, None where absent, read from Milvus (as the FAISS collection's)."""
        arr = as_ids(ids, max_rows=self.max_batch)
        where = self.spaces.locate(arr)
        limit = self.limits.max_response_bytes
        if limit is not None and include_vectors:
            total = sum(16 * self.registry.get(v).dim for v in where if v is not None)
            if total > limit:
                raise LimitExceededError(f"the answer would take about {total} bytes, above the limit "
                                         f"max_response_bytes={limit}: ask for fewer ids, or include_vectors=false")
        by_v: dict[str, list[int]] = {}
        for i, v in zip(arr.tolist(), where):
            if v is not None:
                by_v.setdefault(v, []).append(i)
        stored = {i: item for v, vids in by_v.items() for i, item in self.spaces.items(v, vids,
                                                                                         vectors=include_vectors).items()}
        out: list[dict[str, Any] | None] = []
        for i, v in zip(arr.tolist(), where):
            if v is None or i not in stored:  # absent, or moved between the two reads: not there as located
                out.append(None)
                continue
            item: dict[str, Any] = {"id": i, "version": v}
            if include_metadata:
                item["metadata"] = None if stored[i][0] is None else json.loads(stored[i][0])
            if include_vectors:
                item["vector"] = stored[i][1]
            out.append(item)
        return out

    def __len__(self) -> int:
        return sum(self.spaces.count(k) for k in self.spaces.keys() if len(k) == 1)

    def stats(self) -> dict[str, Any]:
        """Sizes per segment and copy (read from Milvus), config, calibration (JSON-ready).

        Mid-move an item counts in both segments it is in for a moment.
        """
        keys = self.spaces.keys()
        segments = {}
        for key in sorted(k for k in keys if len(k) == 1):
            v = self.registry.get(key[0]) if key[0] in self.registry else None
            segments[key[0]] = {"ntotal": self.spaces.count(key), "factory": self.config.factory_for(key[0]),
                                "index": self._index(key[0])[0], "trained": True,
                                "dim": v.dim if v else None, "metric": v.metric if v else None,
                                "device": "milvus", "train_error": None}
        return {
            "name": self.name,
            "backend": "milvus",
            "items": sum(s["ntotal"] for s in segments.values()),
            "segments": segments,
            "materialised": [{"source": s, "target": t, "ntotal": self.spaces.count((s, t))}
                             for s, t in sorted(tuple(p) for p in self.config.materialised)],
            "calibration": dict(self.config.calibration),
            "config": self.config.to_dict(),
            "applied_seq": self.applied_seq,
            "snapshot_seq": None,
            "load_report": list(self.load_report),
        }
