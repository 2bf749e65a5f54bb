"""Score calibration of cross-version routes: bounds, and the moment-matching fit.

Routes through a transform typically score lower than same-version matches; merging by raw score
would under-rank older segments. A route's scores are mapped affinely (``scale * score + shift``) so
that, on held-out queries, their mean and standard deviation equal those of the queries' own version.
"""

from __future__ import annotations

import numpy as np

from compatembed_index.errors import InvalidInputError
from compatembed_index.validation import MAX_CALIBRATION_SCALE, MAX_CALIBRATION_SHIFT


def top_k_scores(result: tuple[np.ndarray, np.ndarray, np.ndarray], own: np.ndarray | None, k: int) -> np.ndarray:
    """(Q, k) scores of a search, each query's own item (``own[i]``) removed when ids are given."""
    scores, ids = result[0], result[1]
    if own is None:
        return scores[:, :k]
    keep = ids != own[:, None]
    # stable: the kept entries stay in rank order; rows that never met their own item drop their last
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(np.where(keep, scores, -np.inf), order, 1)


def calibration_problem(scale: float, shift: float) -> str | None:
    """Why ``scale * score + shift`` is not an acceptable score map (None: it is): it must keep the order
    and keep every score within float32's range."""
    if not scale > 0:
        return f"scale must be positive (a calibration must keep the order), got {scale}"
    if scale > MAX_CALIBRATION_SCALE:
        return (f"scale {scale:g} is above the limit of {MAX_CALIBRATION_SCALE:g}: calibrated scores could leave "
                "float32's range")
    if not abs(shift) <= MAX_CALIBRATION_SHIFT:
        return (f"shift {shift:g} is outside ±{MAX_CALIBRATION_SHIFT:g}: calibrated scores could leave "
                "float32's range")
    return None


def fit_calibration(ref: np.ndarray, got: np.ndarray, route: str) -> tuple[float, float]:
    """``(scale, shift)`` mapping the scores ``got`` of a route onto the moments of the reference scores ``ref``.

    Raises:
        InvalidInputError: no finite score on either side, or a fit outside :func:`calibration_problem`'s bounds.
    """
    ref, got = ref[np.isfinite(ref)], got[np.isfinite(got)]
    if ref.size == 0 or got.size == 0:
        raise InvalidInputError(f"cannot calibrate {route}: no scores to match")
    sd_got = float(got.std())
    scale = float(ref.std()) / sd_got if sd_got > 1e-12 else 1.0
    scale = scale if scale > 0 else 1.0
    shift = float(ref.mean()) - scale * float(got.mean())
    problem = calibration_problem(scale, shift)
    if problem:
        raise InvalidInputError(f"the fitted calibration of {route} is unusable: {problem}")
    return scale, shift
