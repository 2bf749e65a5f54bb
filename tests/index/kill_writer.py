"""A writer process for the SIGKILL test: writes forever and prints each acknowledged write.

Usage: python kill_writer.py DATA_DIR VERSION_DIR

Batch ``b`` adds ids ``b*20 .. b*20+19`` with vectors drawn from ``default_rng(b)``; every 4th batch
also deletes the first 5 ids of batch ``b-2``; every 6th batch writes a snapshot (so a kill can land
in the middle of one). A line is printed (and flushed) only after the call returned, i.e. after the
write was durable: ``add b``, ``del b-2``.
"""

from __future__ import annotations

import sys

import numpy as np

from compatembed_index.api import IndexService

BATCH = 20


def vectors(b: int) -> np.ndarray:
    """The (BATCH, 16) vectors of batch ``b``."""
    return np.random.default_rng(b).normal(size=(BATCH, 16)).astype(np.float32)


def main() -> None:
    data_dir, version_dir = sys.argv[1], sys.argv[2]
    svc = IndexService(data_dir)
    svc.register_version(version_dir)
    if "g" not in svc.list_collections():
        svc.create_collection("g", factory="HNSW8")
    b = 0
    while True:
        svc.add("g", "v1", np.arange(b * BATCH, (b + 1) * BATCH), vectors(b), [{"b": b}] * BATCH)
        print(f"add {b}", flush=True)
        if b % 4 == 3:
            svc.delete("g", np.arange((b - 2) * BATCH, (b - 2) * BATCH + 5))
            print(f"del {b - 2}", flush=True)
        if b % 6 == 5:
            svc.snapshot("g")
        b += 1


if __name__ == "__main__":
    main()
