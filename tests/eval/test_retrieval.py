"""Retrieval metrics against independent oracles.

The oracles below rank each query with Python's ``sorted`` on float64 scores and take AP from scikit-learn,
so they share no code with the vectorised, block-based implementation. To compare tie handling exactly,
most data sets are "exact": every vector has four ±1 entries (times a power of two), so after normalisation
each entry is ±0.5 and every cosine is a multiple of 0.25, computed without rounding in float32 and float64
alike. Such data is full of ties, which is the point.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from compatembed.errors import EvalError
from compatembed.eval import RetrievalEvaluator, list_metrics, per_query_metrics, retrieval_metrics

TOPK = (1, 2, 5, 10)
BACKENDS = ("faiss", "numpy", "torch")


def exact_embeddings(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) vectors with four ±1 entries, scaled by a power of two: exact cosines, many ties."""
    x = np.zeros((n, d))
    for row in x:
        row[rng.choice(d, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    return x * rng.choice([0.5, 1.0, 8.0], size=(n, 1))


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def oracle(q, ql, g, gl, *, own=None, topk=TOPK):
    """Per-query metrics by brute force. own[i]: gallery index left out for query i (-1: none).

    Ties: AP by scikit-learn; top-k, mAP@R and R-precision with irrelevant items first inside a tie.
    Returns a dict of (Q,) arrays with NaN for queries without a relevant item.
    """
    d = min(q.shape[1], g.shape[1])
    scores = unit(q[:, :d]) @ unit(g[:, :d]).T
    out = {key: np.full(len(q), np.nan) for key in [f"top{k}" for k in topk] + ["mAP", "mAP@R", "R_precision"]}
    for i in range(len(q)):
        keep = [j for j in range(len(g)) if own is None or j != own[i]]
        s = scores[i, keep]
        rel = np.asarray(gl)[keep] == ql[i]
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        out["mAP"][i] = average_precision_score(rel, s)
        order = sorted(range(len(s)), key=lambda t: (-s[t], bool(rel[t])))
        ranked = [bool(rel[t]) for t in order]
        for k in topk:
            out[f"top{k}"][i] = float(any(ranked[:k]))
        found, precision_sum = 0, 0.0
        for position, is_rel in enumerate(ranked[:n_rel], start=1):
            if is_rel:
                found += 1
                precision_sum += found / position
        out["mAP@R"][i] = precision_sum / n_rel
        out["R_precision"][i] = found / n_rel
    return out


def assert_per_query_equal(actual: dict, expected: dict) -> None:
    for key, values in expected.items():
        np.testing.assert_allclose(actual[key], values, rtol=0, atol=1e-12, err_msg=key)


@pytest.fixture
def tied_data():
    rng = np.random.default_rng(0)
    q = exact_embeddings(rng, 40, 6)
    g = exact_embeddings(rng, 150, 6)
    ql = rng.integers(0, 4, size=len(q))
    gl = rng.integers(0, 4, size=len(g))
    ql[:4] = [0, 1, 2, 3]  # both sides hold every label
    gl[:4] = [0, 1, 2, 3]
    return q, ql, g, gl


def test_tied_data_really_has_ties(tied_data):
    q, _, g, _ = tied_data
    scores = unit(q) @ unit(g).T
    assert all(len(np.unique(row)) < len(row) / 10 for row in scores)
    assert np.array_equal(scores * 4, np.round(scores * 4))  # exact multiples of 0.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracles_with_ties(tied_data, backend):
    q, ql, g, gl = tied_data
    per_query = per_query_metrics(q, ql, g, gl, topk=TOPK, backend=backend)
    expected = oracle(q, ql, g, gl)
    assert_per_query_equal(per_query, expected)
    means = retrieval_metrics(q, ql, g, gl, topk=TOPK, backend=backend)
    for key, values in expected.items():
        assert means[key] == pytest.approx(np.nanmean(values), abs=1e-12)
    assert means["num_queries"] == len(q) and means["num_queries_without_relevant"] == 0


def test_matches_oracles_without_ties():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(30, 16))
    g = rng.normal(size=(80, 16))
    ql, gl = rng.integers(0, 3, size=30), np.tile([0, 1, 2], 27)[:80]
    scores = np.sort(unit(q) @ unit(g).T, axis=1)
    assert np.diff(scores, axis=1).min() > 1e-6  # float32 rounding cannot reorder anything
    assert_per_query_equal(per_query_metrics(q, ql, g, gl, topk=TOPK), oracle(q, ql, g, gl))


def test_hand_worked_angles():
    angles = np.deg2rad([10, 20, 30, 40, 90])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    gallery_labels = np.array(["b", "a", "b", "a", "b"])
    query = np.array([[1.0, 0.0], [-1.0, 0.0]])  # at 0° (label a) and 180° (label b)
    query_labels = np.array(["a", "b"])
    out = per_query_metrics(query, query_labels, gallery, gallery_labels, topk=(1, 2, 3))
    # 0°: ranking b a b a b, R = 2.
    # 180°: ranking 90° b, 40° a, 30° b, 20° a, 10° b, R = 3.
    np.testing.assert_allclose(out["top1"], [0.0, 1.0])
    np.testing.assert_allclose(out["top2"], [1.0, 1.0])
    np.testing.assert_allclose(out["mAP"], [(1 / 2 + 2 / 4) / 2, (1 + 2 / 3 + 3 / 5) / 3])
    np.testing.assert_allclose(out["mAP@R"], [(1 / 2) / 2, (1 + 2 / 3) / 3])
    np.testing.assert_allclose(out["R_precision"], [1 / 2, 2 / 3])
    np.testing.assert_array_equal(out["num_relevant"], [2, 3])
    means = retrieval_metrics(query, query_labels, gallery, gallery_labels, topk=(1, 2))
    assert means["top1"] == 0.5 and means["mAP"] == pytest.approx((0.5 + 34 / 45) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_tie_is_pessimistic_for_topk_and_a_single_step_for_ap(backend):
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # two items tied at cos 1 (b, a), one at 0 (a)
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        out = retrieval_metrics(query, ["a"], gallery[order], np.array(["b", "a", "a"])[order], topk=(1, 2),
                                allow_label_mismatch=True, backend=backend)
        assert out["top1"] == 0.0 and out["top2"] == 1.0
        assert out["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # precision 1/2 after the tie, 2/3 after rank 3
        assert out["mAP@R"] == pytest.approx((1 / 2) / 2)
        assert out["R_precision"] == pytest.approx(1 / 2)


def test_collapsed_model_gets_chance_level():
    labels = np.repeat([0, 1, 2], 4)
    x = np.ones((12, 5))  # every score ties
    out = retrieval_metrics(x, labels, x, labels, leave_one_out=True, topk=(1, 8, 9))
    assert out["top1"] == 0.0 and out["top8"] == 0.0 and out["top9"] == 1.0  # 8 irrelevant items come first
    assert out["mAP"] == pytest.approx(3 / 11)  # one step: precision = prevalence
    assert out["mAP@R"] == 0.0 and out["R_precision"] == 0.0


def test_query_without_relevant_item_is_excluded_and_counted():
    rng = np.random.default_rng(1)
    q, g = exact_embeddings(rng, 12, 6), exact_embeddings(rng, 30, 6)
    ql, gl = rng.integers(0, 3, size=12), rng.integers(0, 3, size=30)
    ql[[2, 7]] = 9  # no gallery item has label 9
    gl[:3] = [0, 1, 2]
    out = retrieval_metrics(q, ql, g, gl, topk=TOPK, allow_label_mismatch=True)
    keep = ql != 9
    ref = retrieval_metrics(q[keep], ql[keep], g, gl, topk=TOPK, allow_label_mismatch=True)
    assert out["num_queries"] == 12 and out["num_queries_without_relevant"] == 2
    assert ref["num_queries"] == 10 and ref["num_queries_without_relevant"] == 0
    for key in ("top1", "top5", "mAP", "mAP@R", "R_precision"):
        assert out[key] == pytest.approx(ref[key], abs=1e-12)
    per_query = per_query_metrics(q, ql, g, gl, allow_label_mismatch=True)
    assert np.isnan(per_query["mAP"][[2, 7]]).all() and not np.isnan(per_query["mAP"][keep]).any()


def test_no_query_with_a_relevant_item_is_an_error():
    x = np.eye(3)
    with pytest.raises(EvalError, match="none of the 3 queries"):
        retrieval_metrics(x, [0, 0, 0], x, [1, 1, 1], allow_label_mismatch=True)
    with pytest.raises(EvalError, match="none of the 3 queries"):  # singletons under leave-one-out
        retrieval_metrics(x, [0, 1, 2], x, [0, 1, 2], leave_one_out=True)


def test_unequal_dimensions_truncate_and_renormalise_both_sides():
    # Gallery is 3-D; its third dimension carries most of item a's norm. Only after renormalising the
    # truncated gallery does item a (cos 1) beat item b (cos 0.9).
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[0.5, 0.0, 0.866], [0.9, 0.436, 0.0]])
    assert retrieval_metrics(query, ["a"], gallery, ["a", "b"], topk=(1,), allow_label_mismatch=True)["top1"] == 1.0
    assert retrieval_metrics(gallery, ["a", "b"], query, ["a"], topk=(1,), allow_label_mismatch=True)["top1"] == 1.0

    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(25, 12)), rng.normal(size=(60, 7))
    ql, gl = rng.integers(0, 3, size=25), np.arange(60) % 3
    by_hand = per_query_metrics(unit(q[:, :7]), ql, unit(g), gl, topk=TOPK)
    assert_per_query_equal(per_query_metrics(q, ql, g, gl, topk=TOPK), by_hand)
    assert_per_query_equal(per_query_metrics(g, gl, q, ql, topk=TOPK),
                           per_query_metrics(unit(g), gl, unit(q[:, :7]), ql, topk=TOPK))


def test_unequal_dimensions_match_the_oracle_with_ties():
    rng = np.random.default_rng(4)
    q = exact_embeddings(rng, 20, 9)
    g = np.concatenate([exact_embeddings(rng, 50, 6), rng.normal(size=(50, 3))], axis=1)  # extra dims dropped
    ql, gl = rng.integers(0, 3, size=20), np.arange(50) % 3
    assert_per_query_equal(per_query_metrics(q, ql, g, gl, topk=TOPK, allow_label_mismatch=True), oracle(q, ql, g, gl))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_by_position_and_by_ids(backend):
    rng = np.random.default_rng(5)
    x = exact_embeddings(rng, 60, 5)
    x[10] = x[11]  # a duplicate item: the query's own copy goes, its twin stays
    labels = rng.integers(0, 4, size=60)
    labels[59] = 7  # a singleton: no relevant item once its own is left out
    expected = oracle(x, labels, x, labels, own=np.arange(60))
    by_position = per_query_metrics(x, labels, x, labels, leave_one_out=True, topk=TOPK, backend=backend)
    assert_per_query_equal(by_position, expected)
    assert by_position["num_relevant"][59] == 0

    perm = rng.permutation(60)
    ids = np.arange(100, 160)
    by_ids = per_query_metrics(
        x, labels, x[perm], labels[perm], query_ids=ids, gallery_ids=ids[perm], leave_one_out=True, topk=TOPK, backend=backend
    )
    assert_per_query_equal(by_ids, expected)
    means = retrieval_metrics(x, labels, x, labels, leave_one_out=True)
    assert means["num_queries"] == 60 and means["num_queries_without_relevant"] == 1


def test_leave_one_out_by_ids_with_queries_outside_the_gallery():
    rng = np.random.default_rng(6)
    x = exact_embeddings(rng, 30, 5)
    labels = np.arange(30) % 3
    ids = np.array([f"img{i:03d}" for i in range(30)])
    query_ids = ids.copy()
    query_ids[:5] = [f"other{i}" for i in range(5)]  # these queries keep the whole gallery
    own = np.where(np.arange(30) < 5, -1, np.arange(30))
    out = per_query_metrics(x, labels, x, labels, query_ids=query_ids, gallery_ids=ids, leave_one_out=True, topk=TOPK)
    assert_per_query_equal(out, oracle(x, labels, x, labels, own=own))


def test_leave_one_out_changes_the_result():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 8))
    labels = np.arange(40) % 4
    assert retrieval_metrics(x, labels, x, labels)["top1"] == 1.0  # every query finds itself
    assert retrieval_metrics(x, labels, x, labels, leave_one_out=True)["top1"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gallery_permutation_and_batching_do_not_change_anything(tied_data, backend):
    q, ql, g, gl = tied_data
    reference = per_query_metrics(q, ql, g, gl, topk=TOPK, backend=backend)
    rng = np.random.default_rng(8)
    for _ in range(3):
        perm = rng.permutation(len(g))
        assert_per_query_equal(per_query_metrics(q, ql, g[perm], gl[perm], topk=TOPK, backend=backend), reference)
    for batch_size in (1, 7, 1000):
        assert_per_query_equal(per_query_metrics(q, ql, g, gl, topk=TOPK, batch_size=batch_size, backend=backend), reference)


def test_query_permutation_permutes_per_query_results(tied_data):
    q, ql, g, gl = tied_data
    reference = per_query_metrics(q, ql, g, gl, topk=TOPK)
    perm = np.random.default_rng(9).permutation(len(q))
    assert_per_query_equal(per_query_metrics(q[perm], ql[perm], g, gl, topk=TOPK), {k: v[perm] for k, v in reference.items()})


def test_string_and_integer_labels_agree(tied_data):
    q, ql, g, gl = tied_data
    names = np.array(["cat", "dog", "ship", "truck"])
    assert retrieval_metrics(q, names[ql], g, names[gl]) == retrieval_metrics(q, ql, g, gl)


def test_scale_does_not_matter(tied_data):
    q, ql, g, gl = tied_data
    # Powers of two keep the data exact; a common positive scale must change nothing.
    assert retrieval_metrics(q * 1024.0, ql, g.astype(np.float32) / 1024.0, gl) == retrieval_metrics(q, ql, g, gl)


def test_values_are_fractions_and_keys_follow_topk(tied_data):
    q, ql, g, gl = tied_data
    out = retrieval_metrics(q, ql, g, gl, topk=(3, 1, 3))
    assert tuple(out) == list_metrics((3, 1)) == (
        "top3", "top1", "mAP", "mAP@R", "R_precision", "num_queries", "num_queries_without_relevant"
    )
    assert all(0.0 <= out[key] <= 1.0 for key in ("top3", "top1", "mAP", "mAP@R", "R_precision"))
    assert isinstance(out["num_queries"], int) and all(isinstance(out[k], float) for k in ("top1", "mAP"))
    assert out["top1"] <= out["top3"]


def test_evaluator_selects_metrics_and_matches_the_function(tied_data):
    q, ql, g, gl = tied_data
    evaluator = RetrievalEvaluator(topk=[1, 5], include=["top1", "mAP", "mAP@R"], exclude=["mAP@R"])  # lists, as Hydra gives
    assert evaluator.topk == (1, 5) and evaluator.metric_names() == ("top1", "mAP")
    full = retrieval_metrics(q, ql, g, gl)
    assert evaluator(q, ql, g, gl) == {"top1": full["top1"], "mAP": full["mAP"]}
    assert RetrievalEvaluator(leave_one_out=True)(g, gl, g, gl) == retrieval_metrics(g, gl, g, gl, leave_one_out=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"include": ("top3",)}, "unknown retrieval metric"),
        ({"exclude": ("map",)}, "unknown retrieval metric"),
        ({"include": ("mAP",), "exclude": ("mAP",)}, "leave no metric"),
        ({"topk": (0,)}, "positive integers"),
        ({"batch_size": 0}, "batch_size"),
        ({"backend": "annoy"}, "unknown ranking backend"),
    ],
)
def test_evaluator_rejects_bad_options_at_construction(kwargs, match):
    with pytest.raises(EvalError, match=match):
        RetrievalEvaluator(**kwargs)


def _base():
    x = np.eye(4)[[0, 1, 2, 3, 0, 1]] + 0.1
    labels = np.array([0, 1, 2, 3, 0, 1])
    return {"query": x, "query_labels": labels, "gallery": x.copy(), "gallery_labels": labels.copy()}


def _with(**changes):
    args = _base()
    options = {k: v for k, v in changes.items() if k not in args}
    args.update({k: v for k, v in changes.items() if k in args})
    return args, options


def _nan_query():
    x = _base()["query"]
    x[2, 1] = np.nan
    return x


def _zero_after_truncation():
    x = np.concatenate([_base()["query"], np.zeros((6, 2))], axis=1)
    x[5] = [0, 0, 0, 0, 0, 3.0]  # nonzero only beyond the gallery's 4 dims
    return x


def _inf_gallery():
    x = _base()["gallery"]
    x[4, 0] = np.inf
    return x


ERROR_CASES = {
    "query 1-D": (_with(query=np.ones(6)), "2-D"),
    "gallery 3-D": (_with(gallery=np.ones((6, 4, 1))), "2-D"),
    "query NaN": (_with(query=_nan_query()), "NaN or Inf in 1 row"),
    "gallery Inf": (_with(gallery=_inf_gallery()), "NaN or Inf"),
    "complex": (_with(query=np.ones((6, 4), dtype=complex)), "real numbers"),
    "empty query": (_with(query=np.zeros((0, 4)), query_labels=np.zeros(0, dtype=int)), "empty"),
    "empty gallery": (_with(gallery=np.zeros((0, 4)), gallery_labels=np.zeros(0, dtype=int)), "empty"),
    "zero dims": (_with(query=np.zeros((6, 0))), "empty"),
    "query labels length": (_with(query_labels=np.arange(5)), "query_labels has 5 entries but there are 6"),
    "gallery labels length": (_with(gallery_labels=np.arange(7)), "gallery_labels has 7 entries"),
    "labels 2-D": (_with(query_labels=np.zeros((6, 1))), "1-D"),
    "query ids length": (_with(query_ids=np.arange(5)), "query_ids has 5 entries"),
    "gallery ids length": (_with(gallery_ids=np.arange(9)), "gallery_ids has 9 entries"),
    "duplicate gallery ids": (_with(gallery_ids=np.array([1, 2, 3, 4, 5, 1])), "duplicate ids"),
    "duplicate query ids": (_with(query_ids=np.array(["a", "b", "c", "d", "b", "e"])), "duplicate ids"),
    "k zero": (_with(topk=(1, 0)), "positive integers"),
    "k negative": (_with(topk=(-5,)), "positive integers"),
    "k not integer": (_with(topk=(1.5,)), "positive integers"),
    "batch size zero": (_with(batch_size=0), "batch_size"),
    "unknown backend": (_with(backend="annoy"), "unknown ranking backend"),
    "zero vector": (_with(query=_zero_after_truncation()), "query row 5 is a zero vector after truncation to 4 dims"),
    "loo position lengths": (_with(gallery=np.eye(5), gallery_labels=np.array([0, 1, 2, 3, 0]), leave_one_out=True), "6 and 5"),
    "loo one id side": (_with(query_ids=np.arange(6), leave_one_out=True), "both query_ids and gallery_ids"),
    "loo disjoint ids": (_with(query_ids=np.arange(6), gallery_ids=np.arange(6) + 10, leave_one_out=True), "no query id occurs"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_invalid_inputs_raise_one_line_eval_errors(case):
    (args, options), match = ERROR_CASES[case]
    with pytest.raises(EvalError, match=match) as info:
        retrieval_metrics(**args, **options)
    assert "\n" not in str(info.value)


def test_label_sets_that_differ_name_the_labels_on_each_side():
    args = _base()
    args["query_labels"] = np.array([0, 1, 2, 3, 0, 5])
    args["gallery_labels"] = np.array([0, 1, 2, 2, 0, 8])
    with pytest.raises(EvalError) as info:
        retrieval_metrics(**args)
    message = str(info.value)
    assert "query only: [3, 5]" in message and "gallery only: [8]" in message and "allow_label_mismatch" in message
    out = retrieval_metrics(**args, allow_label_mismatch=True)
    assert out["num_queries_without_relevant"] == 2


def test_ids_are_ignored_without_leave_one_out(tied_data):
    q, ql, g, gl = tied_data
    out = retrieval_metrics(q, ql, g, gl, query_ids=np.arange(len(q)), gallery_ids=np.arange(len(g)))
    assert out == retrieval_metrics(q, ql, g, gl)


@pytest.mark.slow
def test_ten_thousand_squared_backends_agree():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 10, size=10_000)
    x = rng.normal(size=(10_000, 64)).astype(np.float32) + 2.0 * np.eye(64, dtype=np.float32)[labels]
    faiss_out = retrieval_metrics(x, labels, x, labels, leave_one_out=True)
    numpy_out = retrieval_metrics(x, labels, x, labels, leave_one_out=True, backend="numpy")
    for key, value in faiss_out.items():
        assert value == pytest.approx(numpy_out[key], abs=1e-6), key
    assert not math.isnan(faiss_out["mAP"]) and faiss_out["num_queries"] == 10_000


def test_importing_the_metrics_needs_no_torch():
    # The index service and light tools use these metrics; torch must stay out of their import graph.
    code = "import sys; sys.modules['torch'] = None; import compatembed.eval; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
