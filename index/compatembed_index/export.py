"""Copy a gallery between backends (FAISS/SQLite ⇄ Milvus) with a count check.

Versions, the collection's config, every item (vector, version, metadata), forward copies and score
calibrations are copied; the per-version counts of the target must then equal the source's, or the
copy is reported as failed (:class:`~compatembed_index.errors.ConflictError`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from compatembed_index.api import IndexService
from compatembed_index.errors import ConflictError


def iter_items(svc: IndexService, name: str, version: str, batch: int = 4096
               ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str | None]]]:
    """(ids, vectors, metadata JSON) of one version's items, in batches, from either backend."""
    coll: Any = svc.collection(name)
    if svc.backend == "milvus":
        key = coll.spaces.name((version,))
        it = coll.client.query_iterator(key, batch_size=batch, filter="", output_fields=["id", "vec", "meta"])
        try:
            while page := it.next():
                yield (np.array([int(r["id"]) for r in page], np.int64), np.array([r["vec"] for r in page], np.float32),
                       [r.get("meta") for r in page])
        finally:
            it.close()
        return
    for rows in svc.store.iter_rows(coll.name, version=version):  # type: ignore[attr-defined]
        yield rows.ids, rows.matrix, rows.metadata


def counts(svc: IndexService, name: str) -> dict[str, int]:
    """Items per version of a collection, as its stats give them."""
    return {v: int(s["ntotal"]) for v, s in svc.stats(name)["segments"].items() if s["ntotal"]}


def copy_collection(src: IndexService, dst: IndexService, name: str, *, target: str | None = None,
                    batch: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Copy collection ``name`` of ``src`` into ``dst`` (as ``target``, default the same name).

    Returns:
        ``{collection, items, counts}``.

    Raises:
        ConflictError: the target collection exists, or the counts differ after the copy.
    """
    from tqdm import tqdm

    target = target or name
    for v in src.registry.list():
        if v.version_id not in dst.registry:
            dst.import_version(v.manifest, v.files)
    cfg = src.collection(name).config.to_dict()
    dst.create_collection(target, **{k: v for k, v in cfg.items() if k not in ("materialised", "calibration")})
    want = counts(src, name)
    bar = tqdm(total=sum(want.values()), unit="item", desc=f"{name} → {target}", disable=not progress,
               file=sys.stderr)
    for version in sorted(want):
        for ids, x, meta in iter_items(src, name, version, batch):
            dst.add(target, version, ids, x, [None if m is None else json.loads(m) for m in meta], upsert=True)
            bar.update(len(ids))
    bar.close()
    for s, t in cfg.get("materialised", []):
        dst.materialise(target, s, t)
    for key, (scale, shift) in cfg.get("calibration", {}).items():
        qv, sv = key.split("|", 1)
        dst.set_calibration(target, qv, sv, scale, shift)
    got = counts(dst, target)
    if got != want:
        raise ConflictError(f"copy of {name!r} is incomplete: the source holds {want} items per version, "
                            f"the target {got}")
    return {"collection": target, "items": sum(got.values()), "counts": got}
