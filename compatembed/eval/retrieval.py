"""Retrieval metrics: CMC top-k, mAP over the full ranking, mAP@R and R-precision.

This is the one place where a query set is ranked against a gallery. The eval CLI, the validation after
training (``validation.enabled``) and the reports all call :func:`retrieval_metrics` (through
:func:`compatembed.eval.pairs.evaluate_pair`), so a number in a report and a validation number are the same
computation.

Protocol (``methods.md``, "Evaluation protocol"): cosine similarity after truncating both sides to
``min(d_q, d_g)`` dims and L2-renormalising; an item is relevant to a query when it has the query's label.
Nearest neighbours come from FAISS exact inner-product search over the whole gallery (or, with
``backend="numpy"``, from one matmul and an argsort), one batch of queries at a time, so memory stays at
``batch_size * G`` whatever the number of queries.

Ties (equal float32 scores as returned by the search, compared exactly; two backends may round a score
differently, so their results can differ in the last digits when scores are within float32 precision):

* ``mAP`` follows scikit-learn's ``average_precision_score``: precision is evaluated once per distinct
  score, at the end of each block of tied items, so a block counts as one step.
* ``top{k}``, ``mAP@R`` and ``R_precision`` use the pessimistic order: inside a block of tied scores the
  irrelevant items rank before the relevant ones. A collapsed model (all scores equal) therefore scores
  what it deserves, not what the gallery's storage order happens to give it.

Both rules depend only on the multiset of (score, relevance) pairs of a query, so every metric is invariant
to the order of tied items and to any permutation of the gallery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from compatembed.errors import EvalError

_logger = logging.getLogger(__name__)

_RANK_METRICS = ("mAP", "mAP@R", "R_precision")
_COUNTS = ("num_queries", "num_queries_without_relevant")


def list_metrics(topk: Iterable[int] = (1, 5)) -> tuple[str, ...]:
    """Names of the keys :func:`retrieval_metrics` returns for these ``topk`` (useful for ``include``).

    Example:
        >>> list_metrics((1, 5))
        ('top1', 'top5', 'mAP', 'mAP@R', 'R_precision', 'num_queries', 'num_queries_without_relevant')
    """
    return tuple(f"top{k}" for k in check_topk(topk)) + _RANK_METRICS + _COUNTS


@dataclass(frozen=True)
class RetrievalOptions:
    """How a query set is ranked against a gallery: the options every entry point of this module shares.

    :func:`per_query_metrics` and :func:`retrieval_metrics` take them as keywords, :class:`RetrievalEvaluator`
    holds them as fields; either way they are checked here, once, before anything is ranked.

    Attributes:
        topk: the k of each CMC ``top{k}`` key.
        leave_one_out: the query set is the gallery set (the standard protocol): each query's own item is
            removed from its ranking, matched by id when both id arrays are given, else by position (Q == G).
        batch_size: queries ranked at once; memory grows as ``batch_size * G``.
        allow_label_mismatch: accept query and gallery label sets that differ (normally a sign of mixed splits).
        backend: how each batch is ranked: ``"faiss"`` (exact ``IndexFlatIP`` search over the whole gallery,
            the default), ``"numpy"`` (one matmul and an argsort; the same ranking up to the order of
            ties, which no metric depends on, and faster on a few CPU cores for galleries of ~10k) or
            ``"torch"`` (matmul and sort on the GPU when there is one).

    Raises:
        EvalError: k <= 0, a batch size that is not a positive integer, or an unknown backend.
    """

    topk: tuple[int, ...] = (1, 5)
    leave_one_out: bool = False
    batch_size: int = 1024
    allow_label_mismatch: bool = False
    backend: str = "faiss"

    def __post_init__(self) -> None:
        # Lists (as a config gives them) become tuples: the frozen instance stays hashable and comparable.
        object.__setattr__(self, "topk", check_topk(self.topk))
        if self.backend not in _BACKENDS:
            raise EvalError(f"unknown ranking backend {self.backend!r}; known: {sorted(_BACKENDS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) or self.batch_size <= 0:
            raise EvalError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def per_query(
        self, query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, *,
        query_ids: np.ndarray | None = None, gallery_ids: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-query metrics of queries (Q, D_q) against a gallery (G, D_g); see :func:`per_query_metrics`."""
        q = _check_embeddings(query, "query")
        g = _check_embeddings(gallery, "gallery")
        ql = _check_vector(query_labels, "query_labels", len(q))
        gl = _check_vector(gallery_labels, "gallery_labels", len(g))
        qid = None if query_ids is None else _check_ids(query_ids, "query_ids", len(q))
        gid = None if gallery_ids is None else _check_ids(gallery_ids, "gallery_ids", len(g))
        if not self.allow_label_mismatch:
            _check_label_sets(ql, gl)
        q_codes, g_codes = _encode_labels(ql, gl)
        self_index = _self_index(len(q), len(g), qid, gid) if self.leave_one_out else None

        d = min(q.shape[1], g.shape[1])
        if q.shape[1] != g.shape[1]:
            _logger.debug("query dim %d, gallery dim %d: truncating both to %d", q.shape[1], g.shape[1], d)
        qn = _truncate_normalise(q, d, "query")
        gn = _truncate_normalise(g, d, "gallery")

        rank = _BACKENDS[self.backend](gn)
        n_q, n_g = len(qn), len(gn)
        out = {f"top{k}": np.empty(n_q) for k in self.topk}
        out.update({name: np.empty(n_q) for name in _RANK_METRICS})
        out["num_relevant"] = np.empty(n_q, dtype=np.int64)
        start_time = time.perf_counter()
        for lo in range(0, n_q, self.batch_size):
            hi = min(lo + self.batch_size, n_q)
            scores, idx = rank(qn[lo:hi])
            relevant = g_codes[idx] == q_codes[lo:hi, None]
            own = None if self_index is None else idx == self_index[lo:hi, None]
            batch = metrics_from_ranking(scores, relevant, self.topk, drop=own)
            for key, values in batch.items():
                out[key][lo:hi] = values
        _logger.debug("ranked %d queries against %d gallery items in %.2fs", n_q, n_g, time.perf_counter() - start_time)
        return out


def per_query_metrics(
    query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, *,
    query_ids: np.ndarray | None = None, gallery_ids: np.ndarray | None = None, **options: Any,
) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics, for averaging, bootstrapping or finding the queries that fail.

    Takes the same arguments as :func:`retrieval_metrics`.

    Returns:
        ``{"top{k}": (Q,), "mAP": (Q,), "mAP@R": (Q,), "R_precision": (Q,)}`` as float64 (the AP of query q
        is stored under ``"mAP"``; hits are 0.0/1.0) plus ``"num_relevant"``: (Q,) int64, the number of
        relevant gallery items of each query after leave-one-out. Queries without a relevant item hold NaN.

    Raises:
        EvalError: invalid inputs (see :func:`retrieval_metrics`).
    """
    ranking = RetrievalOptions(**options)
    return ranking.per_query(query, query_labels, gallery, gallery_labels, query_ids=query_ids, gallery_ids=gallery_ids)


def retrieval_metrics(
    query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, *,
    query_ids: np.ndarray | None = None, gallery_ids: np.ndarray | None = None, **options: Any,
) -> dict[str, float]:
    """Rank every query against the whole gallery and average the retrieval metrics over queries.

    M(φ_q, φ_g) in the notation of the compatibility literature: pass the queries embedded by φ_q and the
    gallery embedded by φ_g. Queries with no relevant item in the gallery (after leave-one-out) have no
    defined AP or hit, so they are excluded from EVERY average and counted in
    ``num_queries_without_relevant``; all averages are over the remaining
    ``num_queries - num_queries_without_relevant`` queries. Tie handling is described in the module docstring.

    Args:
        query: (Q, D_q) query embeddings (any scale; they are truncated and L2-normalised here).
        query_labels: (Q,) class label of each query (ints or strings).
        gallery: (G, D_g) gallery embeddings.
        gallery_labels: (G,) class label of each gallery item.
        query_ids: (Q,) unique item ids of the queries; only used to match queries to their own gallery
            item under ``leave_one_out``.
        gallery_ids: (G,) unique item ids of the gallery items.
        **options: the fields of :class:`RetrievalOptions`: ``topk``, ``leave_one_out``, ``batch_size``,
            ``allow_label_mismatch``, ``backend``.

    Returns:
        ``top{k}`` for each k (fraction of queries with a relevant item in the first k), ``mAP`` (AP over the
        full ranking, AP(q) = (1/R_q) Σ_k P_q(k)·rel_q(k)), ``mAP@R`` (pytorch-metric-learning's definition,
        with R = R_q the number of relevant items), ``R_precision`` (fraction of relevant items among the
        first R_q), all fractions in [0, 1]; plus ``num_queries`` (all queries given) and
        ``num_queries_without_relevant`` as ints.

    Raises:
        EvalError: non-2D or non-finite embeddings, empty arrays, length mismatches between embeddings and
            labels or ids, duplicate ids, k <= 0, a zero vector after truncation, differing label sets
            (unless allowed), leave-one-out that cannot be matched, or no query with a relevant item.

    Example:
        >>> x = np.eye(3)[[0, 0, 1, 1]]
        >>> retrieval_metrics(x, [0, 0, 1, 1], x, [0, 0, 1, 1], leave_one_out=True, topk=(1,))["top1"]
        1.0
    """
    return _averages(per_query_metrics(query, query_labels, gallery, gallery_labels, query_ids=query_ids,
                                       gallery_ids=gallery_ids, **options))


def _averages(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """The means over the queries that have a relevant item, and the two query counts (see :func:`retrieval_metrics`)."""
    valid = per_query["num_relevant"] > 0
    n_queries = int(valid.size)
    n_without = int((~valid).sum())
    if n_without == n_queries:
        raise EvalError(f"none of the {n_queries} queries has a relevant gallery item; retrieval metrics are undefined")
    if n_without:
        _logger.info("%d of %d queries have no relevant gallery item and are left out of the averages", n_without, n_queries)
    result: dict[str, Any] = {key: float(values[valid].mean()) for key, values in per_query.items() if key != "num_relevant"}
    result["num_queries"] = n_queries
    result["num_queries_without_relevant"] = n_without
    return result


@dataclass(frozen=True)
class RetrievalEvaluator(RetrievalOptions):
    """Retrieval metrics with their options fixed once, for callers that evaluate many query sets alike.

    Like pytorch-metric-learning's ``AccuracyCalculator``: options and the metric selection are checked at
    construction, and calling it returns a dict of named metrics (those of :func:`retrieval_metrics`).

    Attributes:
        include: keys to return (default all of :func:`list_metrics`).
        exclude: keys to drop.
        topk, leave_one_out, batch_size, allow_label_mismatch, backend: see :class:`RetrievalOptions`.

    Example:
        >>> evaluator = RetrievalEvaluator(topk=(1,), leave_one_out=True, include=("top1", "mAP"))
        >>> x = np.eye(2)[[0, 0, 1, 1]]
        >>> evaluator(x, [0, 0, 1, 1], x, [0, 0, 1, 1])
        {'top1': 1.0, 'mAP': 1.0}
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "include", None if self.include is None else tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        known = list_metrics(self.topk)
        unknown = [name for name in (self.include or ()) + self.exclude if name not in known]
        if unknown:
            raise EvalError(f"unknown retrieval metric(s) {unknown}; known: {list(known)}")
        if not self.metric_names():
            raise EvalError(f"include={self.include} and exclude={self.exclude} leave no metric to compute")

    def metric_names(self) -> tuple[str, ...]:
        """The keys a call returns, in order."""
        chosen = self.include if self.include is not None else list_metrics(self.topk)
        return tuple(name for name in chosen if name not in self.exclude)

    def __call__(
        self, query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, *,
        query_ids: np.ndarray | None = None, gallery_ids: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Metrics of queries (Q, D_q) against a gallery (G, D_g); see :func:`retrieval_metrics`."""
        metrics = _averages(self.per_query(query, query_labels, gallery, gallery_labels, query_ids=query_ids,
                                           gallery_ids=gallery_ids))
        return {name: metrics[name] for name in self.metric_names()}


# --------------------------------------------------------------------------------------------------------------
# Ranking backends: gallery (G, d) -> function of a query batch (B, d) -> (scores, indices), both (B, G),
# scores non-increasing along each row.


def _faiss_ranker(gallery: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import faiss  # imported on use: the numpy backend needs no faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    n_g = len(gallery)

    def rank(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = index.search(queries, n_g)
        if (idx < 0).any():  # cannot happen with k == ntotal: a FAISS contract violation, not a user error
            raise RuntimeError("FAISS returned fewer neighbours than gallery items")
        return scores, idx

    return rank


def _numpy_ranker(gallery: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    gallery_t = np.ascontiguousarray(gallery.T)

    def rank(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ gallery_t
        idx = np.argsort(-scores, axis=1)
        return np.take_along_axis(scores, idx, axis=1), idx

    return rank


def _torch_ranker(gallery: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Matmul + sort in torch, on the GPU when there is one (a full 10k ranking takes milliseconds there)."""
    import torch  # imported on use: the other backends need no torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery)).to(device).T

    def rank(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = torch.from_numpy(np.ascontiguousarray(queries)).to(device) @ gallery_t
        sorted_scores, idx = torch.sort(scores, dim=1, descending=True)
        return sorted_scores.cpu().numpy(), idx.cpu().numpy()

    return rank


_BACKENDS: dict[str, Callable[[np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]] = {
    "faiss": _faiss_ranker,
    "numpy": _numpy_ranker,
    "torch": _torch_ranker,
}


# --------------------------------------------------------------------------------------------------------------
# Ranking arithmetic


def metrics_from_ranking(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int], drop: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Metrics of a batch of rankings, from the relevant items and the blocks of tied scores holding them.

    The batch is flattened row after row, so rows may lose an item (``drop``) and become ragged. Finding
    the tie blocks is one linear pass; everything else is linear in the number of relevant items, which
    keeps the full-ranking metrics cheap even for a 10k gallery.

    Args:
        scores: (B, N) similarity of each ranked item, non-increasing along each row.
        relevant: (B, N) bool, whether the item at that rank is relevant.
        ks: the CMC cut-offs.
        drop: (B, N) bool, items removed from the ranking (a query's own item under leave-one-out).

    Returns:
        (B,) arrays keyed as in :func:`per_query_metrics`; NaN where a row has no relevant item.
    """
    b, n = scores.shape
    s = scores.ravel()
    r = relevant.ravel()
    lengths = np.full(b, n, dtype=np.int64)
    if drop is not None and drop.any():
        keep = ~drop.ravel()
        s, r = s[keep], r[keep]
        lengths -= drop.sum(axis=1)
    row_start = np.zeros(b + 1, dtype=np.int64)  # row_start[b] = total, a sentinel
    np.cumsum(lengths, out=row_start[1:])
    total = len(s)

    # Blocks of tied scores, found by their last item: the end of a row always closes one.
    block_last = np.zeros(total, dtype=bool)
    block_last[row_start[1:][lengths > 0] - 1] = True
    if total > 1:
        if ((s[1:] > s[:-1]) & ~block_last[:-1]).any():  # a broken backend would corrupt every metric
            raise RuntimeError("search results are not sorted by decreasing score")
        block_last[:-1] |= s[1:] != s[:-1]
    block_end = np.flatnonzero(block_last)

    # Every relevant item, row-major: its row, its block and the block's last rank in the row.
    item = np.flatnonzero(r)
    idx = np.arange(len(item))
    row = np.searchsorted(row_start, item, side="right") - 1
    block = np.searchsorted(block_end, item)  # the first block end at or after the item
    end_col = block_end[block] - row_start[row]
    first_of_row = np.searchsorted(row, np.arange(b))
    rank = idx - first_of_row[row] + 1  # 1-based rank among the row's relevant items
    last_in_block = np.searchsorted(block, block, side="right") - 1
    num_relevant = np.bincount(row, minlength=b).astype(np.int64)
    has_rel = num_relevant > 0
    denom = np.where(has_rel, num_relevant, 1).astype(np.float64)

    out: dict[str, np.ndarray] = {}
    # AP as scikit-learn: each relevant item is credited with the precision at the end of its tied block.
    out["mAP"] = np.bincount(row, weights=rank[last_in_block] / (end_col + 1.0), minlength=b) / denom
    # Pessimistic order: the c relevant items of a block take its last c ranks.
    col = end_col - (last_in_block - idx)
    first_hit = np.full(b, n, dtype=np.int64)
    first_hit[has_rel] = col[first_of_row[has_rel]]
    for k in ks:
        out[f"top{k}"] = (first_hit < k).astype(np.float64)
    within_r = col < num_relevant[row]
    out["mAP@R"] = np.bincount(row, weights=within_r * rank / (col + 1.0), minlength=b) / denom
    out["R_precision"] = np.bincount(row, weights=within_r, minlength=b) / denom

    for key in out:
        out[key][~has_rel] = np.nan
    out["num_relevant"] = num_relevant
    return out


# --------------------------------------------------------------------------------------------------------------
# Input checks


def check_topk(topk: Iterable[int]) -> tuple[int, ...]:
    """``topk`` as a tuple of positive integers, or an :class:`EvalError` naming what is wrong."""
    try:
        ks = tuple(topk)
    except TypeError:
        raise EvalError(f"topk must be a sequence of positive integers, got {topk!r}") from None
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise EvalError(f"topk must hold positive integers, got {k!r} in {ks}")
    return tuple(dict.fromkeys(int(k) for k in ks))


def _check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise EvalError(f"{name} embeddings must be a 2-D (N, D) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise EvalError(f"{name} embeddings are empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise EvalError(f"{name} embeddings must be real numbers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise EvalError(f"{name} embeddings hold NaN or Inf in {int(bad.sum())} row(s), first row {int(np.flatnonzero(bad)[0])}")
    return arr


def _check_vector(x: np.ndarray, name: str, expected: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise EvalError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if len(arr) != expected:
        raise EvalError(f"{name} has {len(arr)} entries but there are {expected} embeddings")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise EvalError(f"{name} holds NaN or Inf")
    return arr


def _check_ids(x: np.ndarray, name: str, expected: int) -> np.ndarray:
    arr = _check_vector(x, name, expected)
    try:
        values, counts = np.unique(arr, return_counts=True)
    except TypeError:
        raise EvalError(f"{name} mixes types that cannot be compared") from None
    if (counts > 1).any():
        raise EvalError(f"{name} has duplicate ids, e.g. {values[counts > 1][:5].tolist()}")
    return arr


def _check_label_sets(query_labels: np.ndarray, gallery_labels: np.ndarray) -> None:
    try:
        q_set = set(np.unique(query_labels).tolist())
        g_set = set(np.unique(gallery_labels).tolist())
    except TypeError:
        raise EvalError("labels mix types that cannot be compared") from None
    if q_set == g_set:
        return
    raise EvalError(
        f"query and gallery label sets differ (query only: {_preview(q_set - g_set)}; gallery only: "
        f"{_preview(g_set - q_set)}), which usually means mixed splits; pass allow_label_mismatch=True to allow it"
    )


def _preview(labels: set[Any], limit: int = 10) -> str:
    items = sorted(labels, key=repr)
    shown = ", ".join(repr(v) for v in items[:limit])
    return f"[{shown}{f', ... +{len(items) - limit} more' if len(items) > limit else ''}]"


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any comparable type to shared int64 codes, so relevance is one integer comparison."""
    try:
        _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    except TypeError:
        raise EvalError("query and gallery labels have types that cannot be compared") from None
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _self_index(n_q: int, n_g: int, query_ids: np.ndarray | None, gallery_ids: np.ndarray | None) -> np.ndarray:
    """(Q,) gallery position of each query's own item, -1 where it has none."""
    if (query_ids is None) != (gallery_ids is None):
        raise EvalError("leave_one_out matches by ids only when both query_ids and gallery_ids are given")
    if query_ids is None:
        if n_q != n_g:
            raise EvalError(
                f"leave_one_out without ids matches by position and needs as many queries as gallery items, got {n_q} and {n_g}"
            )
        return np.arange(n_q, dtype=np.int64)
    assert gallery_ids is not None
    try:
        sorter = np.argsort(gallery_ids, kind="stable")
        sorted_ids = gallery_ids[sorter]
        at = np.minimum(np.searchsorted(sorted_ids, query_ids), n_g - 1)
        found = sorted_ids[at] == query_ids
    except TypeError:
        raise EvalError("query_ids and gallery_ids have types that cannot be compared") from None
    if not found.any():
        raise EvalError("leave_one_out=True but no query id occurs in gallery_ids; the query set is not the gallery set")
    if not found.all():
        _logger.info("leave-one-out: %d of %d query ids are not in the gallery; nothing is left out for them",
                     int((~found).sum()), n_q)
    return np.where(found, sorter[at], -1).astype(np.int64)


def _truncate_normalise(x: np.ndarray, d: int, name: str) -> np.ndarray:
    """(N, d) float32 rows of unit norm, computed in float64 so the float32 result is correctly rounded."""
    x = np.asarray(x[:, :d], dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        raise EvalError(
            f"{name} row {int(np.flatnonzero(zero)[0])} is a zero vector after truncation to {d} dims; "
            "cosine similarity is undefined"
        )
    return np.ascontiguousarray((x / norms[:, None]).astype(np.float32))
