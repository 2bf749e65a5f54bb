"""Checks at the numpy boundary: every array a caller sends is checked here and refused with a typed error.

These checks raise :class:`~compatembed_index.errors.InvalidInputError` (never ``assert``, which
``python -O`` strips), so the Python API, the CLI and HTTP all refuse the same inputs the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from compatembed_index.errors import DimensionMismatchError, InvalidInputError, LimitExceededError

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # always used with fullmatch: `$` admits a final newline
MAX_ID = 2**63 - 1
MAX_L2_NORM = 1e15
"""Largest L2 norm of a vector of an unnormalised (L2) version, stored or query: squared distances
(at most (2·1e15)² = 4e30) and the norms FAISS adds up then stay far inside float32, whose range ends
at 3.4e38. Beyond it a distance overflows to inf and FAISS silently drops the hit."""
MAX_CALIBRATION_SCALE = 1e6
MAX_CALIBRATION_SHIFT = 1e30
"""Bounds of a score calibration ``scale · score + shift``: with scores of at most 4e30 in magnitude
(see :data:`MAX_L2_NORM`; cosine scores lie in [-1, 1]) the calibrated score stays finite in float32."""
MAX_PATH_CHARS = 4096


def check_name(name: Any, what: str) -> str:
    """A collection or alias name: ``[A-Za-z0-9._-]``, 1–64 characters, not starting with a dot."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInputError(f"{what} name must match [A-Za-z0-9_-][A-Za-z0-9._-]{{0,63}}, got {name!r}")
    return name


def as_matrix(x: Any, dim: int, *, what: str, version: str, max_rows: int | None = None) -> np.ndarray:
    """Convert ``x`` to a C-contiguous float32 matrix (N, dim) with finite values.

    Raises:
        InvalidInputError: not a rectangular numeric 2-D array, empty, NaN/Inf.
        DimensionMismatchError: the second dimension is not ``dim``.
        LimitExceededError: more than ``max_rows`` rows.
    """
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{what} must be a rectangular numeric array ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"{what} must be a rectangular array of numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidInputError(f"{what} is empty")
    if max_rows is not None and arr.shape[0] > max_rows:
        raise LimitExceededError(f"{what} has {arr.shape[0]} rows, above the limit of {max_rows}")
    if arr.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have dim {arr.shape[1]} but version {version!r} has dim {dim}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(f"{what} row {bad} contains NaN or Inf (or a value beyond float32 range)")
    return out


def check_norms(x: np.ndarray, *, what: str) -> np.ndarray:
    """Refuse rows of an unnormalised (L2) version whose norm exceeds :data:`MAX_L2_NORM` (see there)."""
    norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    bad = np.flatnonzero(~(norms <= MAX_L2_NORM))
    if bad.size:
        raise InvalidInputError(
            f"{what} row {int(bad[0])} has L2 norm {norms[bad[0]]:.3g}, above the limit of {MAX_L2_NORM:g} for an "
            "unnormalised version: its squared distances would overflow float32"
        )
    return x


def normalize_rows(x: np.ndarray, *, what: str) -> np.ndarray:
    """L2-normalise rows of ``x`` (N, D) for a normalised version; a zero row has no direction and is refused."""
    # in float64: a float32 norm of finite rows overflows above ~1e19 (the row would become all zeros)
    # and underflows below ~1e-23 (a tiny but valid direction would be refused as a zero vector)
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    if not (norms > 0).all():
        bad = int(np.flatnonzero(norms[:, 0] <= 0)[0])
        raise InvalidInputError(f"{what} row {bad} is a zero vector: it has no direction under cosine similarity")
    return np.ascontiguousarray(x64 / norms, dtype=np.float32)


def as_ids(ids: Any, n: int | None = None, *, max_rows: int | None = None) -> np.ndarray:
    """Convert ``ids`` to a unique (N,) int64 array of ids in [0, 2**63 − 1].

    Raises:
        InvalidInputError: non-integers, out of range, a count different from ``n``, duplicates.
        LimitExceededError: more than ``max_rows`` ids.
    """
    if isinstance(ids, np.ndarray):
        arr = ids
    else:
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
            raise InvalidInputError(f"ids must be a list of integers, got {type(ids).__name__}")
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
            raise InvalidInputError("ids must be integers")
        if any(not 0 <= int(i) <= MAX_ID for i in ids):
            raise InvalidInputError(f"ids must lie in [0, {MAX_ID}]")
        arr = np.asarray([int(i) for i in ids], dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"ids must be a 1-D array of integers, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size == 0:
        raise InvalidInputError("ids is empty")
    if max_rows is not None and arr.size > max_rows:
        raise LimitExceededError(f"{arr.size} ids, above the batch limit of {max_rows}")
    if arr.dtype == np.uint64 and (arr > MAX_ID).any():
        raise InvalidInputError(f"ids must lie in [0, {MAX_ID}]")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise InvalidInputError(f"ids must lie in [0, {MAX_ID}], got {int(arr[arr < 0][0])}")
    if n is not None and arr.size != n:
        raise InvalidInputError(f"{arr.size} ids for {n} vectors")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dups = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"duplicate ids in the batch: {dups}")
    return arr


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of objects and lists in ``obj`` (iterative; stops counting past ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list, tuple)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((c, d + 1) for c in (o.values() if isinstance(o, dict) else o))
    return deepest


def as_metadata(metadata: Any, n: int, *, max_bytes: int | None = None,
                max_depth: int | None = None) -> list[str | None] | None:
    """Serialise per-item metadata (a list of JSON objects or None) to JSON strings.

    What is accepted can always be returned: every entry must encode as UTF-8 JSON (no lone surrogate,
    no NaN), nest at most ``max_depth`` objects and lists deep (deeper ones break the response
    encoder) and take at most ``max_bytes`` bytes.

    Raises:
        InvalidInputError: not a list of length ``n``, an entry that is not an object, not JSON-serialisable,
            not UTF-8-encodable, or too deep.
        LimitExceededError: an entry larger than ``max_bytes``.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, (list, tuple)) or len(metadata) != n:
        raise InvalidInputError(f"metadata must be a list with one entry (object or null) per item ({n})")
    out: list[str | None] = []
    for i, m in enumerate(metadata):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, dict):
            raise InvalidInputError(f"metadata[{i}] must be an object or null, got {type(m).__name__}")
        if max_depth is not None and _depth(m, max_depth) > max_depth:
            raise InvalidInputError(f"metadata[{i}] nests deeper than the limit of {max_depth} levels")
        try:
            text = json.dumps(m, allow_nan=False, sort_keys=True, ensure_ascii=False)
            encoded = text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
            reason = "it holds a lone surrogate, which UTF-8 cannot encode" if isinstance(exc, UnicodeError) else exc
            raise InvalidInputError(f"metadata[{i}] is not JSON-serialisable: {reason}") from None
        if max_bytes is not None and len(encoded) > max_bytes:
            raise LimitExceededError(
                f"metadata[{i}] takes {len(encoded)} bytes as JSON, above the limit max_metadata_bytes={max_bytes}"
            )
        out.append(json.dumps(m, allow_nan=False, sort_keys=True))
    return out


def check_path(path: Any, what: str = "path") -> str:
    """A filesystem path sent by a caller: a non-empty string the OS can take and JSON can carry back.

    Raises:
        InvalidInputError: not a string, empty, longer than 4096 characters, a NUL byte, a lone
            surrogate, or a component longer than 255 bytes.
    """
    import os

    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise InvalidInputError(f"{what} must be a non-empty string, got {type(path).__name__}")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidInputError(f"{what} has {len(path)} characters, above the limit of {MAX_PATH_CHARS}")
    if "\x00" in path:
        raise InvalidInputError(f"{what} contains a NUL character")
    try:
        parts = [p.encode("utf-8") for p in path.split("/")]
    except UnicodeEncodeError:
        raise InvalidInputError(f"{what} holds a lone surrogate: it is not valid Unicode") from None
    if any(len(p) > 255 for p in parts):
        raise InvalidInputError(f"{what} has a component longer than 255 bytes")
    return path


def check_k(k: Any, max_k: int) -> int:
    """``k`` as an int in [1, max_k]."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInputError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    if k > max_k:
        raise LimitExceededError(f"k={k} is above the limit of {max_k}")
    return int(k)


def check_slots(n_queries: int, k: int, max_slots: int | None) -> None:
    """Refuse a search whose ``queries × k`` result slots exceed ``max_slots`` (None: no limit)."""
    if max_slots is not None and n_queries * k > max_slots:
        raise LimitExceededError(
            f"{n_queries} queries × k={k} = {n_queries * k} result slots, above the limit max_result_slots={max_slots}"
        )


def check_float(v: Any, what: str) -> float:
    """A finite float."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise InvalidInputError(f"{what} must be a finite number, got {v!r}")
    return float(v)
