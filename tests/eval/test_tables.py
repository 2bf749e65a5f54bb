"""Markdown tables: exact renderings, percent rounding and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from compatembed.errors import EvalError
from compatembed.eval import matrix_markdown, pair_table_markdown

NAN = float("nan")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_pair_table_exact():
    rows = [
        {"query": "old", "gallery": "old", "top1": 0.336, "top5": 0.554, "mAP": 0.244, "mAP@R": 0.1, "num_queries": 10},
        {"query": "new", "gallery": "old", "top1": 0.3875, "top5": 0.64649, "mAP": 0.277, "mAP@R": 1 / 3},
        {"query": "new", "gallery": "new", "top1": 1.0, "top5": 0.0, "mAP": None, "mAP@R": NAN},
    ]
    assert pair_table_markdown(rows) == (
        "| query/gallery | top-1 | top-5 | mAP | mAP@R |\n"
        "|---|---:|---:|---:|---:|\n"
        "| old/old | 33.6 | 55.4 | 24.4 | 10.0 |\n"
        "| new/old | 38.8 | 64.6 | 27.7 | 33.3 |\n"
        "| new/new | 100.0 | 0.0 | — | — |\n"
    )


def test_pair_table_method_column_metric_choice_and_escaping():
    rows = [
        {"method": "BCT", "query": "new", "gallery": "old", "top1": 0.25, "R_precision": 0.5, "top10": 0.75},
        {"query": "a|b", "gallery": "old", "top1": 0.125, "R_precision": 0.5, "top10": 0.75},
    ]
    table = pair_table_markdown(rows, metrics=("top1", "top10", "R_precision"))
    lines = table.splitlines()
    assert _cells(lines[0]) == ["Method", "query/gallery", "top-1", "top-10", "R-precision"]
    assert _cells(lines[2]) == ["BCT", "new/old", "25.0", "75.0", "50.0"]
    assert lines[3] == "|  | a\\|b/old | 12.5 | 75.0 | 50.0 |"
    assert all(line.count("|") - line.count("\\|") == 6 for line in lines)


@pytest.mark.parametrize(
    "rows, metrics, match",
    [
        ([], ("top1",), "at least one row"),
        ([{"query": "new", "gallery": "old", "top1": 0.5}], (), "at least one metric"),
        ([{"query": "new", "top1": 0.5}], ("top1",), "row 0 has no 'gallery'"),
        ([{"query": "new", "gallery": "old", "top1": 0.5}], ("top1", "mAP"), "row 0 has no 'mAP'"),
        ([{"query": "new", "gallery": "old", "top1": 55.0}], ("top1",), "outside \\[0, 1\\]"),
        ([{"query": "new", "gallery": "old", "top1": -0.1}], ("top1",), "outside"),
        ([{"query": "new", "gallery": "old", "top1": "high"}], ("top1",), "not a number"),
    ],
)
def test_pair_table_refusals(rows, metrics, match):
    with pytest.raises(EvalError, match=match):
        pair_table_markdown(rows, metrics=metrics)


def test_matrix_exact():
    C = np.array([[0.308, NAN, NAN], [0.358, 0.606, 7.0], [0.0, 0.5, 0.6666]])
    assert matrix_markdown(C, ["v1", "v2", "v3"], "mAP") == (
        "| mAP (%), query ↓ gallery → | v1 | v2 | v3 |\n"
        "|---|---:|---:|---:|\n"
        "| v1 | 30.8 |  |  |\n"
        "| v2 | 35.8 | 60.6 |  |\n"
        "| v3 | 0.0 | 50.0 | 66.7 |\n"
    )


@pytest.mark.parametrize(
    "C, names, match",
    [
        ([[0.5, NAN], [0.6, 0.7]], ["v1"], "2 models but 1 names"),
        ([[0.5, NAN], [NAN, 0.7]], ["v1", "v2"], r"C\[1\]\[0\]"),
        ([[0.5, 0.1, 0.1]], ["v1"], "square"),
        ([[0.5, NAN], [1.5, 0.7]], ["v1", "v2"], "outside"),
    ],
)
def test_matrix_refusals(C, names, match):
    with pytest.raises(EvalError, match=match):
        matrix_markdown(C, names, "top1")
