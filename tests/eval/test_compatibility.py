"""Compatibility criterion, update gain, AC and AM on hand-built matrices with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from compatembed.errors import EvalError
from compatembed.eval import (
    average_compatibility,
    average_multimodel_accuracy,
    compatibility_criterion_matrix,
    empirical_compatibility,
    update_gain,
)

NAN = float("nan")


def test_empirical_compatibility_is_strict():
    assert empirical_compatibility(0.41, 0.40) is True
    assert empirical_compatibility(0.40, 0.40) is False  # a tie gains nothing over the old model
    assert empirical_compatibility(0.10, 0.40) is False
    assert empirical_compatibility(np.float32(0.5), np.float64(0.25)) is True


@pytest.mark.parametrize("bad", [NAN, float("inf"), "high", None])
def test_empirical_compatibility_rejects_non_numbers(bad):
    with pytest.raises(EvalError, match="cross"):
        empirical_compatibility(bad, 0.4)


def test_update_gain_known_values():
    assert update_gain(0.5, 0.3, 0.7) == pytest.approx(0.5)
    assert update_gain(0.3, 0.3, 0.7) == 0.0
    assert update_gain(0.7, 0.3, 0.7) == pytest.approx(1.0)
    assert update_gain(0.2, 0.3, 0.7) == pytest.approx(-0.25)
    assert update_gain(0.9, 0.3, 0.7) == pytest.approx(1.5)  # better than re-indexing with new*


def test_update_gain_zero_denominator_is_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(update_gain(0.5, 0.3, 0.3))
        assert math.isnan(update_gain(np.float32(0.5), np.float32(0.3), np.float32(0.3)))


def test_update_gain_rejects_nan():
    with pytest.raises(EvalError, match="independent_self"):
        update_gain(0.5, 0.3, NAN)


def test_three_versions_with_ties():
    # Pairs: (1,0) 0.6 > 0.5 yes; (2,0) 0.5 == 0.5 no (tie); (2,1) 0.7 == 0.7 no (tie).
    C = [[0.5, NAN, NAN], [0.6, 0.7, NAN], [0.5, 0.7, 0.8]]
    expected = np.array([[False, False, False], [True, False, False], [False, False, False]])
    np.testing.assert_array_equal(compatibility_criterion_matrix(C), expected)
    assert compatibility_criterion_matrix(C).dtype == bool
    assert average_compatibility(C) == pytest.approx(1 / 3)
    assert average_multimodel_accuracy(C) == pytest.approx((0.5 + 0.6 + 0.7 + 0.5 + 0.7 + 0.8) / 6)


def test_genuine_zeros_count_in_am_and_upper_triangle_is_ignored():
    C = np.array([[0.4, 123.0], [0.0, 0.6]])  # the new model retrieves nothing from the old gallery
    assert average_multimodel_accuracy(C) == pytest.approx(1 / 3)  # zeros-as-NaN would give 0.5
    assert average_compatibility(C) == 0.0
    assert average_multimodel_accuracy([[0.0, NAN], [0.0, 0.0]]) == 0.0


def test_all_compatible_and_single_version():
    C = [[0.1, NAN, NAN], [0.2, 0.3, NAN], [0.3, 0.4, 0.5]]
    assert average_compatibility(C) == 1.0
    assert math.isnan(average_compatibility([[0.7]]))
    assert average_multimodel_accuracy([[0.7]]) == pytest.approx(0.7)
    np.testing.assert_array_equal(compatibility_criterion_matrix([[0.7]]), [[False]])


def test_random_matrices_against_loops():
    rng = np.random.default_rng(0)
    for t in range(1, 7):
        C = np.round(rng.uniform(size=(t, t)), 1)  # rounding creates ties with the diagonal
        C[np.triu_indices(t, k=1)] = NAN
        pairs = [(i, j) for i in range(t) for j in range(i)]
        hits = [C[i][j] > C[j][j] for i, j in pairs]
        lower = [C[i][j] for i in range(t) for j in range(i + 1)]
        criterion = compatibility_criterion_matrix(C)
        for i in range(t):
            for j in range(t):
                assert criterion[i, j] == (j < i and C[i][j] > C[j][j])
        if pairs:
            assert average_compatibility(C) == pytest.approx(sum(hits) / len(pairs))
        assert average_multimodel_accuracy(C) == pytest.approx(sum(lower) / len(lower))


@pytest.mark.parametrize(
    "C, match",
    [
        (np.ones((2, 3)), "square"),
        (np.ones(3), "square"),
        (np.ones((0, 0)), "empty"),
        ([[0.5, NAN], [NAN, 0.6]], r"C\[1\]\[0\]"),
        ([[float("inf"), NAN], [0.5, 0.6]], r"C\[0\]\[0\]"),
        ([["a", "b"], ["c", "d"]], "numeric"),
    ],
)
def test_invalid_matrices(C, match):
    for fn in (average_compatibility, average_multimodel_accuracy, compatibility_criterion_matrix):
        with pytest.raises(EvalError, match=match):
            fn(C)
