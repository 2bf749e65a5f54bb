"""A collection: one segment per model version, searched together from any query version.

Each item (a 64-bit id) lives in exactly one segment, the one of the version that embedded it. A
search from query version ``q`` picks, per segment of version ``s``, one route:

1. ``s == q``: search the segment with the query as is;
2. a forward-upgraded copy of segment ``s`` exists in ``q``'s space (see :meth:`Collection.materialise`):
   search the copy with the query as is;
3. a query route ``q → s`` (identity / prefix / affine edges, composed along chains): transform the
   query, search segment ``s``;
4. otherwise there is no route: the segment is skipped when the request allows partial results, and
   the request fails with :class:`~compatembed_index.errors.NoRouteError` otherwise.

Per-segment top-k lists are merged by score (after an optional per-route affine score calibration):
:mod:`~compatembed_index.merge`, :mod:`~compatembed_index.calibration`; concurrent searches share FAISS
calls (:mod:`~compatembed_index.batching`); loading starts from the newest good snapshot
(:mod:`~compatembed_index.recovery`) and replays the store. Mutations commit to the store first
(durable), then update the in-memory segments under the write side of a readers-writer lock, so
searches never observe a half-applied batch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index import snapshot as snap
from compatembed_index.batching import SearchBatcher
from compatembed_index.calibration import calibration_problem, fit_calibration, top_k_scores
from compatembed_index.errors import (
    CollectionNotFoundError,
    ConfigError,
    DuplicateIdError,
    InvalidInputError,
    ItemNotFoundError,
    LimitExceededError,
    NoRouteError,
)
from compatembed_index.limits import Limits
from compatembed_index.merge import SearchPlan, search_plans
from compatembed_index.recovery import load_newest_snapshot
from compatembed_index.registry import Route, VersionRegistry
from compatembed_index.results import SearchResult
from compatembed_index.rwlock import RWLock
from compatembed_index.segment import DEVICES, Segment
from compatembed_index.store import Store
from compatembed_index.validation import (
    as_ids,
    as_matrix,
    as_metadata,
    check_float,
    check_k,
    check_norms,
    check_slots,
    normalize_rows,
)

HIT_JSON_BYTES = 64
"""Upper bound of the JSON of one hit without its version name and metadata:
``{"id": <19 digits>, "score": <float>, "version": "", "metadata": }`` and a separator."""

_logger = logging.getLogger(__name__)


@dataclass
class CollectionConfig:
    """How a collection builds its segments (persisted with the collection).

    Attributes:
        factory: FAISS factory string for every segment (``Flat``, ``IVF256,Flat``, ``HNSW32``, …).
        factories: per-version overrides of ``factory``.
        search_params: FAISS ParameterSpace string applied to trained segments (``nprobe=16``).
        train_size: vectors collected before training an index that needs it (None: FAISS-guided default).
        device: ``cpu``, ``gpu`` or ``auto`` (GPU where faiss-gpu sees one, else CPU: one config for both hosts).
        materialised: forward-upgraded copies kept, as ``[source, target]`` pairs.
        calibration: ``"<query version>|<segment version>"`` → ``[scale, shift]`` applied to route scores.
    """

    factory: str = "Flat"
    factories: dict[str, str] = field(default_factory=dict)
    search_params: str = ""
    train_size: int | None = None
    device: str = "cpu"
    materialised: list[list[str]] = field(default_factory=list)
    calibration: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CollectionConfig:
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown collection option(s) {unknown} (known: {sorted(known)})")
        cfg = cls(**raw)
        if not isinstance(cfg.factory, str) or not isinstance(cfg.factories, dict):
            raise ConfigError("factory must be a string and factories a mapping of version → factory string")
        if cfg.train_size is not None and (not isinstance(cfg.train_size, int) or cfg.train_size < 1):
            raise ConfigError(f"train_size must be a positive integer, got {cfg.train_size!r}")
        if cfg.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def factory_for(self, version: str) -> str:
        """The factory string used for ``version``'s segment."""
        return self.factories.get(version, self.factory)


@dataclass
class _Batch:
    """What one (possibly micro-batched) search pass found, before it is split per request."""

    scores: np.ndarray
    ids: np.ndarray
    cols: np.ndarray  # index into names of the segment that answered
    names: list[str]
    routes: dict[str, str]
    skipped: list[str]
    metadata: list[list[str | None]] | None  # stored JSON of each hit (include_metadata only)


class Collection:
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
        self.name = name
        self.config = config
        self.registry = registry
        self.store = store
        self.snapshot_root = snapshot_root
        self.max_k = max_k
        self.max_batch = max_batch
        self.mmap = mmap
        self.keep_snapshots = keep_snapshots
        self.limits = limits or Limits()
        self.lock = RWLock()
        # concurrent searches with the same options share one FAISS call (bounded like one request)
        self._batcher = SearchBatcher(max_rows=max(1, min(max_batch, 1024)), enabled=batch_searches)
        self.segments: dict[str, Segment] = {}
        self.copies: dict[tuple[str, str], Segment] = {}
        self._where: dict[int, str] = {}
        self._meta: dict[int, str | None] = {}
        self.applied_seq = 0
        self.snapshot_seq: int | None = None
        self.load_report: list[str] = []
        self._dirty: set[tuple[str, ...]] = set()
        self.dropped = False  # set under the write lock by IndexService.drop_collection
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

    def _check_space(self, y: np.ndarray, space: str, what: str) -> None:
        """Vectors that arrive in ``space`` (through a route) must be finite, and within
        :data:`~compatembed_index.validation.MAX_L2_NORM` in an unnormalised space."""
        finite = np.isfinite(y).all(axis=1)
        if not finite.all():
            raise InvalidInputError(f"{what} row {int(np.flatnonzero(~finite)[0])} is not finite after the transform")
        if not self.registry.get(space).normalized:
            check_norms(y, what=what)

    def _forward_copies(self, version: str, x: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """``x`` mapped into the space of each materialised copy of segment ``version``, checked there."""
        out = {}
        for (s, t) in self.copies:
            if s == version:
                y = out[(s, t)] = self._forward(s, t).apply(x)
                self._check_space(y, t, f"vectors forwarded from {s} into {t}")
        return out

    def _check_live(self) -> None:
        """Refuse work on a collection dropped meanwhile (caller holds the lock)."""
        if self.dropped:
            raise CollectionNotFoundError(f"collection {self.name!r} was dropped")

    def _forward(self, source: str, target: str) -> Route:
        route = self.registry.forward_route(source, target)
        if route is None:
            raise NoRouteError(f"no forward route from version {source} to version {target}")
        return route

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
    def _prepare(self, version: str, ids: Any, vectors: Any) -> tuple[np.ndarray, np.ndarray]:
        v = self.registry.get(version)
        x = as_matrix(vectors, v.dim, what="vectors", version=version, max_rows=self.max_batch)
        x = normalize_rows(x, what="vectors") if v.normalized else check_norms(x, what="vectors")
        return as_ids(ids, len(x), max_rows=self.max_batch), x

    def _metadata(self, metadata: Any, n: int) -> list[str | None] | None:
        return as_metadata(metadata, n, max_bytes=self.limits.max_metadata_bytes,
                           max_depth=self.limits.max_metadata_depth)

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

    def _calibrated_routes(self) -> dict[str, str | None]:
        """How each calibrated ``query|segment`` pair is searched right now (None: not searched)."""
        hows: dict[str, str | None] = {}
        for key in self.config.calibration:
            qv, sv = key.split("|", 1)
            plans, _ = self._plan(qv, allow_partial=True, calibrated=False) if qv in self.registry else ([], [])
            hows[key] = next((p.how for p in plans if p.version == sv), None)
        return hows

    def _drop_stale_calibration(self, before: dict[str, str | None]) -> None:
        """A calibration was fitted on one route's scores; once the pair is searched another way it no longer applies."""
        after = self._calibrated_routes()
        for key, how in before.items():
            if after.get(key) != how:
                del self.config.calibration[key]
                _logger.info("%s: calibration of %s dropped: its route changed from %s to %s (calibrate it again)",
                             self.name, key, how, after.get(key))

    # -- search ---------------------------------------------------------------------------------
    def _plan(self, qv: str, allow_partial: bool, *, calibrated: bool = True) -> tuple[list[SearchPlan], list[str]]:
        plans: list[SearchPlan] = []
        skipped: list[str] = []
        for v in sorted(self.segments):
            seg = self.segments[v]
            if seg.ntotal == 0:
                continue
            calib = self.config.calibration.get(f"{qv}|{v}") if calibrated else None
            c = tuple(calib) if calib else None
            if v == qv:
                plans.append(SearchPlan(seg, v, None, "direct", c))
                continue
            copy = self.copies.get((v, qv))
            if copy is not None:
                plans.append(SearchPlan(copy, v, None, f"copy:{v}>{qv}", c))  # type: ignore[arg-type]
                continue
            via = None
            for (s, t), cseg in sorted(self.copies.items()):
                if s == v and (r := self.registry.query_route(qv, t)) is not None:
                    via = SearchPlan(cseg, v, r, f"copy:{v}>{t}+query:{'>'.join(r.path)}", c)  # type: ignore[arg-type]
                    break
            if via is not None:
                plans.append(via)
                continue
            route = self.registry.query_route(qv, v)
            if route is not None:
                plans.append(SearchPlan(seg, v, route, "query:" + ">".join(route.path), c))  # type: ignore[arg-type]
            elif allow_partial:
                skipped.append(v)
            else:
                raise NoRouteError(
                    f"no route from version {qv} to segment {v} of collection {self.name!r} "
                    "(register a compatibility edge, materialise a forward copy, or pass allow_partial)"
                )
        return plans, skipped

    def search(
        self,
        version: str,
        queries: Any,
        k: int = 10,
        *,
        allow_partial: bool = False,
        include_metadata: bool = True,
    ) -> SearchResult:
        """Search every segment reachable from ``version`` and merge the top-k by score.

        Args:
            version: model version of the queries.
            queries: (Q, D) float32 queries of that version.
            k: results per query.
            allow_partial: skip segments with no route instead of failing.
            include_metadata: attach each item's metadata.

        Raises:
            NoRouteError: a non-empty segment has no route from ``version`` and ``allow_partial`` is false.
            LimitExceededError: ``queries × k`` above ``max_result_slots``, or a response (hits with their
                metadata) estimated above ``max_response_bytes``.
        """
        v = self.registry.get(version)
        k = check_k(k, self.max_k)
        q = as_matrix(queries, v.dim, what="queries", version=version, max_rows=self.max_batch)
        check_slots(len(q), k, self.limits.max_result_slots)
        q = normalize_rows(q, what="queries") if v.normalized else check_norms(q, what="queries")
        def run(batch: np.ndarray) -> _Batch:
            # one locked pass: the plan, FAISS, and the stored metadata of the hits, so a write cannot
            # slip between the search and what it returns
            with self.lock.read():
                plans, skipped = self._plan(version, allow_partial)
                scores, ids, cols = search_plans(plans, batch, k)
                raw = None
                if include_metadata:
                    raw = [[self._meta.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]
            return _Batch(scores, ids, cols, [p.version for p in plans], {p.version: p.how for p in plans},
                          skipped, raw)

        slots = self.limits.max_result_slots
        out, rows = self._batcher.run((version, k, allow_partial, include_metadata), q, run,
                                      max_rows=None if slots is None else max(1, slots // k))
        # copies: a caller that edits its result must not edit those of the requests it was batched with
        ids, scores, cols = out.ids[rows].copy(), out.scores[rows].copy(), out.cols[rows]
        raw = None if out.metadata is None else out.metadata[rows]
        versions = [[out.names[c] if i >= 0 else None for i, c in zip(ri, rc)]
                    for ri, rc in zip(ids.tolist(), cols.tolist())]
        if self.limits.max_response_bytes is not None:
            self._check_response_size(ids, versions, raw)
        meta = None if raw is None else [[self._decode(m) for m in row] for row in raw]
        return SearchResult(ids, scores, versions, meta, dict(out.routes), list(out.skipped))

    def _check_response_size(self, ids: np.ndarray, versions: list[list[str | None]],
                             metadata: list[list[str | None]] | None) -> None:
        """Refuse a result whose JSON would exceed ``max_response_bytes`` (an upper estimate, before decoding)."""
        limit = self.limits.max_response_bytes
        assert limit is not None
        total = 16 * len(ids)
        for r, (row_ids, row_v) in enumerate(zip(ids.tolist(), versions)):
            for j, (i, v) in enumerate(zip(row_ids, row_v)):
                if i < 0:
                    break
                m = metadata[r][j] if metadata is not None else None
                total += HIT_JSON_BYTES + len(v or "") + (len(m) if m is not None else 4)
            if total > limit:
                raise LimitExceededError(
                    f"the response would take more than {limit} bytes, above the limit max_response_bytes={limit}: "
                    "ask for fewer queries, a smaller k, or include_metadata=false"
                )

    @staticmethod
    def _decode(m: str | None) -> Any:
        return None if m is None else json.loads(m)

    # -- calibration ---------------------------------------------------------------------------
    def set_calibration(self, query_version: str, segment_version: str, scale: float, shift: float) -> None:
        """Map scores of the route ``query_version → segment_version`` to ``scale * score + shift``.

        Raises:
            InvalidInputError: the versions are the same, or ``scale`` is not in (0, 1e6] or ``shift`` not in
                [-1e30, 1e30]: beyond them a calibrated score could leave float32's range.
        """
        self.registry.get(query_version), self.registry.get(segment_version)
        if query_version == segment_version:
            raise InvalidInputError("a calibration maps a cross-version route; same-version scores are the reference")
        scale, shift = check_float(scale, "scale"), check_float(shift, "shift")
        problem = calibration_problem(scale, shift)
        if problem:
            raise InvalidInputError(problem)
        with self.lock.write():
            self._check_live()
            self.config.calibration[f"{query_version}|{segment_version}"] = [scale, shift]
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())

    def clear_calibration(self) -> None:
        """Remove every score calibration."""
        with self.lock.write():
            self._check_live()
            self.config.calibration = {}
            self.applied_seq = self.store.update_collection(self.name, self.config.to_dict())

    def calibrate(self, query_version: str, segment_version: str, queries: Any, k: int = 10,
                  *, query_ids: Any = None) -> tuple[float, float]:
        """Fit the score map of one cross-version route by moment matching on held-out queries.

        The top-k scores that held-out queries (Q, D) of ``query_version`` get from segment
        ``segment_version`` through its route are mapped affinely so that their mean and standard
        deviation equal those of the same queries' top-k scores in their own version's segment. Routes
        through a transform typically score lower than same-version matches; without this, merging by
        raw score would under-rank the older segment.

        Args:
            query_version: version of the held-out queries.
            segment_version: the segment whose route is calibrated.
            queries: (Q, D) held-out queries of ``query_version``.
            k: how many top scores per query enter the moments.
            query_ids: (Q,) ids of the queries when they are items of this collection (e.g. a sample of
                the stored items): each query's match with its own item is left out, which would
                otherwise put a score of 1 into the reference moments.

        Returns:
            (scale, shift), also stored in the collection config.

        Raises:
            InvalidInputError: the query version's own segment is empty, the two versions are the same,
                or ``query_ids`` does not give one unique id per query.
        """
        if query_version == segment_version:
            raise InvalidInputError("calibration maps a cross-version route; the versions must differ")
        v = self.registry.get(query_version)
        self.registry.get(segment_version)
        k = check_k(k, self.max_k)
        q = as_matrix(queries, v.dim, what="queries", version=query_version, max_rows=self.max_batch)
        extra = 0 if query_ids is None else 1
        check_slots(len(q), k + extra, self.limits.max_result_slots)
        q = normalize_rows(q, what="queries") if v.normalized else check_norms(q, what="queries")
        own = None
        if query_ids is not None:
            own = as_ids(query_ids, len(q))
        with self.lock.read():
            plans, _ = self._plan(query_version, allow_partial=True, calibrated=False)
            by_v = {p.version: p for p in plans}
            if query_version not in by_v:
                raise InvalidInputError(
                    f"cannot calibrate: segment {query_version} of {self.name!r} is empty (it is the reference)"
                )
            if segment_version not in by_v:
                raise NoRouteError(f"no route from version {query_version} to segment {segment_version}")
            ref = top_k_scores(search_plans([by_v[query_version]], q, k + extra), own, k)
            got = top_k_scores(search_plans([by_v[segment_version]], q, k + extra), own, k)
        scale, shift = fit_calibration(ref, got, f"{query_version}|{segment_version}")
        self.set_calibration(query_version, segment_version, scale, shift)
        return scale, shift

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

    def _report(self, problem: str) -> None:
        _logger.error("%s: %s", self.name, problem)
        self.load_report.append(problem)

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

    def version_of(self, item_id: int) -> str | None:
        """The version whose segment holds ``item_id`` (None when absent)."""
        return self.versions_of([item_id])[0]

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
