"""The Milvus backend against the FAISS backend and the oracle: identical results on a mixed three-version
gallery, consistent searches during a running backfill, restart, replicas sharing one gallery, repair
of a half-done move, and clear refusals.

Every test runs twice: on milvus-lite in its temporary directory, and on a real Milvus server process
on 127.0.0.1 started once for the module (the ``milvus`` package's standalone server, else
``milvus-lite server``; skipped with the reason when neither starts)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.errors import ConfigError, DuplicateIdError, ItemNotFoundError

from index_helpers import Chain, assert_same_topk, milvus_server, milvus_service, oracle_topk

SIZES = {"v1": (150, Chain.D1), "v2": (100, Chain.D2), "v3": (60, Chain.D3)}
OFFSET = {"v1": 0, "v2": 10_000, "v3": 2**40}


@pytest.fixture(scope="module", params=["lite", "server"])
def uri(request, tmp_path_factory):
    """None: milvus-lite in each test's temporary directory; else the URI of the module's Milvus server."""
    if request.param == "lite":
        yield None
    else:
        yield from milvus_server(tmp_path_factory.mktemp("milvus-server"))


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path / "versions")


def _register(svc, chain):
    for d in chain.dirs.values():
        svc.register_version(d)
    return svc


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return {v: (np.arange(n, dtype=np.int64) + OFFSET[v], rng.normal(size=(n, d)).astype(np.float32))
            for v, (n, d) in SIZES.items()}


def _fill(svc, data):
    svc.create_collection("g")
    for v, (ids, x) in data.items():
        svc.add("g", v, ids, x, [{"v": v, "i": int(i)} for i in ids])


def test_same_results_as_faiss_and_the_oracle_on_three_versions(chain, uri, tmp_path):
    data = _data()
    faiss_svc = _register(IndexService(None), chain)
    milvus_svc = _register(milvus_service(tmp_path, uri), chain)
    q = np.random.default_rng(7).normal(size=(12, Chain.D3)).astype(np.float32)
    for svc in (faiss_svc, milvus_svc):
        _fill(svc, data)
    ref_i, ref_s = oracle_topk({v: chain.q_to(q, v) for v in data}, data, 10)
    a = faiss_svc.search("g", "v3", q, k=10)
    b = milvus_svc.search("g", "v3", q, k=10)
    assert a.routes == b.routes == {"v1": "query:v3>v2>v1", "v2": "query:v3>v2", "v3": "direct"}
    assert_same_topk(b.ids, b.scores, ref_i, ref_s)
    assert_same_topk(b.ids, b.scores, a.ids, a.scores)
    assert b.versions == a.versions and b.metadata == a.metadata
    # a partial backfill and a forward copy change both backends alike
    moved = data["v1"][0][:40]
    new = np.random.default_rng(8).normal(size=(40, Chain.D3)).astype(np.float32)
    for svc in (faiss_svc, milvus_svc):
        svc.upgrade("g", "v3", moved, new)
        svc.materialise("g", "v1", "v3")
        svc.set_calibration("g", "v3", "v2", 0.9, 0.05)
    a = faiss_svc.search("g", "v3", q, k=10)
    b = milvus_svc.search("g", "v3", q, k=10)
    assert b.routes == a.routes and b.routes["v1"] == "copy:v1>v3"
    assert_same_topk(b.ids, b.scores, a.ids, a.scores)
    assert milvus_svc.versions_of("g", moved[:3]) == ["v3"] * 3
    assert milvus_svc.stats("g")["items"] == faiss_svc.stats("g")["items"] == sum(n for n, _ in SIZES.values())
    faiss_svc.close()
    milvus_svc.close()


def test_searches_during_a_backfill_never_see_an_item_twice_or_miss_one(chain, uri, tmp_path):
    """Every item is a unit vector; a v3 query equal to one stored item, searched with k = every item,
    must return each id exactly once, whichever segment holds it at that moment."""
    svc = _register(milvus_service(tmp_path, uri, move_grace_s=0.5), chain)
    svc.create_collection("g")
    rng = np.random.default_rng(3)
    n = 60
    ids = np.arange(n, dtype=np.int64)
    svc.add("g", "v1", ids, rng.normal(size=(n, Chain.D1)).astype(np.float32))
    new = rng.normal(size=(n, Chain.D3)).astype(np.float32)
    q = rng.normal(size=(2, Chain.D3)).astype(np.float32)
    problems: list[str] = []
    done = threading.Event()

    def backfill():
        try:
            for lo in range(0, n, 10):
                svc.upgrade("g", "v3", ids[lo:lo + 10], new[lo:lo + 10])
        finally:
            done.set()

    t = threading.Thread(target=backfill)
    t.start()
    searches = 0
    while not done.is_set() or searches == 0:
        res = svc.search("g", "v3", q, k=n, include_metadata=False)
        searches += 1
        for row in res.ids:
            got = row[row >= 0].tolist()
            if sorted(got) != ids.tolist():
                problems.append(f"search {searches}: {len(got)} hits, {len(set(got))} distinct of {n}")
    t.join()
    assert searches >= 3, "the backfill finished before searches overlapped it"
    assert not problems, problems[:5]
    assert svc.versions_of("g", ids) == ["v3"] * n
    svc.close()


def test_restart_keeps_items_configs_aliases_and_versions(chain, uri, tmp_path):
    data = _data()
    svc = _register(milvus_service(tmp_path, uri), chain)
    _fill(svc, data)
    svc.upgrade("g", "v3", data["v1"][0][:5], np.ones((5, Chain.D3), np.float32))
    svc.materialise("g", "v1", "v3")
    svc.set_alias("live", "g")
    q = np.random.default_rng(9).normal(size=(4, Chain.D3)).astype(np.float32)
    before = svc.search("live", "v3", q, k=8)
    svc.close()
    again = milvus_service(tmp_path, uri)  # nothing registered: everything comes back from Milvus
    assert [v["version_id"] for v in again.versions()] == sorted(chain.dirs)
    assert again.aliases() == {"live": "g"}
    after = again.search("live", "v3", q, k=8)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert after.routes == before.routes and after.metadata == before.metadata
    assert again.versions_of("g", data["v1"][0][:6]) == ["v3"] * 5 + ["v1"]
    again.close()


def test_two_replicas_serve_one_gallery(chain, uri, tmp_path):
    a = _register(milvus_service(tmp_path, uri, catalog_ttl_s=0.0), chain)
    b = milvus_service(tmp_path, uri, catalog_ttl_s=0.0)  # a second replica: no state of its own
    a.create_collection("g")
    a.add("g", "v1", [1, 2], np.eye(2, Chain.D1, dtype=np.float32), [{"a": 1}, None])
    assert b.versions_of("g", [1, 2, 3]) == ["v1", "v1", None]  # written by a, read by b
    with pytest.raises(DuplicateIdError):
        b.add("g", "v1", [2], np.ones((1, Chain.D1), np.float32))
    b.upgrade("g", "v3", [1], np.ones((1, Chain.D3), np.float32))
    assert a.versions_of("g", [1]) == ["v3"]
    a.set_alias("live", "g")
    hits = b.search("live", "v3", np.ones((1, Chain.D3)), k=1).hits(0)
    assert hits[0]["id"] == 1 and hits[0]["metadata"] == {"a": 1}  # metadata kept across the move
    a.close()
    b.close()


def test_a_move_cut_short_is_seen_once_and_repaired(chain, uri, tmp_path):
    svc = _register(milvus_service(tmp_path, uri), chain)
    svc.create_collection("g")
    svc.add("g", "v1", [7], np.ones((1, Chain.D1), np.float32), [{"k": 7}])
    coll = svc.collection("g")
    # what a writer that died between the insert and the delete leaves: the item in v1 and in v3
    coll._ensure(("v3",))
    coll.spaces._upsert(("v3",), np.array([7]), np.ones((1, Chain.D3), np.float32), coll.spaces.next_seq(),
                        ['{"k": 7}'])
    assert svc.versions_of("g", [7]) == ["v3"]  # the newer write wins
    res = svc.search("g", "v3", np.ones((1, Chain.D3)), k=5)
    assert res.ids[0].tolist().count(7) == 1
    assert svc.repair("g") == 1
    assert svc.stats("g")["segments"]["v1"]["ntotal"] == 0
    assert svc.stats("g")["items"] == 1
    svc.close()


def test_bad_backend_settings_are_refused_by_name(chain, uri, tmp_path):
    with pytest.raises(ConfigError, match="backend must be one of faiss, milvus"):
        IndexService(None, backend="qdrant")
    with pytest.raises(ConfigError, match="needs a Milvus URI"):
        IndexService(None, backend="milvus")
    svc = _register(milvus_service(tmp_path, uri), chain)
    with pytest.raises(ConfigError, match="no Milvus counterpart"):
        svc.create_collection("pq", factory="IVF16,PQ4")
    assert "pq" not in svc.list_collections()
    svc.create_collection("h", factory="HNSW16", search_params="efSearch=32")
    svc.add("h", "v1", [1], np.ones((1, Chain.D1), np.float32))
    with pytest.raises(ItemNotFoundError):
        svc.upgrade("h", "v3", [2], np.ones((1, Chain.D3), np.float32))
    assert svc.search("h", "v1", np.ones((1, Chain.D1)), k=1).ids[0, 0] == 1
    svc.close()


def test_cli_exports_to_milvus_and_back_with_the_same_answers(chain, uri, tmp_path, capsys, monkeypatch):
    import hashlib
    import json

    from compatembed_index.cli import _settings, build_parser, main

    milvus_service(tmp_path, uri).close()  # skips when the Milvus extra is missing
    if uri is not None:  # this test's own namespace on the shared server
        monkeypatch.setenv("COMPATEMBED_INDEX_MILVUS_PREFIX", "x" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12] + "_")
    data = _data()
    local = _register(IndexService(tmp_path / "faiss"), chain)
    _fill(local, data)
    local.materialise("g", "v1", "v3")
    local.close()
    uri = uri or str(tmp_path / "export.db")
    assert main(["--data-dir", str(tmp_path / "faiss"), "export", "g", "--to-milvus", uri, "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {v: n for v, (n, _) in SIZES.items()}
    assert main(["--data-dir", str(tmp_path / "back"), "export", "g", "--from-milvus", uri, "--as", "h",
                 "--no-progress"]) == 0
    capsys.readouterr()
    q = np.random.default_rng(4).normal(size=(3, Chain.D3)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    answers = []
    for args in (["--data-dir", str(tmp_path / "faiss"), "search", "g"],
                 ["--backend", "milvus", "--milvus-uri", uri, "search", "g"],
                 ["--data-dir", str(tmp_path / "back"), "search", "h"]):
        assert main([*args, "--version", "v3", "--queries", str(tmp_path / "q.npy"), "-k", "5"]) == 0
        out = json.loads(capsys.readouterr().out)
        answers.append(([[h["id"] for h in r] for r in out["results"]], out["routes"]))
    assert answers[0] == answers[1] == answers[2] and answers[0][1]["v1"] == "copy:v1>v3"
    # a second export into the same name is refused, and serve takes the backend flags
    assert main(["--data-dir", str(tmp_path / "faiss"), "export", "g", "--to-milvus", uri, "--no-progress"]) == 2
    assert "already used" in capsys.readouterr().err
    s = _settings(build_parser().parse_args(["serve", "--backend", "milvus", "--milvus-uri", uri]))
    assert (s.backend, s.milvus_uri) == ("milvus", uri)
    with pytest.raises(Exception, match="needs milvus_uri"):
        _settings(build_parser().parse_args(["serve", "--backend", "milvus"]))


def test_a_slow_search_pass_is_run_again_only_while_items_move(chain, uri, tmp_path, caplog):
    """Every pass is slower than a grace of 1 µs: it must be served at once unless a recorded move overlaps it."""
    import logging

    svc = _register(milvus_service(tmp_path, uri, move_grace_s=1e-6), chain)
    svc.create_collection("g")
    svc.add("g", "v1", [1, 2, 3], np.eye(3, Chain.D1, dtype=np.float32))
    svc.upgrade("g", "v3", [3], np.ones((1, Chain.D3), np.float32))  # a real move, ended
    assert [end is not None for _, end in svc.store.moves("g").values()] == [True]
    q = np.ones((1, Chain.D3), np.float32)

    def reruns() -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="compatembed_index.milvus.collection"):
            res = svc.search("g", "v3", q, k=3)
        assert sorted(res.ids[0].tolist()) == [1, 2, 3]
        return sum("while items moved" in r.getMessage() for r in caplog.records)

    assert reruns() == 0
    svc.store.begin_move("g", 1)  # a writer moving items now, or one that died doing so
    assert reruns() == 4  # every pass, the last one served with a warning
    assert svc.repair("g") == 0  # nothing half moved; the dead writer's record is forgotten
    assert reruns() == 0
    svc.drop_collection("g")
    assert svc.store.moves("g") == {}
    svc.close()


def test_an_emptied_segment_takes_no_route_and_an_unreachable_one_is_refused_alike(chain, uri, tmp_path):
    """Milvus plans reachable segments without counting them: an empty one must still not show as a route,
    and a segment the queries cannot reach must be refused as in FAISS (that one is counted)."""
    from compatembed_index.errors import NoRouteError

    answers = []
    for svc in (_register(IndexService(None), chain), _register(milvus_service(tmp_path, uri), chain)):
        svc.create_collection("g")
        svc.add("g", "v1", [1, 2], np.eye(2, Chain.D1, dtype=np.float32))
        svc.upgrade("g", "v3", [1, 2], np.eye(2, Chain.D3, dtype=np.float32))  # v1 is empty now
        res = svc.search("g", "v3", np.eye(1, Chain.D3, dtype=np.float32), k=2)
        with pytest.raises(NoRouteError) as refused:
            svc.search("g", "v1", np.ones((1, Chain.D1), np.float32), k=2)  # v1 queries cannot reach v3
        answers.append((res.routes, sorted(res.ids[0].tolist()), str(refused.value)))
        svc.close()
    assert answers[0] == answers[1] and answers[0][0] == {"v3": "direct"}
