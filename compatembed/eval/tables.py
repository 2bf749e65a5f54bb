"""Markdown tables of retrieval metrics, laid out as the published code bases report them.

Metrics are stored as fractions in [0, 1] (as :mod:`compatembed.eval.retrieval` returns them) and shown here
in percent with one decimal, so the tables read like the BCT / BT² / FCT READMEs (old/old, new/new, new/old).
A value above 1 is refused rather than printed as 5000.0: it almost always means a caller already
multiplied by 100.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from compatembed.errors import EvalError
from compatembed.eval.compatibility import check_compatibility_matrix

_HEADERS = {"R_precision": "R-precision"}
_MISSING = "—"


def pair_table_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("top1", "top5", "mAP", "mAP@R")) -> str:
    """One line per (query model, gallery model) pair.

    Args:
        rows: dicts like ``{"query": "new", "gallery": "old", "top1": 0.5, ...}``; an optional ``"method"``
            key adds a leading Method column. A metric value of None or NaN prints as "—" (not measured);
            other keys (e.g. ``num_queries``) are ignored.
        metrics: the metric keys to show, in order; ``top{k}`` is headed ``top-k``.

    Returns:
        A GitHub-flavoured markdown table ending with a newline, values in percent with one decimal.

    Raises:
        EvalError: no rows or metrics, a row without ``query``/``gallery`` or one of ``metrics``, or a value
            outside [0, 1].

    Example:
        >>> print(pair_table_markdown([{"query": "new", "gallery": "old", "top1": 0.25, "mAP": 0.5}], ("top1", "mAP")), end="")
        | query/gallery | top-1 | mAP |
        |---|---:|---:|
        | new/old | 25.0 | 50.0 |
    """
    metrics = tuple(metrics)
    if not rows:
        raise EvalError("pair table needs at least one row")
    if not metrics:
        raise EvalError("pair table needs at least one metric")
    with_method = any("method" in row for row in rows)
    header = (["Method"] if with_method else []) + ["query/gallery"] + [_header(m) for m in metrics]
    align = (["---"] if with_method else []) + ["---"] + ["---:"] * len(metrics)
    lines = [_line(header), _rule(align)]
    for i, row in enumerate(rows):
        for key in ("query", "gallery", *metrics):
            if key not in row:
                raise EvalError(f"pair table row {i} has no {key!r} key (keys: {sorted(row)})")
        cells = [_escape(str(row.get("method", "")))] if with_method else []
        cells.append(f"{_escape(str(row['query']))}/{_escape(str(row['gallery']))}")
        cells += [_percent(row[m], f"row {i} {m!r}") for m in metrics]
        lines.append(_line(cells))
    return "\n".join(lines) + "\n"


def matrix_markdown(C: np.ndarray, names: Sequence[str], metric: str) -> str:
    """A compatibility matrix: row t = queries of model t, column j = gallery of model j, for j <= t.

    Args:
        C: (T, T) matrix of fractions, ``C[t][j] = M(φ_t, φ_j)``; entries above the diagonal are not shown.
        names: T model names, in the order of C's rows.
        metric: the metric's name, shown in the corner cell.

    Returns:
        A markdown table ending with a newline, values in percent with one decimal.

    Raises:
        EvalError: C is not square or has a non-finite entry on or below the diagonal, ``names`` has the
            wrong length, or a value is outside [0, 1].

    Example:
        >>> print(matrix_markdown([[0.5, float("nan")], [0.6, 0.7]], ["v1", "v2"], "mAP"), end="")
        | mAP (%), query ↓ gallery → | v1 | v2 |
        |---|---:|---:|
        | v1 | 50.0 |  |
        | v2 | 60.0 | 70.0 |
    """
    c = check_compatibility_matrix(C)
    t = c.shape[0]
    names = [str(n) for n in names]
    if len(names) != t:
        raise EvalError(f"matrix has {t} models but {len(names)} names were given")
    lines = [_line([f"{_escape(metric)} (%), query ↓ gallery →", *map(_escape, names)]), _rule(["---"] + ["---:"] * t)]
    for i in range(t):
        cells = [_percent(c[i, j], f"C[{i}][{j}]") if j <= i else "" for j in range(t)]
        lines.append(_line([_escape(names[i]), *cells]))
    return "\n".join(lines) + "\n"


def _header(metric: str) -> str:
    if metric.startswith("top") and metric[3:].isdigit():
        return f"top-{metric[3:]}"
    return _HEADERS.get(metric, metric)


def _percent(value: Any, where: str) -> str:
    if value is None:
        return _MISSING
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EvalError(f"{where} is not a number: {value!r}") from None
    if math.isnan(v):
        return _MISSING
    if not 0.0 <= v <= 1.0:
        raise EvalError(f"{where} = {v} is outside [0, 1]; metrics are fractions (tables multiply by 100)")
    return f"{100.0 * v:.1f}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(aligns: Sequence[str]) -> str:
    return "|" + "|".join(aligns) + "|"
