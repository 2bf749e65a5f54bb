"""Compatibility metrics: BCT's empirical criterion, update gain, and AC / AM over a sequence of models.

All functions take metric values that were already computed (by :mod:`compatembed.eval.retrieval`), so the
same numbers feed the criterion, the gain and the report tables. Notation as in ``methods.md``: M(φ_q, φ_g)
is a retrieval metric with queries embedded by φ_q and the gallery by φ_g; for T model versions the
compatibility matrix is ``C[t][j] = M(φ_t, φ_j)`` for ``j <= t`` (the upper triangle is ignored).

Comparisons are strict: a new model that merely ties the old one (``C[t][j] == C[j][j]``) is not compatible,
because backfilling would then buy nothing over keeping the old model.
"""

from __future__ import annotations

import math

import numpy as np

from compatembed.errors import EvalError


def empirical_compatibility(cross: float, old_self: float) -> bool:
    """BCT's empirical compatibility criterion M(new, old) > M(old, old).

    Args:
        cross: M(new, old), new-model queries against the old gallery.
        old_self: M(old, old).

    Returns:
        True when the new queries retrieve strictly better from the old gallery than old queries do.

    Raises:
        EvalError: a value is NaN or infinite.
    """
    _check_finite(cross=cross, old_self=old_self)
    return bool(cross > old_self)


def update_gain(cross: float, old_self: float, independent_self: float) -> float:
    """Share of the independent upgrade's gain that a compatible model delivers without backfilling.

    ``[M(new, old) - M(old, old)] / [M(new*, new*) - M(old, old)]`` with new* an independently trained new
    model: 1 means the cross test already matches a full re-index with new*, 0 means no gain, negative means
    the cross test is worse than the old model alone. When new* gains nothing over old (zero denominator)
    the ratio is undefined and NaN is returned, silently: callers report it as "n/a".

    Args:
        cross: M(new, old).
        old_self: M(old, old).
        independent_self: M(new*, new*).

    Raises:
        EvalError: a value is NaN or infinite.
    """
    _check_finite(cross=cross, old_self=old_self, independent_self=independent_self)
    denominator = float(independent_self) - float(old_self)
    if denominator == 0.0:
        return math.nan
    return (float(cross) - float(old_self)) / denominator


def compatibility_criterion_matrix(C: np.ndarray) -> np.ndarray:
    """Which (later, earlier) model pairs meet the empirical criterion.

    Args:
        C: (T, T) compatibility matrix, ``C[t][j] = M(φ_t, φ_j)`` for ``j <= t``; entries above the diagonal
            are ignored and may be NaN.

    Returns:
        (T, T) bool array E with ``E[t][j] = C[t][j] > C[j][j]`` for ``t > j`` and False on and above the
        diagonal (a model is not "compatible with itself" in this sense).

    Raises:
        EvalError: C is not square, is empty, or has a non-finite entry on or below the diagonal.
    """
    c = check_compatibility_matrix(C)
    strictly_lower = np.tril(np.ones(c.shape, dtype=bool), k=-1)
    diagonal = np.diag(c)
    with np.errstate(invalid="ignore"):  # NaNs above the diagonal are masked out below
        better = c > diagonal[None, :]
    return better & strictly_lower


def average_compatibility(C: np.ndarray) -> float:
    """AC: fraction of pairs t > j whose model t meets the criterion against model j.

    Args:
        C: (T, T) compatibility matrix (see :func:`compatibility_criterion_matrix`).

    Returns:
        A fraction in [0, 1]; NaN for T = 1, where there is no pair to judge.

    Raises:
        EvalError: as :func:`compatibility_criterion_matrix`.
    """
    criterion = compatibility_criterion_matrix(C)
    t = criterion.shape[0]
    if t == 1:
        return math.nan
    return float(criterion.sum()) / (t * (t - 1) / 2)


def average_multimodel_accuracy(C: np.ndarray) -> float:
    """AM: mean of the lower triangle of C, diagonal included.

    Genuine zeros (a cross test that retrieves nothing) count as zeros; the public implementation turns
    zeros into NaN and drops them, which inflates AM exactly for the incompatible models it should punish.

    Args:
        C: (T, T) compatibility matrix (see :func:`compatibility_criterion_matrix`).

    Returns:
        The mean of the T·(T+1)/2 entries with ``j <= t``.

    Raises:
        EvalError: as :func:`compatibility_criterion_matrix`.
    """
    c = check_compatibility_matrix(C)
    return float(c[np.tril_indices(c.shape[0])].mean())


def check_compatibility_matrix(C: np.ndarray) -> np.ndarray:
    """C as a float64 (T, T) array, after checking it is square and finite on and below the diagonal.

    Raises:
        EvalError: C is not numeric, not square, empty, or has a NaN/Inf entry with ``j <= t``.
    """
    try:
        c = np.asarray(C, dtype=np.float64)
    except (TypeError, ValueError):
        raise EvalError("compatibility matrix must be a numeric (T, T) array") from None
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise EvalError(f"compatibility matrix must be square (T, T), got shape {c.shape}")
    if c.shape[0] == 0:
        raise EvalError("compatibility matrix is empty (T = 0)")
    lower = np.tril(np.ones(c.shape, dtype=bool))
    bad = lower & ~np.isfinite(c)
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise EvalError(f"compatibility matrix entry C[{t}][{j}] = {c[t, j]} is not finite; entries with j <= t are required")
    return c


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            raise EvalError(f"{name} must be a number, got {value!r}") from None
        if not finite:
            raise EvalError(f"{name} must be finite, got {value!r}")
