"""The compatibility matrix: its summary (criterion, AC, AM, update gain) on hand-built matrices, the gate,
and the computed matrix against the eval CLI's own pair evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from compatembed.embeddings import EmbeddingSet
from compatembed.errors import EvalError
from compatembed.eval import retrieval_metrics
from compatembed.eval.matrix import CompatibilityMatrix, compute_matrix, gate, summarise_matrix

NAN = float("nan")


def _matrix(c, names=("v1", "v2", "v3"), metric="mAP"):
    return CompatibilityMatrix(list(names), {metric: np.asarray(c, dtype=float)})


# A chain where v2 is compatible with v1, v3 ties v2 on v2's gallery (strict: not compatible) and
# v3 retrieves nothing from v1's gallery (a genuine zero).
C = [[0.40, NAN, NAN],
     [0.50, 0.60, NAN],
     [0.00, 0.60, 0.70]]


def test_summary_of_a_hand_built_matrix():
    s = summarise_matrix(_matrix(C))["mAP"]
    holds = {(p["query"], p["gallery"]): p["holds"] for p in s["criterion"]}
    assert holds == {("v2", "v1"): True, ("v3", "v1"): False, ("v3", "v2"): False}
    assert s["AC"] == pytest.approx(1 / 3)
    # AM averages the 6 entries with j <= t and counts the zero: (0.4 + 0.5 + 0.6 + 0 + 0.6 + 0.7) / 6
    assert s["AM"] == pytest.approx(2.8 / 6)
    assert [g["value"] for g in s["update_gain"]] == [None, None]
    assert all("n/a" in g["note"] for g in s["update_gain"])


def test_update_gain_per_step_against_independent_models():
    # independent new/new: 0.8 at step 2, 0.6 at step 3 (equal to v2's own: zero denominator)
    s = summarise_matrix(_matrix(C), independent_self={"mAP": [None, 0.8, 0.6]})["mAP"]
    step2, step3 = s["update_gain"]
    assert step2["step"] == "v1 → v2" and step2["value"] == pytest.approx((0.5 - 0.4) / (0.8 - 0.4))
    assert step3["value"] is None and "gains nothing" in step3["note"]
    with pytest.raises(EvalError, match="3 versions"):
        summarise_matrix(_matrix(C), independent_self={"mAP": [0.8, 0.6]})


def test_single_version_has_no_ac():
    s = summarise_matrix(_matrix([[0.5]], names=("v1",)))["mAP"]
    assert s["AC"] is None and s["AM"] == 0.5 and s["criterion"] == [] and s["update_gain"] == []


def test_gate_passes_compatible_and_fails_ties_and_zeros():
    m = _matrix(C)
    ok = gate(m, deployed="v1", candidate="v2", metric="mAP")
    assert ok.passed and "passes" in ok.reason and "50.00%" in ok.reason
    tie = gate(m, deployed="v2", candidate="v3", metric="mAP")
    assert not tie.passed and "FAILS" in tie.reason and "\n" not in tie.reason
    assert not gate(m, deployed="v1", candidate="v3").passed
    with pytest.raises(EvalError, match="must come after"):
        gate(m, deployed="v3", candidate="v1")
    with pytest.raises(EvalError, match="not in the matrix"):
        gate(m, deployed="v0", candidate="v1")
    with pytest.raises(EvalError, match="top1"):
        gate(m, deployed="v1", candidate="v2", metric="top1")


def test_matrix_layouts():
    m = _matrix(C)
    rows = m.long_rows()
    assert len(rows) == 6 and {(r["query"], r["gallery"]) for r in rows} == {
        ("v1", "v1"), ("v2", "v1"), ("v2", "v2"), ("v3", "v1"), ("v3", "v2"), ("v3", "v3")}
    d = json.loads(json.dumps(m.to_dict()))
    assert d["values"]["mAP"][0] == [0.4, None, None] and d["values"]["mAP"][2][0] == 0.0
    with pytest.raises(EvalError, match="unique"):
        CompatibilityMatrix(["a", "a"], {})
    with pytest.raises(EvalError, match="shape"):
        CompatibilityMatrix(["a", "b"], {"mAP": np.zeros((3, 3))})


def _set(x, labels, vid):
    return EmbeddingSet(x.astype(np.float32), np.asarray(labels), np.arange(len(x)), {"version_id": vid})


def test_computed_matrix_equals_pairwise_retrieval_metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    centres = rng.normal(size=(4, 8))
    sets = [_set(centres[labels] + s * rng.normal(size=(40, 8)), labels, f"v{i}") for i, s in enumerate((1.5, 1.0, 0.5))]
    m = compute_matrix(sets, topk=(1, 5), backend="numpy")
    assert m.names == ["v0", "v1", "v2"] and m.num_queries == 40
    for t in range(3):
        for j in range(3):
            if j > t:
                assert math.isnan(m.values["mAP"][t, j]) and m.routes[t][j] is None
                continue
            expect = retrieval_metrics(sets[t].embeddings, labels, sets[j].embeddings, labels, leave_one_out=True,
                                       query_ids=sets[t].ids, gallery_ids=sets[j].ids, backend="numpy")
            for metric in ("top1", "top5", "mAP", "mAP@R"):
                assert m.values[metric][t, j] == pytest.approx(expect[metric])
            assert m.routes[t][j] == ("same version" if t == j else "none (raw)")


def test_computed_matrix_refuses_different_items():
    x = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    a = _set(x, [0, 1, 2, 3, 0, 1], "a")
    b = EmbeddingSet(x.astype(np.float32), np.array([0, 1, 2, 3, 0, 1]), np.arange(1, 7), {"version_id": "b"})
    with pytest.raises(EvalError, match="same items"):
        compute_matrix([a, b])
