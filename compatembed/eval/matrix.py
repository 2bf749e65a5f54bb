"""The compatibility matrix over a sequence of model versions, and what it says about each upgrade.

``C[t][j] = M(φ_t queries, φ_j gallery)`` for ``j <= t`` on one labelled split, for every retrieval metric.
Each entry is computed by :func:`compatembed.eval.pairs.evaluate_pair` -- the function behind
``compatembed-eval`` -- so a matrix cell and the eval CLI's new/old number are the same computation,
following the same compatibility routes (v3 → v1 composes through v2).

From the matrix: the empirical compatibility criterion per pair (strict ``>``), AC and AM (genuine zeros
count), and the update gain of each upgrade step relative to an independently trained model when one is
given (otherwise the gain is reported as not available, never guessed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from compatembed.errors import EvalError
from compatembed.eval.compatibility import (
    average_compatibility,
    average_multimodel_accuracy,
    compatibility_criterion_matrix,
    update_gain,
)
from compatembed.eval.pairs import evaluate_pair

if TYPE_CHECKING:  # torch-free at import: EmbeddingSet lives next to the torch embedding code
    from compatembed.embeddings import EmbeddingSet

_logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("top1", "top5", "mAP", "mAP@R")


@dataclass
class CompatibilityMatrix:
    """Retrieval metrics of every (query version t, gallery version j <= t) pair.

    Attributes:
        names: T version ids, oldest first (row t and column t are version ``names[t]``).
        values: metric → (T, T) float64 array of fractions; NaN above the diagonal.
        routes: (T, T) nested list: how queries of t reached gallery j (``"same version"``,
            ``"query: prefix"``, ``"gallery: forward"``, ``"none (raw)"``); None above the diagonal.
        num_queries: queries per pair (the split's size).
    """

    names: list[str]
    values: dict[str, np.ndarray]
    routes: list[list[str | None]] = field(default_factory=list)
    num_queries: int = 0

    def __post_init__(self) -> None:
        t = len(self.names)
        if t == 0:
            raise EvalError("a compatibility matrix needs at least one version")
        if len(set(self.names)) != t:
            raise EvalError(f"version names must be unique, got {self.names}")
        for metric, c in self.values.items():
            if np.shape(c) != (t, t):
                raise EvalError(f"matrix of {metric!r} has shape {np.shape(c)}, expected ({t}, {t})")
        if not self.routes:
            self.routes = [[None] * t for _ in range(t)]

    @property
    def metrics(self) -> list[str]:
        """The metrics held, in insertion order."""
        return list(self.values)

    def index(self, name: str) -> int:
        """Row/column of version ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise EvalError(f"version {name!r} is not in the matrix (versions: {self.names})") from None

    def long_rows(self) -> list[dict[str, Any]]:
        """One row per (metric, query, gallery) with ``j <= t``: the long CSV layout."""
        rows = []
        for metric, c in self.values.items():
            for t, q in enumerate(self.names):
                for j in range(t + 1):
                    rows.append({"metric": metric, "query": q, "gallery": self.names[j], "value": float(c[t, j]),
                                 "route": self.routes[t][j]})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metric → nested lists (None above the diagonal)."""
        t = len(self.names)
        return {
            "versions": list(self.names),
            "num_queries": self.num_queries,
            "values": {m: [[float(c[i, j]) if j <= i else None for j in range(t)] for i in range(t)]
                       for m, c in self.values.items()},
            "routes": self.routes,
        }


def compute_matrix(
    sets: Sequence[EmbeddingSet],
    *,
    names: Sequence[str] | None = None,
    leave_one_out: bool = True,
    topk: tuple[int, ...] = (1, 5),
    route: str = "auto",
    backend: str = "faiss",
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> CompatibilityMatrix:
    """Evaluate every pair ``j <= t`` with the eval CLI's own :func:`~compatembed.eval.pairs.evaluate_pair`.

    Args:
        sets: T embedding sets of the same labelled split, oldest version first (their ``meta`` carries
            ``version_id``/``version_dir`` so routes can be followed).
        names: T display names (default: each set's ``meta["version_id"]``).
        leave_one_out: the query set is the gallery set; each query's own item is excluded.
        topk: CMC cut-offs.
        route: ``auto`` (follow the registered compatibility routes) or ``raw``.
        backend: ranking backend of :func:`~compatembed.eval.retrieval_metrics`.
        metrics: metric keys kept in the matrix.

    Returns:
        The matrix, with the route taken by each pair.

    Raises:
        EvalError: no sets, item ids that differ between versions under leave-one-out, an unknown metric.
    """
    if not sets:
        raise EvalError("compute_matrix needs at least one embedding set")
    names = [str(n) for n in (names or [s.meta.get("version_id", f"v{i + 1}") for i, s in enumerate(sets)])]
    if len(names) != len(sets):
        raise EvalError(f"{len(sets)} embedding sets but {len(names)} names")
    if leave_one_out:
        reference = np.sort(sets[0].ids)
        for name, s in zip(names, sets):
            if not np.array_equal(np.sort(s.ids), reference):
                raise EvalError(f"leave_one_out needs every version's embeddings of the same items; {name} differs")
    t = len(sets)
    values = {m: np.full((t, t), np.nan) for m in metrics}
    routes: list[list[str | None]] = [[None] * t for _ in range(t)]
    for i in range(t):
        for j in range(i + 1):
            _logger.info("matrix: %s queries / %s gallery", names[i], names[j])
            result = evaluate_pair(sets[i], sets[j], leave_one_out=leave_one_out, topk=topk, route=route, backend=backend)
            for m in metrics:
                if m not in result:
                    raise EvalError(f"unknown metric {m!r}; the evaluation returns {sorted(result)}")
                values[m][i, j] = result[m]
            routes[i][j] = result["route"]
    return CompatibilityMatrix(names, values, routes, num_queries=len(sets[0]))


def summarise_matrix(
    matrix: CompatibilityMatrix,
    *,
    independent_self: Mapping[str, Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """The criterion per pair, AC, AM and the update gain per step, for every metric of ``matrix``.

    Args:
        matrix: the compatibility matrix.
        independent_self: metric → T values ``M(new*_t, new*_t)`` of an independently trained model for
            each step t (None where there is none; index 0 is unused). Without it the update gain is
            reported as not available.

    Returns:
        ``{metric: {"criterion": [{query, gallery, cross, old_self, holds}], "AC": float | None,
        "AM": float, "update_gain": [{step, query, gallery, value, note}]}}``; AC is None for T = 1.
    """
    out: dict[str, Any] = {}
    names = matrix.names
    t = len(names)
    for metric, c in matrix.values.items():
        holds = compatibility_criterion_matrix(c)
        pairs = [
            {"query": names[i], "gallery": names[j], "cross": float(c[i, j]), "old_self": float(c[j, j]),
             "holds": bool(holds[i, j])}
            for i in range(t) for j in range(i)
        ]
        ac = average_compatibility(c)
        indep = None if independent_self is None else independent_self.get(metric)
        if indep is not None and len(indep) != t:
            raise EvalError(f"independent_self[{metric!r}] has {len(indep)} values for {t} versions")
        gains = []
        for i in range(1, t):
            step = {"step": f"{names[i - 1]} → {names[i]}", "query": names[i], "gallery": names[i - 1], "value": None}
            reference = None if indep is None else indep[i]
            if reference is None:
                step["note"] = "n/a: no independently trained model for this step"
            else:
                gain = update_gain(c[i, i - 1], c[i - 1, i - 1], float(reference))
                if math.isnan(gain):
                    step["note"] = "n/a: the independent model gains nothing over the old one"
                else:
                    step["value"] = gain
                    step["note"] = f"independent new/new = {float(reference):.4f}"
                step["independent_self"] = float(reference)
            gains.append(step)
        out[metric] = {
            "criterion": pairs,
            "AC": None if math.isnan(ac) else ac,
            "AM": average_multimodel_accuracy(c),
            "update_gain": gains,
        }
    return out


@dataclass(frozen=True)
class GateResult:
    """The deployment gate's verdict on one (candidate, deployed) pair.

    Attributes:
        passed: the candidate meets the criterion M(candidate, deployed) > M(deployed, deployed).
        reason: one line saying why, with both numbers.
        metric: the metric judged.
        cross: M(candidate queries, deployed gallery).
        deployed_self: M(deployed, deployed).
    """

    passed: bool
    reason: str
    metric: str
    cross: float
    deployed_self: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"passed": self.passed, "reason": self.reason, "metric": self.metric, "cross": self.cross,
                "deployed_self": self.deployed_self}


def gate(matrix: CompatibilityMatrix, *, deployed: str, candidate: str, metric: str = "mAP") -> GateResult:
    """Decide whether ``candidate`` may replace ``deployed`` without backfilling the gallery.

    The candidate must be a later row of the matrix than the deployed version (its queries search the
    deployed gallery) and must meet the strict empirical criterion on ``metric``.

    Raises:
        EvalError: an unknown version or metric, or a candidate that is not newer than the deployed version.
    """
    if metric not in matrix.values:
        raise EvalError(f"gate metric {metric!r} is not in the report (metrics: {matrix.metrics})")
    t, j = matrix.index(candidate), matrix.index(deployed)
    if t <= j:
        raise EvalError(f"gate: candidate {candidate!r} must come after deployed {deployed!r} in the version list")
    c = matrix.values[metric]
    cross, own = float(c[t, j]), float(c[j, j])
    passed = bool(compatibility_criterion_matrix(c)[t, j])
    word = "passes" if passed else "FAILS"
    relation = ">" if passed else "<="
    reason = (f"{candidate} {word} the compatibility criterion against deployed {deployed} on {metric}: "
              f"M({candidate}, {deployed}) = {100 * cross:.2f}% {relation} M({deployed}, {deployed}) = {100 * own:.2f}%")
    return GateResult(passed, reason, metric, cross, own)
