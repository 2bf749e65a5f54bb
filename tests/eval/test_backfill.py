"""Backfill curves through the index service, the upgrade orders, against brute-force numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from compatembed_index.registry import write_version_dir

from compatembed.embeddings import EmbeddingSet
from compatembed.errors import EvalError
from compatembed.eval.backfill import (
    average_curves,
    backfill_curve,
    fraction_grid,
    neighbour_margin_order,
    prototype_margin_order,
    random_order,
)
from compatembed.eval.mixed_gallery import MixedGallery

G, CLASSES = 40, 4


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """old (6-d); new (8-d, prefix → old) which also has a forward edge old → new (one linear layer)."""
    root = tmp_path_factory.mktemp("versions")
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(CLASSES), G // CLASSES)
    centres = rng.normal(size=(CLASSES, 8))
    base = centres[labels] + rng.normal(size=(G, 8))
    w0 = rng.normal(size=(8, 6)).astype(np.float32)
    b0 = np.zeros(8, np.float32)
    dirs = {
        "old": write_version_dir(root, "old", 6, []),
        "new": write_version_dir(root, "new", 8, [
            {"kind": "prefix", "target": "old", "dim": 6},
            {"kind": "forward", "source": "old", "file": "transforms/f.npz", "activation": "relu", "normalize_output": True},
        ], {"transforms/f.npz": {"w0": w0, "b0": b0}}),
    }
    ids = np.arange(G)
    emb = {"old": base[:, :6] + 1.2 * rng.normal(size=(G, 6)), "new": base + 0.3 * rng.normal(size=(G, 8))}
    sets = {v: EmbeddingSet(_norm(x).astype(np.float32), labels.copy(), ids.copy(), {"version_id": v}) for v, x in emb.items()}
    return {"dirs": dirs, "sets": sets, "labels": labels, "ids": ids, "forward": w0}


def oracle_map(versions, upgraded: np.ndarray, *, forward: bool) -> float:
    """mAP of new queries over a gallery whose ``upgraded`` items hold new vectors, the rest old ones."""
    sets, labels = versions["sets"], versions["labels"]
    q = sets["new"].embeddings
    if forward:  # old items forward-mapped into the new space, compared with the full new query
        old_side = _norm(sets["old"].embeddings @ versions["forward"].T), q
    else:  # old items searched with the prefix of the new query
        old_side = sets["old"].embeddings, _norm(q[:, :6])
    scores = np.where(upgraded[None, :], q @ sets["new"].embeddings.T, old_side[1] @ old_side[0].T)
    aps = [average_precision_score(labels[np.arange(G) != i] == labels[i], scores[i, np.arange(G) != i]) for i in range(G)]
    return float(np.mean(aps))


@pytest.mark.parametrize("forward", [False, True])
def test_curve_equals_oracle_at_every_fraction(versions, forward):
    order = random_order(versions["ids"], seed=4)
    fractions = [0.0, 0.25, 0.5, 1.0]
    with MixedGallery(list(versions["dirs"].values()), versions["sets"], batch_size=8) as g:
        points = backfill_curve(g, old_version="old", new_version="new", order=order, fractions=fractions,
                                forward=forward, metrics=("top1", "mAP"))
    assert [p["upgraded"] for p in points] == [0, 10, 20, 40]
    for p in points:
        upgraded = np.isin(versions["ids"], order[: p["upgraded"]])
        assert p["mAP"] == pytest.approx(oracle_map(versions, upgraded, forward=forward), abs=1e-6), p["fraction"]
    how = points[0]["routes"]["old"]
    assert how == ("copy:old>new" if forward else "query:new>old")
    assert points[-1]["routes"] == {"new": "direct"}


def test_curve_input_checks(versions):
    with MixedGallery(list(versions["dirs"].values()), versions["sets"]) as g:
        with pytest.raises(EvalError, match="exactly once"):
            backfill_curve(g, old_version="old", new_version="new", order=versions["ids"][:-1], fractions=[0, 1])
        with pytest.raises(EvalError, match="increasing"):
            backfill_curve(g, old_version="old", new_version="new", order=versions["ids"], fractions=[0.5, 0.2])
    with pytest.raises(EvalError, match="at least 2"):
        fraction_grid(1)
    assert fraction_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_neighbour_margin_order_matches_a_loop(versions):
    x = versions["sets"]["old"].embeddings
    ids = versions["ids"] + 7
    got = neighbour_margin_order(ids, x, batch_size=7)
    margins = []
    for i in range(G):
        s = sorted((float(x[i] @ x[j]) for j in range(G) if j != i), reverse=True)
        margins.append(s[0] - s[1])
    assert np.array_equal(got, ids[np.argsort(margins, kind="stable")])
    assert sorted(got.tolist()) == sorted(ids.tolist())


def test_prototype_margin_order_uses_training_prototypes(versions):
    rng = np.random.default_rng(2)
    train = _norm(rng.normal(size=(30, 6)))
    train_labels = np.repeat([0, 1, 2], 10)
    x = versions["sets"]["old"].embeddings
    got = prototype_margin_order(versions["ids"], x, train, train_labels)
    protos = _norm(np.stack([train[train_labels == c].mean(0) for c in range(3)]))
    s = np.sort(x @ protos.T, axis=1)
    assert np.array_equal(got, versions["ids"][np.argsort(s[:, -1] - s[:, -2], kind="stable")])
    with pytest.raises(EvalError, match="two classes"):
        prototype_margin_order(versions["ids"], x, train[:10], train_labels[:10])


def test_random_order_is_seeded_and_curves_average():
    ids = np.arange(20)
    assert np.array_equal(random_order(ids, 3), random_order(ids, 3))
    assert not np.array_equal(random_order(ids, 3), random_order(ids, 4))
    a = [{"fraction": 0.0, "upgraded": 0, "mAP": 0.2, "routes": {}, "skipped": []}]
    b = [{"fraction": 0.0, "upgraded": 0, "mAP": 0.4, "routes": {}, "skipped": []}]
    (row,) = average_curves([a, b], ["mAP"])
    assert row["mAP"] == pytest.approx(0.3) and row["mAP_std"] == pytest.approx(0.1) and row["seeds"] == 2
