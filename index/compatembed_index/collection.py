"""The embedded backend: one FAISS segment per model version over the SQLite store.

Routing (plans, transforms, calibration, merge) is :class:`~compatembed_index.routing.RoutedCollection`'s;
this subclass holds the vectors. Concurrent searches share FAISS calls
(:mod:`~compatembed_index.batching`); loading starts from the newest good snapshot
(:mod:`~compatembed_index.recovery`) and replays the store. Mutations commit to the store first
(durable), then update the in-memory segments under the write side of a readers-writer lock, so
searches never observe a half-applied batch.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index import snapshot as snap
from compatembed_index.calibration import calibration_problem
from compatembed_index.errors import (
    ConfigError,
    DuplicateIdError,
    InvalidInputError,
    ItemNotFoundError,
    LimitExceededError,
)
from compatembed_index.limits import Limits
from compatembed_index.merge import Searchable, search_plans
from compatembed_index.recovery import load_newest_snapshot
from compatembed_index.registry import VersionRegistry
from compatembed_index.results import SearchResult
from compatembed_index.routing import HIT_JSON_BYTES, CollectionConfig, RoutedCollection, _Batch
from compatembed_index.segment import Segment
from compatembed_index.store import Store
from compatembed_index.validation import as_ids

__all__ = ["HIT_JSON_BYTES", "Collection", "CollectionConfig", "SearchResult"]

_logger = logging.getLogger(__name__)


class Collection(RoutedCollection):
    """One named collection: segments per version, forward-upgraded copies, routes, calibration.

    Args:
        name: collection name.
        config: segment construction settings.
        registry: registered model versions.
        store: durable store (already holding this collection).
        snapshot_root: snapshot directory root (None: no snapshots).
        max_k: largest k a search may ask for.
        max_batch: largest number of vectors or ids per request.
        mmap: load snapshot indexes memory-mapped where FAISS allows.
        keep_snapshots: how many snapshots to keep.
        limits: factory, metadata, result and response limits.
        batch_searches: concurrent searches of the same query version and options run as one FAISS
            call (:mod:`~compatembed_index.batching`); False runs each on its own.
    """

    def __init__(
        self,
        name: str,
        config: CollectionConfig,
        registry: VersionRegistry,
        store: Store,
        *,
        snapshot_root: Path | None = None,
        max_k: int = 1000,
        max_batch: int = 100_000,
        mmap: bool = False,
        keep_snapshots: int = 2,
        limits: Limits | None = None,
        batch_searches: bool = True,
    ) -> None:
        super().__init__(name, config, registry, store, max_k=max_k, max_batch=max_batch, limits=limits,
                         batch_searches=batch_searches)
        self.store: Store = store
        self.snapshot_root = snapshot_root
        self.mmap = mmap
        self.keep_snapshots = keep_snapshots
        self.segments: dict[str, Segment] = {}
        self.copies: dict[tuple[str, str], Segment] = {}
        self._where: dict[int, str] = {}
        self._meta: dict[int, str | None] = {}
        self.snapshot_seq: int | None = None
        self._dirty: set[tuple[str, ...]] = set()
        self._snapshot_lock = threading.Lock()  # one snapshot at a time (they share a sequence number)

    # -- segment construction -------------------------------------------------------------------
    def _new_segment(self, space: str, *, check: bool = False) -> Segment:
        """A new, empty segment in ``space``; ``check`` bounds its factory by the limits first (a new
        segment or copy; rebuilds of existing ones were checked when they were first made)."""
        v = self.registry.get(space)
        return Segment(
            v.dim,
            self.config.factory_for(space),
            v.metric,
            train_size=self.config.train_size,
            search_params=self.config.search_params,
            device=self.config.device,
            limits=self.limits if check else None,
        )

    def _segment(self, version: str, *, check: bool = False) -> Segment:
        """The segment of ``version``, made on first use (``check``: bounded by the limits, for writes)."""
        seg = self.segments.get(version)
        if seg is None:
            seg = self.segments[version] = self._new_segment(version, check=check)
        return seg

    # -- in-memory application (caller holds the write lock) ----------------------------------------
    def _mem_remove(self, ids: np.ndarray, *, everywhere: bool = False) -> None:
        """Take ``ids`` out of their segments (all segments with ``everywhere``, used by replay)."""
        if len(ids) == 0:
            return
        groups: dict[str, np.ndarray]
        if everywhere:
            groups = {v: ids for v in self.segments}
        else:
            by: dict[str, list[int]] = {}
            for i in ids.tolist():
                v = self._where.get(i)
                if v is not None:
                    by.setdefault(v, []).append(i)
            groups = {v: np.asarray(lst, dtype=np.int64) for v, lst in by.items()}
        for v, gids in groups.items():
            targets: list[tuple[tuple[str, ...], Segment]] = []
            if v in self.segments:
                targets.append(((v,), self.segments[v]))
            targets += [((s, t), c) for (s, t), c in self.copies.items() if s == v]
            for key, seg in targets:
                if key in self._dirty:
                    continue
                if seg.trained and not seg.supports_remove:
                    self._dirty.add(key)  # HNSW: rebuilt from the store once the batch is applied
                else:
                    seg.remove(gids)

    def _mem_add(self, version: str, ids: np.ndarray, x: np.ndarray,
                 forwarded: dict[tuple[str, str], np.ndarray] | None = None) -> None:
        seg = self._segment(version)
        if (version,) not in self._dirty:
            seg.add(ids, x)
        for (s, t), copy in self.copies.items():
            if s == version and (s, t) not in self._dirty:
                y = forwarded.get((s, t)) if forwarded is not None else None
                copy.add(ids, y if y is not None else self._forward(s, t).apply(x))

    def _rebuild_dirty(self) -> None:
        for key in sorted(self._dirty):
            self._rebuild(key)
        self._dirty.clear()

    def _rebuild(self, key: tuple[str, ...], *, check: bool = False) -> None:
        """Rebuild a segment (``(version,)``) or a copy (``(source, target)``) from the store's vectors.

        With ``check`` (a new copy), the factory is bounded by the limits and the forwarded vectors
        are checked in the target space before the copy replaces anything.
        """
        source = key[0]
        fresh = self._new_segment(key[-1], check=check)
        route = self._forward(*key) if len(key) == 2 else None
        t0 = time.perf_counter()
        for rows in self.store.iter_rows(self.name, version=source):
            x = rows.matrix if rows.matrix is not None else np.stack(rows.vectors)  # type: ignore[arg-type]
            if route is not None:
                x = route.apply(x)
                if check:
                    self._check_space(x, key[-1], f"vectors forwarded from {source} into {key[-1]}")
            fresh.add(rows.ids, x)
        if len(key) == 2:
            self.copies[(key[0], key[1])] = fresh
        else:
            self.segments[source] = fresh
        _logger.info("%s: rebuilt %s from the store (%d vectors, %.2fs)", self.name, "→".join(key),
                     fresh.ntotal, time.perf_counter() - t0)

    # -- mutations --------------------------------------------------------------------------------
    def add(
        self,
        version: str,
        ids: Any,
        vectors: Any,
        metadata: list[dict[str, Any] | None] | None = None,
        *,
        upsert: bool = False,
    ) -> int:
        """Add items embedded by ``version``; returns the sequence number of the durable write.

        Args:
            version: model version that produced ``vectors``.
            ids: (N,) unique non-negative int64 ids.
            vectors: (N, D) float32 (normalised here when the version is normalised).
            metadata: per-item JSON object or None.
            upsert: replace items that already exist (possibly moving them to another segment).

        Raises:
            DuplicateIdError: an id exists and ``upsert`` is false.
            InvalidInputError, DimensionMismatchError, VersionNotFoundError, LimitExceededError.
        """
        ids_a, x = self._prepare(version, ids, vectors)
        meta = self._metadata(metadata, len(ids_a))
        with self.lock.write():
            self._check_live()
            self._segment(version, check=True)  # a factory that cannot serve this version, or exceeds the
            # limits, fails here, before the commit
            if not upsert:
                present = [i for i in ids_a.tolist() if i in self._where]
                if present:
                    raise DuplicateIdError(
                        f"{len(present)} id(s) already in collection {self.name!r} (e.g. {present[:5]}); "
                        "use upsert to replace them"
                    )
            forwarded = self._forward_copies(version, x)
            seq = self.store.upsert_items(self.name, version, ids_a, x, meta or [None] * len(ids_a))
            self._apply_upsert(version, ids_a, x, meta or [None] * len(ids_a), seq, forwarded)
        return seq

    def _apply_upsert(self, version: str, ids: np.ndarray, x: np.ndarray, meta: list[str | None] | None,
                      seq: int, forwarded: dict[tuple[str, str], np.ndarray] | None = None) -> None:
        self._mem_remove(ids)
        self._mem_add(version, ids, x, forwarded)
        for j, i in enumerate(ids.tolist()):
            self._where[i] = version
            if meta is not None:
                self._meta[i] = meta[j]
        self._rebuild_dirty()
        self.applied_seq = seq

    def upgrade(self, version: str, ids: Any, vectors: Any, metadata: list[dict[str, Any] | None] | None = None) -> int:
        """Replace existing items' vectors by ``version``'s (partial backfill), moving them between segments.

        The move is one store transaction and one locked in-memory update: a search sees each item in
        its old segment or in its new one, never in both or neither. Metadata is kept unless given.

        Raises:
            ItemNotFoundError: an id is not in the collection.
        """
        ids_a, x = self._prepare(version, ids, vectors)
        meta = self._metadata(metadata, len(ids_a))
        with self.lock.write():
            self._check_live()
            self._segment(version, check=True)  # a factory that cannot serve this version, or exceeds the
            # limits, fails here, before the commit
            missing = [i for i in ids_a.tolist() if i not in self._where]
            if missing:
                raise ItemNotFoundError(
                    f"{len(missing)} id(s) not in collection {self.name!r} (e.g. {missing[:5]}); add them instead"
                )
            forwarded = self._forward_copies(version, x)
            seq = self.store.upsert_items(self.name, version, ids_a, x, meta)
            self._apply_upsert(version, ids_a, x, meta, seq, forwarded)
        return seq

    def delete(self, ids: Any) -> tuple[int, int]:
        """Delete items (absent ids are ignored); returns (sequence number, number deleted)."""
        ids_a = as_ids(ids, max_rows=self.max_batch)
        with self.lock.write():
            self._check_live()
            seq, n = self.store.delete_items(self.name, ids_a)
            self._mem_remove(ids_a)
            for i in ids_a.tolist():
                self._where.pop(i, None)
                self._meta.pop(i, None)
            self._rebuild_dirty()
            self.applied_seq = seq
        return seq, n

    def materialise(self, source: str, target: str) -> dict[str, Any]:
        """Build (or rebuild) a forward-upgraded copy of segment ``source`` in ``target``'s space.

        Afterwards queries of ``target`` search the copy instead of transforming themselves, and the
        copy follows every later mutation of ``source`` items.

        Raises:
            NoRouteError: no chain of forward edges from ``source`` to ``target``.
        """
        self.registry.get(source), self.registry.get(target)
        if source == target:
            raise InvalidInputError("materialise needs two different versions")
        route = self._forward(source, target)
        with self.lock.write():
            self._check_live()
            before = self._calibrated_routes()
            t0 = time.perf_counter()
            self._rebuild((source, target), check=True)
            seconds = time.perf_counter() - t0
            pairs = [p for p in self.config.materialised if p != [source, target]] + [[source, target]]
            self.config.materialised = pairs
            self._drop_stale_calibration(before)
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())
            n = self.copies[(source, target)].ntotal
        _logger.info("%s: materialised %s → %s (%d vectors) in %.2fs", self.name, source, target, n, seconds)
        return {"source": source, "target": target, "vectors": n, "seconds": seconds,
                "route": ">".join(route.path)}

    def drop_materialised(self, source: str, target: str) -> None:
        """Forget the forward-upgraded copy ``source → target`` (queries fall back to query routes)."""
        with self.lock.write():
            self._check_live()
            if (source, target) not in self.copies:
                raise ItemNotFoundError(f"collection {self.name!r} has no materialised copy {source} → {target}")
            before = self._calibrated_routes()
            del self.copies[(source, target)]
            self.config.materialised = [p for p in self.config.materialised if p != [source, target]]
            self._drop_stale_calibration(before)
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())

    # -- search (routing: RoutedCollection) ---------------------------------------------------------
    def _views(self, reachable_from: str | None = None) -> tuple[dict[str, Searchable], dict[tuple[str, str], Searchable]]:
        return self.segments, self.copies  # type: ignore[return-value]  # counts are free here: always exact

    def _search_pass(self, version: str, q: np.ndarray, k: int, allow_partial: bool,
                     include_metadata: bool) -> _Batch:
        # one locked pass: the plan, FAISS, and the stored metadata of the hits, so a write cannot
        # slip between the search and what it returns
        with self.lock.read():
            plans, skipped = self._plan(version, allow_partial)
            scores, ids, cols = search_plans(plans, q, k)
            raw = None
            if include_metadata:
                raw = [[self._meta.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]
        return _Batch(scores, ids, cols, [p.version for p in plans], {p.version: p.how for p in plans},
                      skipped, raw)

    # -- persistence ------------------------------------------------------------------------------
    def _segment_info(self, key: tuple[str, ...], seg: Segment) -> dict[str, Any]:
        info: dict[str, Any] = {"dim": seg.dim, "factory": seg.factory, "metric": seg.metric,
                                "trained": seg.trained, "ntotal": seg.ntotal}
        if len(key) == 1:
            info.update(kind="segment", version=key[0])
        else:
            info.update(kind="copy", source=key[0], target=key[1])
        return info

    def snapshot(self) -> Path:
        """Write a snapshot of every segment and copy.

        It holds the collection's read lock while FAISS writes and fsyncs the files: searches continue,
        writes wait, and because the lock prefers writers, searches that arrive after a waiting write
        queue behind it until the snapshot is done.

        Raises:
            ConfigError: the service runs without a data directory.
        """
        if self.snapshot_root is None:
            raise ConfigError("snapshots need a data directory (the service runs in memory)")
        with self._snapshot_lock:
            with self.lock.read():
                self._check_live()
                parts = [(self._segment_info((v,), s), s.write) for v, s in sorted(self.segments.items())]
                parts += [(self._segment_info(k, c), c.write) for k, c in sorted(self.copies.items())]
                seq = self.applied_seq
                path = snap.write_snapshot(self.snapshot_root, self.name, seq, parts, keep=self.keep_snapshots)
                self.snapshot_seq = seq
            kept = snap.list_snapshots(self.snapshot_root, self.name)
            oldest = int(kept[0].name) if kept else seq
            self.store.compact(self.name, oldest)
        return path

    def load(self) -> None:
        """Rebuild the in-memory state: the newest good snapshot, then the store's later rows.

        Without a usable snapshot every segment is rebuilt from the store. A final check compares
        every segment's size with the store's counts and rebuilds any that disagree, so a stale or
        inconsistent index is never served.
        """
        t0 = time.perf_counter()
        for key, (scale, shift) in list(self.config.calibration.items()):
            problem = calibration_problem(float(scale), float(shift))
            if problem:  # stored before calibrations were bounded: it would serve non-finite scores
                del self.config.calibration[key]
                self._report(f"calibration of {key} dropped: {problem}")
        with self.lock.write():
            self._where.clear()
            self._meta.clear()
            for ids, versions, metas in self.store.locations(self.name):
                for i, v, m in zip(ids.tolist(), versions, metas):
                    self._where[i] = v
                    self._meta[i] = m
            counts = self.store.count(self.name)
            loaded = None
            if self.snapshot_root is not None:
                loaded = load_newest_snapshot(self.snapshot_root, self.name, self.config, mmap=self.mmap,
                                              report=self._report)
            snap_seq = None
            if loaded is not None:
                snap_seq, self.segments, self.copies = loaded
                self.snapshot_seq = snap_seq
            replayed = 0
            if snap_seq is None:
                self.segments, self.copies = {}, {}
                for v in sorted(counts):
                    self._rebuild((v,))
            else:
                for rows in self.store.iter_rows(self.name, after_seq=snap_seq, include_deleted=True):
                    replayed += len(rows.ids)
                    self._mem_remove(rows.ids, everywhere=True)
                    live = ~rows.deleted
                    by_v: dict[str, list[int]] = {}
                    for j in np.flatnonzero(live).tolist():
                        by_v.setdefault(rows.versions[j], []).append(j)
                    for v, js in by_v.items():
                        self._mem_add(v, rows.ids[js], np.stack([rows.vectors[j] for j in js]))  # type: ignore[misc]
                self._rebuild_dirty()
            for s, t in (tuple(p) for p in self.config.materialised):
                if (s, t) not in self.copies:
                    self._rebuild((s, t))
            for v in list(self.segments):
                if self.segments[v].ntotal != counts.get(v, 0):
                    self._report(f"segment {v} holds {self.segments[v].ntotal} vectors but the store has "
                                 f"{counts.get(v, 0)}: rebuilt from the store")
                    self._rebuild((v,))
            for (s, t) in list(self.copies):
                if self.copies[(s, t)].ntotal != counts.get(s, 0):
                    self._report(f"copy {s}→{t} is out of step with the store: rebuilt")
                    self._rebuild((s, t))
            for v in counts:
                if v not in self.segments:
                    self._rebuild((v,))
            self.applied_seq = self.store.last_seq()
        _logger.info("%s: loaded %d items (snapshot seq %s, %d rows replayed) in %.2fs", self.name,
                     len(self._where), snap_seq, replayed, time.perf_counter() - t0)

    # -- introspection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    def versions_of(self, ids: Any) -> list[str | None]:
        """The version whose segment holds each of ``ids`` (None where absent): what a backfill still has to do."""
        arr = as_ids(ids, max_rows=self.max_batch)
        with self.lock.read():
            return [self._where.get(i) for i in arr.tolist()]

    def get_points(self, ids: Any, *, include_vectors: bool = True,
                   include_metadata: bool = True) -> list[dict[str, Any] | None]:
        """The stored items ``ids``, in order, with None where an id is absent.

        Each item is ``{"id", "version", "metadata", "vector"}`` (``metadata`` and ``vector`` only when
        asked for): ``version`` is the version whose segment holds it, and ``vector`` its (D,) float32
        vector as stored, in that version's space (normalised for a normalised version): what a "more
        like this" search sends back as a query of ``version``.

        Raises:
            InvalidInputError: ``ids`` are not unique integers in [0, 2**63 - 1], or none are given.
            LimitExceededError: more than ``max_batch`` ids, or an answer estimated above ``max_response_bytes``
                (vectors count 16 bytes per value, as JSON numbers).
        """
        arr = as_ids(ids, max_rows=self.max_batch)
        with self.lock.read():
            self._check_live()
            where = [self._where.get(i) for i in arr.tolist()]
            raw = [self._meta.get(i) if v is not None else None for i, v in zip(arr.tolist(), where)]
            limit = self.limits.max_response_bytes
            if limit is not None:
                total = 16 + sum(HIT_JSON_BYTES + len(v) + (len(m or "null") if include_metadata else 0)
                                 + (16 * self.registry.get(v).dim if include_vectors else 0)
                                 for v, m in zip(where, raw) if v is not None)
                if total > limit:
                    raise LimitExceededError(
                        f"the answer would take about {total} bytes, above the limit max_response_bytes={limit}: "
                        "ask for fewer ids, or include_vectors=false")
            present = np.asarray([i for i, v in zip(arr.tolist(), where) if v is not None], dtype=np.int64)
            stored = self.store.get_items(self.name, present) if include_vectors and len(present) else {}
        out: list[dict[str, Any] | None] = []
        for i, v, m in zip(arr.tolist(), where, raw):
            if v is None:
                out.append(None)
                continue
            item: dict[str, Any] = {"id": i, "version": v}
            if include_metadata:
                item["metadata"] = self._decode(m)
            if include_vectors:
                item["vector"] = np.array(stored[i][1], dtype=np.float32)
            out.append(item)
        return out

    def stats(self) -> dict[str, Any]:
        """Sizes, factories, copies, calibration, sequence numbers and load problems (JSON-ready)."""
        with self.lock.read():
            return {
                "name": self.name,
                "items": len(self._where),
                "segments": {v: {"ntotal": s.ntotal, "factory": s.factory, "trained": s.trained,
                                 "dim": s.dim, "metric": s.metric, "device": s.device, "train_error": s.train_error}
                             for v, s in sorted(self.segments.items())},
                "materialised": [{"source": s, "target": t, "ntotal": c.ntotal}
                                 for (s, t), c in sorted(self.copies.items())],
                "calibration": dict(self.config.calibration),
                "config": self.config.to_dict(),
                "applied_seq": self.applied_seq,
                "snapshot_seq": self.snapshot_seq,
                "load_report": list(self.load_report),
            }
