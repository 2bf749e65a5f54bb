"""The routing layer of a collection, whatever backend holds its vectors.

Each item (a 64-bit id) lives in exactly one segment, the one of the version that embedded it. A
search from query version ``q`` picks, per segment of version ``s``, one route:

1. ``s == q``: search the segment with the query as is;
2. a forward-upgraded copy of segment ``s`` exists in ``q``'s space (``materialise``): search the copy
   with the query as is;
3. a query route ``q → s`` (identity / prefix / affine edges, composed along chains): transform the
   query, search segment ``s``;
4. otherwise there is no route: the segment is skipped when the request allows partial results, and
   the request fails with :class:`~compatembed_index.errors.NoRouteError` otherwise.

Per-segment top-k lists are merged by score after an optional per-route affine score calibration
(:mod:`~compatembed_index.merge`, :mod:`~compatembed_index.calibration`). This is ours on every
backend: :class:`RoutedCollection` holds routes, transforms, calibration, input checks and the merge,
and a backend subclass says where segments live (:class:`~compatembed_index.collection.Collection`:
FAISS segments over the SQLite store; :class:`~compatembed_index.milvus_collection.MilvusCollection`:
Milvus collections). A backend never sees a route; routing never asks which backend answers.
"""

from __future__ import annotations

import abc
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compatembed_index.batching import SearchBatcher
from compatembed_index.calibration import calibration_problem, fit_calibration, top_k_scores
from compatembed_index.errors import (
    CollectionNotFoundError,
    ConfigError,
    InvalidInputError,
    LimitExceededError,
    NoRouteError,
)
from compatembed_index.limits import Limits
from compatembed_index.merge import Searchable, SearchPlan, search_plans
from compatembed_index.registry import Route, VersionRegistry
from compatembed_index.results import SearchResult
from compatembed_index.rwlock import RWLock
from compatembed_index.segment import DEVICES
from compatembed_index.store import Catalog
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


class RoutedCollection(abc.ABC):
    """A named collection seen by its routes: segments per version, forward copies, calibration.

    Subclasses hold the vectors (:meth:`_views` gives what a search can reach, :meth:`_search_pass` runs
    one consistent search pass) and implement the writes; this class checks input, plans routes,
    merges, calibrates and batches concurrent searches.

    Args:
        name: collection name.
        config: collection settings (persisted in the catalog).
        registry: registered model versions.
        store: where the collection's config is persisted (``update_collection``).
        max_k: largest k a search may ask for.
        max_batch: largest number of vectors or ids per request.
        limits: factory, metadata, result and response limits.
        batch_searches: concurrent searches of the same query version and options run as one pass
            (:mod:`~compatembed_index.batching`); False runs each on its own.
    """

    def __init__(self, name: str, config: CollectionConfig, registry: VersionRegistry, store: Catalog, *,
                 max_k: int = 1000, max_batch: int = 100_000, limits: Limits | None = None,
                 batch_searches: bool = True) -> None:
        self.name = name
        self.config = config
        self.registry = registry
        self.store = store
        self.max_k = max_k
        self.max_batch = max_batch
        self.limits = limits or Limits()
        self.lock = RWLock()
        # concurrent searches with the same options share one pass (bounded like one request)
        self._batcher = SearchBatcher(max_rows=max(1, min(max_batch, 1024)), enabled=batch_searches)
        self.applied_seq = 0
        self.load_report: list[str] = []
        self.dropped = False  # set under the write lock by IndexService.drop_collection

    @abc.abstractmethod
    def _views(self, reachable_from: str | None = None) -> tuple[dict[str, Searchable], dict[tuple[str, str], Searchable]]:
        """What a search can reach now: segments by version, forward copies by (source, target).

        With ``reachable_from`` a backend whose counts are costly may leave out the count of segments that
        queries of that version can reach: it gives them as non-empty, and they are searched whatever
        their size. Without it every segment's emptiness is exact."""

    @abc.abstractmethod
    def _search_pass(self, version: str, q: np.ndarray, k: int, allow_partial: bool,
                     include_metadata: bool) -> _Batch:
        """One consistent pass for normalised queries ``q`` (Q, D) of ``version``: plan, search, merge,
        and the stored metadata of the hits (JSON strings) when asked."""

    @abc.abstractmethod
    def versions_of(self, ids: Any) -> list[str | None]:
        """The version whose segment holds each of ``ids`` (None where absent)."""

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
            side = self.registry.side_forward_route(source, target)
            why = (f": its forward map also reads each item's side-information vector of version "
                   f"{side.steps[0].edge.side_version}, which the index does not store") if side is not None else ""
            raise NoRouteError(f"no forward route from version {source} to version {target}{why}")
        return route

    def _prepare(self, version: str, ids: Any, vectors: Any) -> tuple[np.ndarray, np.ndarray]:
        v = self.registry.get(version)
        x = as_matrix(vectors, v.dim, what="vectors", version=version, max_rows=self.max_batch)
        x = normalize_rows(x, what="vectors") if v.normalized else check_norms(x, what="vectors")
        return as_ids(ids, len(x), max_rows=self.max_batch), x

    def _metadata(self, metadata: Any, n: int) -> list[str | None] | None:
        return as_metadata(metadata, n, max_bytes=self.limits.max_metadata_bytes,
                           max_depth=self.limits.max_metadata_depth)

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

    def _plan(self, qv: str, allow_partial: bool, *, calibrated: bool = True,
              lazy_counts: bool = False) -> tuple[list[SearchPlan], list[str]]:
        """One route per non-empty segment for queries of ``qv`` (see the module docstring); with ``lazy_counts``
        segments that ``qv`` can reach may be planned while empty (see :meth:`_views`)."""
        segments, copies = self._views(qv if lazy_counts else None)
        plans: list[SearchPlan] = []
        skipped: list[str] = []
        for v in sorted(segments):
            seg = segments[v]
            if seg.ntotal == 0:
                continue
            calib = self.config.calibration.get(f"{qv}|{v}") if calibrated else None
            c = tuple(calib) if calib else None
            if v == qv:
                plans.append(SearchPlan(seg, v, None, "direct", c))
                continue
            copy = copies.get((v, qv))
            if copy is not None:
                plans.append(SearchPlan(copy, v, None, f"copy:{v}>{qv}", c))  # type: ignore[arg-type]
                continue
            via = None
            for (s, t), cseg in sorted(copies.items(), key=lambda kv: kv[0]):
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
            return self._search_pass(version, batch, k, allow_partial, include_metadata)

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

    def _report(self, problem: str) -> None:
        _logger.error("%s: %s", self.name, problem)
        self.load_report.append(problem)

    def version_of(self, item_id: int) -> str | None:
        """The version whose segment holds ``item_id`` (None when absent)."""
        return self.versions_of([item_id])[0]
