"""Durability: SQLite settings, restart = snapshot + replay, corrupt snapshots, SIGKILL'd writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.errors import DataDirLockedError, ManifestError
from compatembed_index.snapshot import list_snapshots

from index_helpers import Chain

HERE = Path(__file__).resolve().parent


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path / "versions")


def _open(chain, data_dir, factory="Flat", **kw):
    svc = IndexService(data_dir, **kw)
    for d in chain.dirs.values():
        svc.register_version(d)
    if "g" not in svc.list_collections():
        # search parameters wide enough that approximate indexes answer exactly on this small data,
        # so results before and after a restart (graphs rebuilt in another order) can be compared
        params = {"HNSW8": "efSearch=512", "IVF4,Flat": "nprobe=4"}.get(factory, "")
        svc.create_collection("g", factory=factory, search_params=params, train_size=100)
    return svc


def _mutate(svc, rng, start):
    """A mixed stream of writes: adds in three versions, an upsert, an upgrade, a delete."""
    for v, d in (("v1", 16), ("v2", 24), ("v3", 32)):
        svc.add("g", v, np.arange(start, start + 60) + {"v1": 0, "v2": 1000, "v3": 2000}[v],
                rng.normal(size=(60, d)), [{"v": v}] * 60)
    svc.add("g", "v2", np.arange(start, start + 5), rng.normal(size=(5, 24)), upsert=True)
    svc.upgrade("g", "v3", np.arange(start + 10, start + 20), rng.normal(size=(10, 32)))
    svc.delete("g", np.arange(start + 1030, start + 1040))


def _state(svc, q):
    res = svc.search("g", "v3", q, k=20)
    coll = svc.collection("g")
    return res.ids.copy(), res.scores.copy(), {v: s["ntotal"] for v, s in svc.stats("g")["segments"].items()}, len(coll)


def test_sqlite_runs_wal_with_full_sync(chain, tmp_path):
    svc = _open(chain, tmp_path / "d")
    conn = svc.store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    svc.close()


def test_one_process_per_data_dir(chain, tmp_path):
    svc = _open(chain, tmp_path / "d")
    with pytest.raises(DataDirLockedError, match="in use by another process"):
        IndexService(tmp_path / "d")
    svc.close()
    IndexService(tmp_path / "d").close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF4,Flat"])
def test_restart_replays_writes_after_the_snapshot(chain, tmp_path, factory):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(10, 32)).astype(np.float32)
    svc = _open(chain, tmp_path / "d", factory=factory)
    _mutate(svc, rng, 0)
    svc.materialise("g", "v1", "v3")
    svc.snapshot("g")
    _mutate(svc, rng, 100)  # after the snapshot: replayed from the store at restart
    before = _state(svc, q)
    svc.close()
    svc = _open(chain, tmp_path / "d", factory=factory)
    st = svc.stats("g")
    assert st["load_report"] == [] and st["snapshot_seq"] < st["applied_seq"]
    after = _state(svc, q)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)
    assert after[2:] == before[2:]
    assert st["materialised"][0]["ntotal"] == before[2]["v1"]
    svc.close()


def test_restart_without_snapshot_rebuilds_from_the_store(chain, tmp_path):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(10, 32)).astype(np.float32)
    svc = _open(chain, tmp_path / "d")
    _mutate(svc, rng, 0)
    before = _state(svc, q)
    svc.close()
    svc = _open(chain, tmp_path / "d")
    after = _state(svc, q)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2:] == before[2:] and svc.stats("g")["snapshot_seq"] is None
    svc.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "delete"])
def test_corrupt_snapshot_is_reported_and_rebuilt(chain, tmp_path, damage):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(10, 32)).astype(np.float32)
    svc = _open(chain, tmp_path / "d")
    _mutate(svc, rng, 0)
    snap = svc.snapshot_paths("g")[0]
    before = _state(svc, q)
    svc.close()
    seg = snap / "seg-0.faiss"
    if damage == "flip":
        data = bytearray(seg.read_bytes())
        data[len(data) // 2] ^= 0x55
        seg.write_bytes(bytes(data))
    elif damage == "truncate":
        seg.write_bytes(seg.read_bytes()[:100])
    elif damage == "manifest":
        (snap / "manifest.json").write_text("{not json")
    else:
        seg.unlink()
    svc = _open(chain, tmp_path / "d")
    report = svc.stats("g")["load_report"]
    # named relative to the snapshot root: the report is served by GET /collections/{name}
    assert len(report) == 1 and "quarantined" in report[0] and f"g/{snap.name}" in report[0]
    assert str(tmp_path) not in report[0]
    assert snap.with_name(snap.name + ".corrupt").is_dir() and not snap.exists()
    after = _state(svc, q)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2:] == before[2:]
    svc.close()


def test_falls_back_to_an_older_snapshot_and_replays_deletes(chain, tmp_path):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(10, 32)).astype(np.float32)
    svc = _open(chain, tmp_path / "d")
    _mutate(svc, rng, 0)
    old = svc.snapshot_paths("g")[0]
    _mutate(svc, rng, 100)  # includes deletes, which must survive compaction
    new = svc.snapshot_paths("g")[0]
    before = _state(svc, q)
    svc.close()
    assert [p.name for p in list_snapshots(tmp_path / "d" / "snapshots", "g")] == [old.name, new.name]
    (new / "seg-1.faiss").write_bytes(b"garbage")
    svc = _open(chain, tmp_path / "d")
    assert svc.stats("g")["snapshot_seq"] == int(old.name)
    after = _state(svc, q)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2:] == before[2:]
    svc.close()


def test_snapshot_keeps_only_the_newest(chain, tmp_path):
    svc = _open(chain, tmp_path / "d", keep_snapshots=2)
    rng = np.random.default_rng(4)
    for i in range(4):
        svc.add("g", "v1", [i], rng.normal(size=(1, 16)))
        svc.snapshot("g")
    assert len(list_snapshots(tmp_path / "d" / "snapshots", "g")) == 2
    assert not list((tmp_path / "d" / "snapshots" / "g").glob(".*tmp*"))
    svc.close()


def test_checksum_mismatch_at_register_leaves_nothing_behind(chain, tmp_path):
    svc = IndexService(tmp_path / "d")
    (chain.dirs["v2"] / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ManifestError, match="checksum mismatch"):
        svc.register_version(chain.dirs["v2"])
    svc.close()
    svc = IndexService(tmp_path / "d")
    assert svc.versions() == []
    svc.close()


def test_sigkilled_writer_loses_nothing_acknowledged(chain, tmp_path):
    data_dir = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    acked_add, acked_del = [], []
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_writer.py"), str(data_dir), str(chain.dirs["v1"])],
                            stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(acked_add) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, b = line.split()
            (acked_add if kind == "add" else acked_del).append(int(b))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(acked_add) >= 10, "the writer did not get going"
    from kill_writer import BATCH, vectors

    svc = IndexService(data_dir)
    coll = svc.collection("g")
    expected = set()
    for b in acked_add:
        expected |= set(range(b * BATCH, (b + 1) * BATCH))
    for b in acked_del:
        expected -= set(range(b * BATCH, b * BATCH + 5))
    last = max(acked_add)
    maybe_deleted: set[int] = set()
    if last % 4 == 3 and last - 2 not in acked_del:  # a delete may have committed before its ack was read
        maybe_deleted = set(range((last - 2) * BATCH, (last - 2) * BATCH + 5))
    expected -= maybe_deleted
    present = set(coll._where)
    assert expected <= present, f"lost acknowledged items: {sorted(expected - present)[:10]}"
    deleted_acked = {i for b in acked_del for i in range(b * BATCH, b * BATCH + 5)}
    assert not present & deleted_acked, "an acknowledged delete was undone"
    # beyond that, only the batch in flight may be there unacknowledged, and then whole (a transaction)
    in_flight = set(range((last + 1) * BATCH, (last + 2) * BATCH))
    extra = present - expected
    assert extra - in_flight - maybe_deleted == set()
    assert not extra & in_flight or in_flight <= present
    # nothing duplicated: the index holds each live item exactly once, under its own vector
    seg = coll.segments["v1"]
    seg_ids = seg.ids()
    assert len(seg_ids) == len(set(seg_ids.tolist())) == len(present)
    b = max(acked_add)
    res = svc.search("g", "v1", vectors(b), k=1)
    assert res.ids[:, 0].tolist() == list(range(b * BATCH, (b + 1) * BATCH))
    svc.close()
