"""Search the planned segments and merge their top-k lists by (calibrated) score.

A plan names, per segment, the index to search (the segment itself or a forward-upgraded copy), the
route that maps the queries into its space (None: as is) and the affine score calibration of that
route. Every mapped query and every score is checked finite: a non-finite value is refused, never
served or ranked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from compatembed_index.errors import InvalidInputError
from compatembed_index.registry import Route
from compatembed_index.validation import check_norms


class Searchable(Protocol):
    """What routing needs of a segment on any backend (a FAISS :class:`~compatembed_index.segment.Segment`,
    or one Milvus collection): its size, its metric, and a top-k search with higher-is-better scores."""

    @property
    def ntotal(self) -> int: ...

    @property
    def metric(self) -> str: ...

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries → (Q, k) float32 scores (−inf where no item) and (Q, k) int64 ids (−1)."""
        ...


@dataclass
class SearchPlan:
    """How one segment is searched for a query version: the index, the query route, the score map."""

    segment: Searchable
    version: str
    route: Route | None
    how: str
    calib: tuple[float, float] | None


def search_plans(plans: list[SearchPlan], q: np.ndarray, k: int, *,
                 run: Callable[[list[Callable[[], Any]]], list[Any]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search every plan with its (mapped) queries and merge: (Q, k) scores, ids and plan index per hit.

    ``run`` calls the per-segment searches and returns their results in order: one after the other by
    default (FAISS parallelises inside each search); a remote backend passes one that runs them at once.
    """
    nq = len(q)
    if not plans:
        return (np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64), np.zeros((nq, k), np.int64))
    cache: dict[int, np.ndarray] = {}
    mapped = []
    for p in plans:
        if p.route is None:
            qt = q
        else:
            qt = cache.get(id(p.route))
            if qt is None:
                qt = cache[id(p.route)] = p.route.apply(q)
                what = f"queries mapped along {p.how}"
                finite = np.isfinite(qt).all(axis=1)
                if not finite.all():
                    raise InvalidInputError(f"{what}: row {int(np.flatnonzero(~finite)[0])} is not finite")
                if p.segment.metric == "l2":
                    check_norms(qt, what=what)
        mapped.append(qt)
    calls = [partial(p.segment.search, qt, min(k, p.segment.ntotal)) for p, qt in zip(plans, mapped)]
    results = run(calls) if run is not None else [call() for call in calls]
    ds, is_, cs = [], [], []
    for n, (p, (d, i)) in enumerate(zip(plans, results)):
        if p.calib is not None:
            d = np.where(i >= 0, d * p.calib[0] + p.calib[1], -np.inf).astype(np.float32)
        if not np.isfinite(d[i >= 0]).all():
            # bounded vectors and calibrations keep every score finite; never serve one that is not
            raise InvalidInputError(
                f"segment {p.version} ({p.how}) gave scores beyond float32 range for these queries"
            )
        ds.append(d)
        is_.append(i)
        cs.append(np.full(i.shape, n, dtype=np.int64))
    if len(plans) == 1 and ds[0].shape[1] == k:
        return ds[0], is_[0], cs[0]
    d_all, i_all, c_all = np.hstack(ds), np.hstack(is_), np.hstack(cs)
    order = np.argsort(-d_all, axis=1, kind="stable")[:, :k]
    d_top = np.take_along_axis(d_all, order, 1)
    i_top = np.take_along_axis(i_all, order, 1)
    c_top = np.take_along_axis(c_all, order, 1)
    if d_top.shape[1] < k:
        pad = k - d_top.shape[1]
        d_top = np.pad(d_top, ((0, 0), (0, pad)), constant_values=-np.inf)
        i_top = np.pad(i_top, ((0, 0), (0, pad)), constant_values=-1)
        c_top = np.pad(c_top, ((0, 0), (0, pad)), constant_values=0)
    return d_top.astype(np.float32), i_top, c_top


def drop_duplicate_ids(scores: np.ndarray, ids: np.ndarray, cols: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Keep each id's best-scored hit per row (rows are sorted by score), then the first ``k``.

    A backend whose moves between segments are not atomic (Milvus: insert into the new segment, then
    delete from the old one) can return one item from two segments while a move is in flight. Returns
    the de-duplicated (Q, k) arrays, padded like :func:`search_plans`, and whether any row lost a hit
    (the caller then searches deeper, so that no item beyond the duplicates is missed).
    """
    nq = len(ids)
    d_out = np.full((nq, k), -np.inf, np.float32)
    i_out = np.full((nq, k), -1, np.int64)
    c_out = np.zeros((nq, k), np.int64)
    lost = False
    for r in range(nq):
        seen: set[int] = set()
        j = 0
        for i, d, c in zip(ids[r].tolist(), scores[r].tolist(), cols[r].tolist()):
            if i < 0 or j == k:
                break
            if i in seen:
                lost = True
                continue
            seen.add(i)
            d_out[r, j], i_out[r, j], c_out[r, j] = d, i, c
            j += 1
    return d_out, i_out, c_out, lost
