"""Retrieval metrics of a mixed-version gallery, measured through the index service's own search path.

After a partial backfill a gallery holds items embedded by several model versions. What users get is
what :class:`compatembed_index.api.IndexService` returns: one segment per version, each searched along its
compatibility route (or a materialised forward copy), the per-segment top-k merged by score. So the
report loads the gallery into an in-process service (its data directory in a temporary folder), asks it
for the FULL ranking (``k`` = gallery size, ``max_k`` raised to match) and scores that ranking with the
same arithmetic as :func:`compatembed.eval.retrieval_metrics` (tie rules included).

A segment the query version has no route to is skipped by the service (``allow_partial``); its items
never come back, and they are scored as ranked last, all tied, which is what a user of that search gets.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from compatembed.errors import EvalError
from compatembed.eval.retrieval import check_topk, metrics_from_ranking

if TYPE_CHECKING:  # torch-free at import: EmbeddingSet lives next to the torch embedding code
    from compatembed.embeddings import EmbeddingSet

_logger = logging.getLogger(__name__)

COLLECTION = "gallery"


@contextlib.contextmanager
def service_errors() -> Iterator[None]:
    """Re-raise the index service's typed errors (no route, unknown version...) as one-line EvalErrors."""
    from compatembed_index.errors import IndexServiceError

    try:
        yield
    except IndexServiceError as exc:
        raise EvalError(f"index service: {type(exc).__name__}: {exc}") from exc


def split_gallery(ids: np.ndarray, fractions: Sequence[float], *, seed: int = 0) -> np.ndarray:
    """Assign each gallery item to one of the versions, in the given fractions, at random.

    Counts are rounded by largest remainder, so they sum to the gallery size exactly.

    Args:
        ids: (G,) item ids.
        fractions: one non-negative fraction per version, summing to 1.
        seed: seed of the random assignment.

    Returns:
        (G,) int64 index into ``fractions`` for each item.

    Raises:
        EvalError: a negative fraction or fractions that do not sum to 1.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or (f < 0).any() or not np.isfinite(f).all():
        raise EvalError(f"gallery fractions must be non-negative numbers, got {list(fractions)}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise EvalError(f"gallery fractions must sum to 1, got {list(fractions)} (sum {f.sum():.4f})")
    n = len(ids)
    raw = f * n
    counts = np.floor(raw).astype(np.int64)
    remainder = n - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:remainder]] += 1
    owner = np.repeat(np.arange(len(f), dtype=np.int64), counts)
    rng = np.random.default_rng(seed)
    return owner[rng.permutation(n)]


class MixedGallery:
    """One labelled split loaded into an in-process index service, item by item from any version.

    Args:
        version_dirs: model version directories of every version whose vectors may be stored or queried
            (ancestors are registered too, so chained routes compose).
        sets: version id → embeddings of the same split by that version (same item ids in each).
        data_dir: the service's data directory; None makes a temporary one, removed by :meth:`close`.
        topk: CMC cut-offs.
        leave_one_out: each query's own item is left out of its ranking (query set = gallery set).
        batch_size: queries searched at once (memory grows as ``batch_size * G``).
        allow_partial: skip segments without a route (scored as ranked last) instead of failing.
        max_queries: query with a seeded random subset of this many items (the gallery stays whole);
            None queries with every item. Each query costs a full ranking of the gallery.
        seed: seed of that subset.

    Example:
        >>> with MixedGallery(dirs, {"v1": e1, "v2": e2}) as g:            # doctest: +SKIP
        ...     g.load({"v1": ids[:50], "v2": ids[50:]})
        ...     g.evaluate("v2")["mAP"]
    """

    def __init__(
        self,
        version_dirs: Sequence[str | Path],
        sets: Mapping[str, EmbeddingSet],
        *,
        data_dir: str | Path | None = None,
        topk: tuple[int, ...] = (1, 5),
        leave_one_out: bool = True,
        batch_size: int = 256,
        allow_partial: bool = True,
        max_queries: int | None = None,
        seed: int = 0,
    ) -> None:
        from compatembed_index.api import IndexService

        from compatembed.models.version import ancestor_dirs  # needs torch: imported on use, not with this package

        if not sets:
            raise EvalError("a mixed gallery needs the embeddings of at least one version")
        first = next(iter(sets.values()))
        order = np.argsort(first.ids, kind="stable")
        self.ids = np.asarray(first.ids, dtype=np.int64)[order]
        if len(self.ids) and self.ids[0] < 0:
            raise EvalError("the index service needs non-negative item ids")
        self.labels = np.asarray(first.labels)[order]
        self._vectors: dict[str, np.ndarray] = {}
        for vid, s in sets.items():
            o = np.argsort(s.ids, kind="stable")
            if not np.array_equal(np.asarray(s.ids, dtype=np.int64)[o], self.ids):
                raise EvalError(f"embeddings of version {vid!r} hold other items than those of the first version")
            if not np.array_equal(np.asarray(s.labels)[o], self.labels):
                raise EvalError(f"embeddings of version {vid!r} label the items differently")
            self._vectors[vid] = np.ascontiguousarray(s.embeddings[o], dtype=np.float32)
        self.topk = check_topk(topk)
        n_items = len(self.ids)
        if max_queries is not None and int(max_queries) <= 0:
            raise EvalError(f"max_queries must be a positive integer or None, got {max_queries!r}")
        if max_queries is None or int(max_queries) >= n_items:
            self.query_rows = np.arange(n_items)
        else:
            self.query_rows = np.sort(np.random.default_rng(seed).choice(n_items, size=int(max_queries), replace=False))
        self.leave_one_out, self.batch_size, self.allow_partial = leave_one_out, int(batch_size), allow_partial
        self._tmp = tempfile.TemporaryDirectory(prefix="compatembed-mixed-") if data_dir is None else None
        root = Path(self._tmp.name) if self._tmp is not None else Path(data_dir)  # type: ignore[arg-type]
        n = len(self.ids)
        self.service = IndexService(root, max_k=max(n, 1), max_batch=max(n, self.batch_size, 1))
        self._loaded = False
        try:
            with service_errors():
                for directory in ancestor_dirs(version_dirs):
                    self.service.register_version(directory)
            missing = [vid for vid in self._vectors if vid not in self.service.registry]
            if missing:
                raise EvalError(f"no model version directory given for version(s) {missing} (embeddings without a manifest)")
        except BaseException:
            self.close()
            raise

    # -- gallery state --------------------------------------------------------------------------------
    def vectors(self, version: str, ids: np.ndarray | None = None) -> np.ndarray:
        """(N, D) vectors of ``version`` for ``ids`` (all items, in id order, when None)."""
        if version not in self._vectors:
            raise EvalError(f"no embeddings of version {version!r} (have: {sorted(self._vectors)})")
        if ids is None:
            return self._vectors[version]
        return self._vectors[version][np.searchsorted(self.ids, np.asarray(ids, dtype=np.int64))]

    def load(self, assignment: Mapping[str, np.ndarray]) -> None:
        """(Re)create the collection with each version's items stored as that version's vectors.

        Args:
            assignment: version id → (N_v,) item ids; together they must cover every item exactly once.
        """
        given = np.zeros(0, np.int64)
        if assignment:
            given = np.concatenate([np.asarray(v, dtype=np.int64) for v in assignment.values()])
        if len(given) != len(self.ids) or not np.array_equal(np.sort(given), self.ids):
            raise EvalError("the assignment must place every gallery item in exactly one version")
        with service_errors():
            if self._loaded:
                self.service.drop_collection(COLLECTION)
            self.service.create_collection(COLLECTION, factory="Flat")
            self._loaded = True
            for vid, ids in assignment.items():
                ids = np.asarray(ids, dtype=np.int64)
                if len(ids):
                    self.service.add(COLLECTION, vid, ids, self.vectors(vid, ids))

    def upgrade(self, version: str, ids: np.ndarray) -> None:
        """Re-embed ``ids`` with ``version``: the service moves them to that version's segment."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            with service_errors():
                self.service.upgrade(COLLECTION, version, ids, self.vectors(version, ids))

    def stored_versions(self) -> np.ndarray:
        """(N,) the version whose segment holds each item, in id order, as the index service reports it."""
        if not self._loaded:
            raise EvalError("the gallery is not loaded yet (call load first)")
        with service_errors():
            return np.asarray(self.service.versions_of(COLLECTION, self.ids), dtype=object)

    def calibrate(self, version: str, *, max_items: int = 1000, k: int = 10, min_items: int = 10) -> dict[str, list[float]]:
        """Fit the score calibration of every cross-version route of ``version``'s queries, as a deployment can.

        The held-out queries are items stored in ``version``'s own segment (their stored vectors, their own
        match left out) that are not among the evaluation queries, at most ``max_items`` of them, seeded.
        Each other non-empty segment with a route gets ``IndexService.calibrate``'s moment matching.

        Returns:
            ``"query|segment"`` → [scale, shift] of every route fitted; empty when ``version``'s segment holds
            fewer than ``min_items`` such items (nothing to fit from: the merge stays uncalibrated).
        """
        with service_errors():
            self.service.collection(COLLECTION).clear_calibration()
        evaluated = np.zeros(len(self.ids), bool)
        evaluated[self.query_rows] = True
        rows = np.flatnonzero((self.stored_versions() == version) & ~evaluated)
        if len(rows) < min_items:
            _logger.info("calibration of %s skipped: %d held-out items in its segment (< %d)", version, len(rows), min_items)
            return {}
        if len(rows) > max_items:
            rows = np.sort(np.random.default_rng(0).choice(rows, size=max_items, replace=False))
        from compatembed_index.errors import NoRouteError

        fitted: dict[str, list[float]] = {}
        for segment, count in self.composition().items():
            if segment == version or count == 0:
                continue
            with service_errors():
                try:
                    scale, shift = self.service.calibrate(COLLECTION, version, segment, self.vectors(version)[rows], k,
                                                          query_ids=self.ids[rows])
                except NoRouteError:
                    continue  # the search skips this segment: nothing to calibrate
            fitted[f"{version}|{segment}"] = [scale, shift]
        return fitted

    def materialise(self, source: str, target: str) -> dict[str, Any]:
        """Forward-upgrade the stored ``source`` vectors into ``target``'s space (no images needed)."""
        with service_errors():
            return self.service.materialise(COLLECTION, source, target)

    def composition(self) -> dict[str, int]:
        """Items per version segment right now."""
        segments = self.service.stats(COLLECTION)["segments"]
        return {str(v): int(info["ntotal"]) for v, info in segments.items() if int(info["ntotal"]) > 0}

    # -- evaluation -----------------------------------------------------------------------------------
    def search_ranking(self, version: str, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, str], list[str]]:
        """The service's full ranking of ``queries`` (Q, D) of ``version``: (scores, ids) both (Q, G).

        Returns:
            scores (Q, G) float32 (−inf past the items found), ids (Q, G) int64 (−1 past the items found),
            the route that served each segment, and the segments skipped for lack of a route.
        """
        n = len(self.ids)
        scores, ids = [], []
        routes: dict[str, str] = {}
        skipped: list[str] = []
        for lo in range(0, len(queries), self.batch_size):
            with service_errors():
                res = self.service.search(COLLECTION, version, queries[lo:lo + self.batch_size], k=n,
                                          allow_partial=self.allow_partial, include_metadata=False)
            scores.append(res.scores)
            ids.append(res.ids)
            routes.update(res.routes)
            skipped = sorted(set(skipped) | set(res.skipped))
        return np.concatenate(scores), np.concatenate(ids), routes, skipped

    def evaluate(self, version: str, query: EmbeddingSet | None = None) -> dict[str, Any]:
        """Metrics of ``version``'s queries against the gallery as it is stored now.

        Args:
            version: the query model version.
            query: its query embeddings (default: this split embedded by ``version``: every item, or the
                ``max_queries`` subset).

        Returns:
            ``top{k}``, ``mAP``, ``mAP@R``, ``R_precision`` (fractions averaged over queries with a relevant
            item, as :func:`~compatembed.eval.retrieval_metrics`), ``num_queries``,
            ``num_queries_without_relevant``, ``routes`` (segment → how it was searched), ``skipped``.
        """
        if query is None:
            rows = self.query_rows
            q_vec, q_lab, q_ids = self.vectors(version)[rows], self.labels[rows], self.ids[rows]
        else:
            q_vec = np.ascontiguousarray(query.embeddings, dtype=np.float32)
            q_lab, q_ids = np.asarray(query.labels), np.asarray(query.ids, dtype=np.int64)
        scores, ids, routes, skipped = self.search_ranking(version, q_vec)
        per_query = ranking_metrics(scores, ids, q_lab, q_ids, self.ids, self.labels,
                                    topk=self.topk, leave_one_out=self.leave_one_out)
        valid = per_query.pop("num_relevant") > 0
        if not valid.any():
            raise EvalError("no query has a relevant gallery item; retrieval metrics are undefined")
        result: dict[str, Any] = {key: float(values[valid].mean()) for key, values in per_query.items()}
        result["num_queries"] = int(valid.size)
        result["num_queries_without_relevant"] = int((~valid).sum())
        result["routes"] = routes
        result["skipped"] = skipped
        return result

    def close(self) -> None:
        """Release the service (and remove its temporary data directory)."""
        if self.service is not None:
            self.service.close()
            self.service = None  # type: ignore[assignment]
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MixedGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ranking_metrics(
    scores: np.ndarray,
    ids: np.ndarray,
    query_labels: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    topk: tuple[int, ...] = (1, 5),
    leave_one_out: bool = True,
) -> dict[str, np.ndarray]:
    """Per-query metrics of rankings returned by a search, with unreturned items ranked last (tied).

    Args:
        scores: (Q, K) scores, non-increasing along each row; −inf where no item was returned.
        ids: (Q, K) item ids, −1 where no item was returned.
        query_labels: (Q,) labels of the queries.
        query_ids: (Q,) item ids of the queries (their own item is dropped under ``leave_one_out``).
        gallery_ids: (G,) sorted ids of every gallery item.
        gallery_labels: (G,) their labels.
        topk: CMC cut-offs.
        leave_one_out: drop each query's own item from its ranking.

    Returns:
        As :func:`compatembed.eval.per_query_metrics`: ``top{k}``, ``mAP``, ``mAP@R``, ``R_precision`` (Q,)
        with NaN where a query has no relevant item, and ``num_relevant`` (Q,).
    """
    q, k = ids.shape
    g = len(gallery_ids)
    if k > g:
        raise EvalError(f"rankings have {k} columns for a gallery of {g} items")
    found = ids >= 0
    pos = np.searchsorted(gallery_ids, np.where(found, ids, gallery_ids[0]))
    pos = np.clip(pos, 0, g - 1)
    if not np.array_equal(gallery_ids[pos][found], ids[found]):
        raise EvalError("the search returned ids that are not gallery items")
    q_lab = np.asarray(query_labels)
    _, codes = np.unique(np.concatenate([q_lab, np.asarray(gallery_labels)]), return_inverse=True)
    codes = codes.reshape(-1)
    q_codes, g_codes = codes[:q], codes[q:]
    relevant = found & (g_codes[pos] == q_codes[:, None])
    own = found & (ids == np.asarray(query_ids, dtype=np.int64)[:, None]) if leave_one_out else np.zeros_like(found)
    # Items the search did not return (no route, or k < G) go to the end as one tied block at −inf.
    pad = g - k
    scores = np.concatenate([np.where(found, scores, -np.inf), np.full((q, pad), -np.inf, np.float32)], axis=1)
    total_rel = np.bincount(g_codes, minlength=codes.max() + 1)[q_codes]
    self_in_gallery = np.isin(np.asarray(query_ids, dtype=np.int64), gallery_ids) if leave_one_out else np.zeros(q, bool)
    missing_rel = total_rel - relevant.sum(axis=1) - (self_in_gallery & ~own.any(axis=1))
    missing_self = self_in_gallery & ~own.any(axis=1)
    n_missing = g - found.sum(axis=1)
    # Fill the missing block of each row: its relevant items first, then its own item (dropped), then the rest.
    col = np.arange(g)[None, :]
    start = found.sum(axis=1)[:, None]  # found items come first in every row
    relevant_full = np.concatenate([relevant, np.zeros((q, pad), bool)], axis=1)
    own_full = np.concatenate([own, np.zeros((q, pad), bool)], axis=1)
    if not np.all(found == (np.arange(k)[None, :] < found.sum(axis=1)[:, None])):
        raise EvalError("search results must list found items before the padding")
    in_missing = col >= start
    relevant_full = np.where(in_missing, col < start + missing_rel[:, None], relevant_full)
    own_full = np.where(in_missing, (col == start + missing_rel[:, None]) & missing_self[:, None], own_full)
    if (missing_rel + missing_self > n_missing).any():
        raise EvalError("inconsistent search results: more missing relevant items than missing slots")
    drop = own_full if leave_one_out else None
    return metrics_from_ranking(scores.astype(np.float32), relevant_full, list(check_topk(topk)), drop=drop)
