"""Backfill curves: a retrieval metric as a function of the fraction of the gallery upgraded.

The gallery starts with every item stored as the old version's vector; items are then re-embedded with
the newest version (``IndexService.upgrade``) in some order, and at each fraction the newest version's
queries search the mixed gallery through the service. Orders:

* ``random``: a seeded permutation (optionally averaged over several seeds);
* ``neighbour_margin``: items whose old embedding is least reliable first, judged WITHOUT labels: the
  margin between the item's top-1 and top-2 neighbour scores among the other old gallery vectors
  (a small margin means an ambiguous, crowded neighbourhood);
* ``prototype_margin``: the margin between the old embedding's nearest and second-nearest class
  prototype, with prototypes averaged from the old model's embeddings of the TRAINING split (the
  test labels are never used to choose an order).

With a forward route old → new (FCT-style) there is also the "no images" curve: the old segment is
materialised into the new space first (``IndexService.materialise``) and re-embedded items then replace
their forward-mapped copies.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from compatembed.errors import EvalError
from compatembed.eval.mixed_gallery import MixedGallery

_logger = logging.getLogger(__name__)

ORDERS = ("random", "neighbour_margin", "prototype_margin")


def fraction_grid(points: int = 11) -> list[float]:
    """``points`` evenly spaced fractions from 0 to 1 inclusive."""
    if points < 2:
        raise EvalError(f"a backfill curve needs at least 2 points, got {points}")
    return [round(float(f), 10) for f in np.linspace(0.0, 1.0, points)]


def random_order(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(G,) the ids in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.asarray(ids, dtype=np.int64))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise EvalError("a zero embedding cannot be ranked by reliability")
    return x / norms


def neighbour_margin_order(ids: np.ndarray, old_vectors: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Ids sorted by the margin between each item's top-1 and top-2 neighbour cosine, smallest first.

    Args:
        ids: (G,) item ids, G >= 3.
        old_vectors: (G, D) the items' old embeddings (the item itself is excluded from its neighbours).

    Returns:
        (G,) ids, least reliable (smallest margin) first; ties keep id order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    x = _normalise(old_vectors)
    if len(x) < 3:
        raise EvalError("neighbour_margin needs at least 3 gallery items")
    margin = np.empty(len(x))
    for lo in range(0, len(x), batch_size):
        s = x[lo:lo + batch_size] @ x.T
        s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf
        top2 = -np.partition(-s, 1, axis=1)[:, :2]
        margin[lo:lo + len(s)] = np.abs(top2[:, 0] - top2[:, 1])
    return ids[np.argsort(margin, kind="stable")]


def class_prototypes(train_vectors: np.ndarray, train_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) normalised mean embedding per training class, and the (C,) class labels."""
    x = _normalise(train_vectors)
    labels = np.asarray(train_labels)
    classes = np.unique(labels)
    protos = np.stack([x[labels == c].mean(axis=0) for c in classes])
    return _normalise(protos), classes


def prototype_margin_order(
    ids: np.ndarray, old_vectors: np.ndarray, train_vectors: np.ndarray, train_labels: np.ndarray
) -> np.ndarray:
    """Ids sorted by the margin between the nearest and second-nearest old class prototype, smallest first.

    Args:
        ids: (G,) gallery item ids.
        old_vectors: (G, D) their old embeddings.
        train_vectors: (N, D) the old model's embeddings of the training split.
        train_labels: (N,) the training labels (at least two classes).
    """
    protos, classes = class_prototypes(train_vectors, train_labels)
    if len(classes) < 2:
        raise EvalError("prototype_margin needs training embeddings of at least two classes")
    s = _normalise(old_vectors) @ protos.T
    top2 = -np.partition(-s, 1, axis=1)[:, :2]
    return np.asarray(ids, dtype=np.int64)[np.argsort(top2[:, 0] - top2[:, 1], kind="stable")]


def backfill_curve(
    gallery: MixedGallery,
    *,
    old_version: str,
    new_version: str,
    order: np.ndarray,
    fractions: Sequence[float],
    forward: bool = False,
    metrics: Sequence[str] = ("top1", "top5", "mAP", "mAP@R"),
    calibrate: bool = False,
) -> list[dict[str, Any]]:
    """Upgrade the gallery from ``old_version`` to ``new_version`` in ``order`` and measure each fraction.

    Args:
        gallery: the mixed gallery holding both versions' embeddings of the split.
        old_version: the version every item starts in.
        new_version: the version items are re-embedded with; its queries search the gallery.
        order: (G,) every item id once, the upgrade order.
        fractions: increasing fractions in [0, 1] at which to measure.
        forward: materialise the old segment into the new space first (needs a forward route).
        metrics: metric keys recorded per point.
        calibrate: at each fraction, refit the per-route score calibration from the items already
            upgraded (:meth:`MixedGallery.calibrate`) before measuring, as a deployment would.

    Returns:
        One dict per fraction: ``fraction``, ``upgraded`` (item count), the metrics, ``routes``, ``skipped``
        (and ``calibration``, the fitted routes, with ``calibrate``).
    """
    order = np.asarray(order, dtype=np.int64)
    if len(order) != len(gallery.ids) or not np.array_equal(np.sort(order), gallery.ids):
        raise EvalError("the upgrade order must list every gallery item exactly once")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr) or any(b < a for a, b in zip(fr, fr[1:])):
        raise EvalError(f"backfill fractions must be increasing values in [0, 1], got {fr}")
    gallery.load({old_version: gallery.ids})
    if forward:
        gallery.materialise(old_version, new_version)
    done = 0
    points = []
    for f in fr:
        n = int(round(f * len(order)))
        gallery.upgrade(new_version, order[done:n])
        done = max(done, n)
        fitted = gallery.calibrate(new_version) if calibrate else None
        result = gallery.evaluate(new_version)
        points.append({"fraction": f, "upgraded": done, **{m: result[m] for m in metrics},
                       "routes": result["routes"], "skipped": result["skipped"]})
        if fitted is not None:
            points[-1]["calibration"] = fitted
        _logger.debug("backfill %s → %s at %.0f%%: mAP %.4f", old_version, new_version, 100 * f, result.get("mAP", float("nan")))
    return points


def average_curves(curves: Sequence[list[dict[str, Any]]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation (``<metric>_std``) per point of curves measured at the same fractions."""
    if not curves:
        raise EvalError("no curves to average")
    out = []
    for points in zip(*curves):
        row: dict[str, Any] = {"fraction": points[0]["fraction"], "upgraded": points[0]["upgraded"]}
        for m in metrics:
            values = np.array([p[m] for p in points], dtype=np.float64)
            row[m] = float(values.mean())
            row[f"{m}_std"] = float(values.std())
        row["routes"], row["skipped"] = points[0]["routes"], points[0]["skipped"]
        row["seeds"] = len(points)
        if any("calibration" in p for p in points):
            row["calibration"] = [p.get("calibration") for p in points]  # one fit per curve
        out.append(row)
    return out
