"""Extracted embedding sets on disk, whole or in shards: the layout ``compatembed-extract`` writes.

A set is a directory holding ``embeddings.npy`` (N, D) float32, ``labels.npy`` (N,) int64,
``ids.npy`` (N,) int64 and ``meta.json``, written last (so a set without it is unfinished). A
gallery too large for one process is embedded in parts (``compatembed-extract shard=i
num_shards=n``, or one part per torchrun rank): part ``i`` of ``n`` is a set of its own in
``<out>/shard-i-of-n/`` holding a contiguous range of the split, and its ``meta.json`` says which
(``shard``, ``num_shards``, ``start``, ``stop``, ``total``).

:func:`read_embedding_set` reads either form. Parts are merged in order after checking that every
part is there and finished, that they agree on what they embedded (version, weights, dataset,
split) and that every id appears exactly once; an error names the missing parts and item ranges,
the duplicated ids, or the disagreeing key. numpy only: the index service (no torch) reads sets too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index.errors import InvalidInputError

META = "meta.json"
ARRAYS = ("embeddings", "labels", "ids")
SHARD_KEYS = ("shard", "num_shards", "start", "stop", "total", "count")
"""Keys of a part's ``meta.json`` that differ between parts (the rest must agree)."""
_SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_dir_name(shard: int, num_shards: int) -> str:
    """``shard-<i>-of-<n>``: the directory of part ``i`` of ``n`` inside a sharded set."""
    return f"shard-{int(shard)}-of-{int(num_shards)}"


@dataclass
class StoredSet:
    """The arrays and facts of an embedding set read from disk.

    Attributes:
        embeddings: (N, D) float32.
        labels: (N,) int64.
        ids: (N,) int64, each once.
        meta: ``meta.json`` (for a merged set: the parts' common facts, ``count`` and ``shards``).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    meta: dict[str, Any]


def is_embedding_set(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a set: a ``meta.json`` or ``shard-i-of-n`` parts."""
    p = Path(path)
    return (p / META).is_file() or bool(_shard_dirs(p))


def _shard_dirs(path: Path) -> dict[tuple[int, int], Path]:
    if not path.is_dir():
        return {}
    found = {}
    for child in path.iterdir():
        match = _SHARD_DIR.match(child.name)
        if match and child.is_dir():
            found[(int(match.group(1)), int(match.group(2)))] = child
    return found


def _read_one(path: Path) -> StoredSet:
    meta = json.loads((path / META).read_text())
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(path / f"{name}.npy", allow_pickle=False)
        except FileNotFoundError:
            raise InvalidInputError(f"{path} has a {META} but no {name}.npy (a partial copy?)") from None
        except ValueError as exc:
            raise InvalidInputError(f"{path / f'{name}.npy'} is not a plain .npy array: {exc}") from None
    n = len(arrays["ids"])
    if not (len(arrays["embeddings"]) == len(arrays["labels"]) == n == meta.get("count")):
        raise InvalidInputError(f"{path}: embeddings, labels and ids have different lengths (a partial write?)")
    return StoredSet(meta=meta, **arrays)


def _ranges(spans: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b - 1}" for a, b in spans)


def _merge(path: Path, parts: dict[tuple[int, int], Path]) -> StoredSet:
    counts = sorted({n for _, n in parts})
    if len(counts) > 1:
        names = ", ".join(sorted(p.name for p in parts.values()))
        raise InvalidInputError(f"{path} mixes parts of different shardings ({names}): remove the parts of the older run")
    n = counts[0]
    unfinished = sorted(p.name for p in parts.values() if not (p / META).is_file())
    if unfinished:
        raise InvalidInputError(f"{path}: {', '.join(unfinished)} has no {META}: its extraction has not finished")
    sets = {i: _read_one(p) for (i, _), p in sorted(parts.items())}
    totals = {int(s.meta.get("total", -1)) for s in sets.values()}
    if len(totals) != 1:
        raise InvalidInputError(f"{path}: the parts disagree on the split's size ({sorted(totals)})")
    total = totals.pop()
    missing = [i for i in range(n) if i not in sets]
    if missing:
        covered = sorted((int(s.meta["start"]), int(s.meta["stop"])) for s in sets.values())
        gaps, at = [], 0
        for start, stop in covered + [(total, total)]:
            if start > at:
                gaps.append((at, start))
            at = max(at, stop)
        raise InvalidInputError(
            f"{path}: missing shard(s) {', '.join(shard_dir_name(i, n) for i in missing)} of {n}: items "
            f"{_ranges(gaps)} of {total} were not embedded (run compatembed-extract shard=<i> num_shards={n})"
        )
    common = {k: v for k, v in sets[0].meta.items() if k not in SHARD_KEYS}
    for i, part in sets.items():
        for key in sorted(set(common) | {k for k in part.meta if k not in SHARD_KEYS}):
            if part.meta.get(key) != common.get(key) and not (key == "dim" and part.meta.get("count") == 0):
                raise InvalidInputError(
                    f"{path}: {shard_dir_name(i, n)} has {key}={part.meta.get(key)!r} but {shard_dir_name(0, n)} has "
                    f"{common.get(key)!r}: the parts come from different extractions"
                )
    ids = np.concatenate([s.ids for s in sets.values()])
    unique, times = np.unique(ids, return_counts=True)
    if (times > 1).any():
        repeated = unique[times > 1]
        owner = np.repeat(np.arange(n), [len(s.ids) for s in sets.values()])
        where = {int(i): sorted({int(owner[k]) for k in np.flatnonzero(ids == i)}) for i in repeated[:5]}
        shown = "; ".join(f"id {i} in {', '.join(shard_dir_name(s, n) for s in shards)}" for i, shards in where.items())
        raise InvalidInputError(f"{path}: {len(repeated)} id(s) appear more than once: {shown}")
    if len(ids) != total:
        raise InvalidInputError(f"{path}: the parts hold {len(ids)} items but the split has {total}")
    dims = {s.embeddings.shape[1] for s in sets.values() if len(s.ids)}
    return StoredSet(
        embeddings=np.concatenate([s.embeddings for s in sets.values() if len(s.ids)] or [np.zeros((0, 0), np.float32)]),
        labels=np.concatenate([s.labels for s in sets.values()]),
        ids=ids,
        meta={**common, "count": int(total), "dim": dims.pop() if dims else 0, "shards": n},
    )


def read_embedding_set(path: str | os.PathLike[str]) -> StoredSet:
    """The set in ``path``: a whole set, or the parts ``shard-i-of-n`` merged in order.

    Raises:
        InvalidInputError: ``path`` holds no set, holds both a whole set and parts, or the parts are
            incomplete or inconsistent (the message names the missing parts and item ranges, the
            duplicated ids and their parts, or the key the parts disagree on).
    """
    p = Path(path)
    parts = _shard_dirs(p)
    whole = (p / META).is_file()
    if whole and parts:
        raise InvalidInputError(f"{p} holds both a whole embedding set and shard parts: remove the one that is stale")
    if whole:
        return _read_one(p)
    if parts:
        return _merge(p, parts)
    raise InvalidInputError(
        f"{p} holds no extracted embeddings (no {META}, no shard-i-of-n parts); run compatembed-extract first"
    )
