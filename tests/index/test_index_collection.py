"""Mixed-version search against a brute-force numpy oracle, mutations, routes, calibration, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.errors import (
    CollectionNotFoundError,
    ConfigError,
    ConflictError,
    DimensionMismatchError,
    DuplicateIdError,
    IndexServiceError,
    InvalidInputError,
    ItemNotFoundError,
    LimitExceededError,
    NoRouteError,
    VersionNotFoundError,
)
from compatembed_index.merge import search_plans

from index_helpers import Chain, assert_same_topk, normalize, oracle_topk, write_version

SIZES = {"v1": (300, 16), "v2": (200, 24), "v3": (100, 32)}
OFFSET = {"v1": 0, "v2": 10_000, "v3": 2**40}  # 64-bit ids


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path / "versions")


def _open(chain, data_dir=None, **service_opts):
    """A service (in memory without ``data_dir``) with the chain's three versions registered."""
    svc = IndexService(data_dir, **service_opts)
    for d in chain.dirs.values():
        svc.register_version(d)
    return svc


def _service(chain, factory="Flat", **opts):
    svc = _open(chain, max_k=100)
    svc.create_collection("g", factory=factory, **opts)
    return svc


def _fill(svc, seed=1):
    rng = np.random.default_rng(seed)
    data = {}
    for v, (n, d) in SIZES.items():
        ids = np.arange(n, dtype=np.int64) + OFFSET[v]
        x = rng.normal(size=(n, d)).astype(np.float32)
        svc.add("g", v, ids, x, [{"v": v, "i": int(i)} for i in ids])
        data[v] = (ids, x)
    return data


def _queries(n=25, seed=7):
    return np.random.default_rng(seed).normal(size=(n, 32)).astype(np.float32)


def test_three_version_chain_matches_oracle(chain):
    svc = _service(chain)
    data = _fill(svc)
    q = _queries()
    res = svc.search("g", "v3", q, k=15)
    assert res.routes == {"v1": "query:v3>v2>v1", "v2": "query:v3>v2", "v3": "direct"}
    ref_i, ref_s = oracle_topk({v: chain.q_to(q, v) for v in data}, data, 15)
    assert_same_topk(res.ids, res.scores, ref_i, ref_s)
    # every hit carries the version and metadata of the item that answered
    for r in range(len(q)):
        for h in res.hits(r):
            v = h["metadata"]["v"]
            assert h["version"] == v and h["metadata"]["i"] == h["id"] and h["id"] in set(data[v][0].tolist())
    # results contain items of all three versions (the merge really mixes segments)
    assert {v for row in res.versions for v in row} == {"v1", "v2", "v3"}


def test_query_from_middle_version(chain):
    svc = _service(chain)
    data = _fill(svc)
    q2 = np.random.default_rng(3).normal(size=(10, 24)).astype(np.float32)
    with pytest.raises(NoRouteError, match="no route from version v2 to segment v3"):
        svc.search("g", "v2", q2, k=5)
    res = svc.search("g", "v2", q2, k=5, allow_partial=True)
    assert res.skipped == ["v3"]
    qn = normalize(q2)
    ref_i, ref_s = oracle_topk({"v2": qn, "v1": normalize(qn[:, :16])}, {v: data[v] for v in ("v1", "v2")}, 5)
    assert_same_topk(res.ids, res.scores, ref_i, ref_s)


def test_unrelated_segment_needs_allow_partial(chain):
    svc = _service(chain)
    data = _fill(svc)
    x0 = np.random.default_rng(4).normal(size=(40, 16)).astype(np.float32)
    svc.add("g", "v0", np.arange(40) + 50_000, x0)
    q = _queries()
    with pytest.raises(NoRouteError, match="no route from version v3 to segment v0"):
        svc.search("g", "v3", q, k=5)
    res = svc.search("g", "v3", q, k=5, allow_partial=True)
    assert res.skipped == ["v0"]
    assert not np.isin(res.ids, np.arange(40) + 50_000).any()
    ref_i, ref_s = oracle_topk({v: chain.q_to(q, v) for v in data}, data, 5)
    assert_same_topk(res.ids, res.scores, ref_i, ref_s)


def test_materialised_forward_copy_matches_oracle_and_follows_mutations(chain):
    svc = _service(chain)
    data = _fill(svc)
    info = svc.materialise("g", "v1", "v3")
    assert info["vectors"] == 300 and info["route"] == "v1>v3"
    q = _queries()
    res = svc.search("g", "v3", q, k=10)
    assert res.routes["v1"] == "copy:v1>v3"
    up = {"v1": (data["v1"][0], chain.forward_v1(data["v1"][1])), "v2": data["v2"], "v3": data["v3"]}
    qs = {"v1": normalize(q), "v2": chain.q_to(q, "v2"), "v3": normalize(q)}
    assert_same_topk(res.ids, res.scores, *oracle_topk(qs, up, 10))
    # later v1 writes reach the copy: add, delete
    extra = np.random.default_rng(11).normal(size=(20, 16)).astype(np.float32)
    svc.add("g", "v1", np.arange(20) + 70_000, extra)
    svc.delete("g", data["v1"][0][:30])
    ids1 = np.concatenate([data["v1"][0][30:], np.arange(20) + 70_000])
    x1 = np.vstack([data["v1"][1][30:], extra])
    up["v1"] = (ids1, chain.forward_v1(x1))
    res = svc.search("g", "v3", q, k=10)
    assert_same_topk(res.ids, res.scores, *oracle_topk(qs, up, 10))
    assert svc.stats("g")["materialised"] == [{"source": "v1", "target": "v3", "ntotal": 290}]
    with pytest.raises(NoRouteError, match="no forward route from version v3 to version v1"):
        svc.materialise("g", "v3", "v1")


def test_upgrade_moves_items_between_segments(chain):
    svc = _service(chain)
    data = _fill(svc)
    rng = np.random.default_rng(5)
    moved = data["v1"][0][:40]
    new_x = rng.normal(size=(40, 32)).astype(np.float32)
    svc.upgrade("g", "v3", moved, new_x)
    coll = svc.collection("g")
    assert all(coll.version_of(i) == "v3" for i in moved)
    # what a backfill still has to do: the untouched v1 items stay put, unknown ids have no version
    kept = data["v1"][0][40:43]
    assert svc.versions_of("g", [*moved[:2].tolist(), *kept.tolist(), 10**15]) == ["v3", "v3", "v1", "v1", "v1", None]
    with pytest.raises(InvalidInputError, match="duplicate ids"):
        svc.versions_of("g", [int(moved[0]), int(moved[0])])
    st = svc.stats("g")
    assert st["segments"]["v1"]["ntotal"] == 260 and st["segments"]["v3"]["ntotal"] == 140 and st["items"] == 600
    res = svc.search("g", "v3", new_x[:5], k=1)
    assert res.ids[:, 0].tolist() == moved[:5].tolist() and res.versions[0][0] == "v3"
    assert res.metadata[0][0] == {"v": "v1", "i": int(moved[0])}  # metadata kept by upgrade
    with pytest.raises(ItemNotFoundError, match="not in collection"):
        svc.upgrade("g", "v3", [999_999], new_x[:1])


def test_upgrade_is_atomic_for_concurrent_searches(chain):
    svc = _service(chain)
    data = _fill(svc)
    all_ids = set(np.concatenate([d[0] for d in data.values()]).tolist())
    q = _queries(3)
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            res = svc.search("g", "v3", q, k=100, include_metadata=False)
            got = res.ids[0][res.ids[0] >= 0].tolist()
            if len(got) != len(set(got)):
                errors.append("an item answered twice")
            st = svc.stats("g")
            if sum(s["ntotal"] for s in st["segments"].values()) != len(all_ids):
                errors.append("an item is in two segments or none")

    t = threading.Thread(target=reader)
    t.start()
    rng = np.random.default_rng(0)
    for start in range(0, 300, 20):
        svc.upgrade("g", "v3", data["v1"][0][start : start + 20], rng.normal(size=(20, 32)))
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert svc.stats("g")["segments"]["v1"]["ntotal"] == 0


def test_add_duplicates_and_upsert(chain):
    svc = _service(chain)
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    svc.add("g", "v1", [1, 2, 3], x, [{"a": 1}, None, {"a": 3}])
    with pytest.raises(DuplicateIdError, match=r"already in collection 'g' \(e.g. \[2\]\)"):
        svc.add("g", "v1", [2, 9], x[:2])
    with pytest.raises(InvalidInputError, match=r"duplicate ids in the batch: \[5\]"):
        svc.add("g", "v1", [5, 5, 6], x)
    svc.add("g", "v2", [2], np.ones((1, 24)), [{"b": 2}], upsert=True)  # moves id 2 to v2
    assert svc.collection("g").version_of(2) == "v2"
    assert len(svc.collection("g")) == 3
    res = svc.search("g", "v1", x[:1], k=3, allow_partial=True)
    assert res.skipped == ["v2"] and 2 not in res.ids[0]


@pytest.mark.parametrize("factory", ["HNSW8", "IVF4,Flat"])
def test_delete_and_upsert_on_approximate_indexes(chain, factory):
    svc = _service(chain, factory=factory, train_size=100,
                   search_params="nprobe=4" if "IVF" in factory else "efSearch=128")
    data = _fill(svc)
    gone = data["v1"][0][::3]
    assert svc.delete("g", gone) == len(gone)
    assert svc.delete("g", gone) == 0  # idempotent
    x = np.vstack([data["v1"][1], np.zeros((0, 16))])
    res = svc.search("g", "v1", x, k=5, allow_partial=True)
    assert not np.isin(res.ids, gone).any()
    kept = np.setdiff1d(data["v1"][0], gone)
    rows = np.isin(data["v1"][0], kept)
    assert (res.ids[rows, 0] == data["v1"][0][rows]).mean() > 0.95
    assert svc.stats("g")["segments"]["v1"]["ntotal"] == len(kept)


def test_ivf_collection_trains_and_matches_oracle_with_full_probe(chain):
    svc = _service(chain, factory="IVF4,Flat", train_size=150, search_params="nprobe=4")
    data = _fill(svc)
    st = svc.stats("g")["segments"]
    assert st["v1"]["trained"] and st["v2"]["trained"] and not st["v3"]["trained"]  # v3 has 100 < 150
    q = _queries()
    res = svc.search("g", "v3", q, k=10)
    assert_same_topk(res.ids, res.scores, *oracle_topk({v: chain.q_to(q, v) for v in data}, data, 10))


def test_unnormalised_version_uses_l2(tmp_path):
    svc = IndexService(None)
    svc.register_version(write_version(tmp_path, "raw", 8, normalized=False))
    svc.create_collection("c")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32) * 5
    svc.add("c", "raw", np.arange(50), x)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    res = svc.search("c", "raw", q, k=3)
    d2 = ((q[:, None] - x[None]) ** 2).sum(-1)
    o = np.argsort(d2, axis=1)[:, :3]
    np.testing.assert_array_equal(res.ids, o)
    np.testing.assert_allclose(res.scores, -np.take_along_axis(d2, o, 1), rtol=1e-4)


def test_explicit_calibration_changes_the_merge_as_the_oracle_says(chain):
    svc = _service(chain)
    data = _fill(svc)
    svc.collection("g").set_calibration("v3", "v1", 0.5, 0.3)
    q = _queries()
    res = svc.search("g", "v3", q, k=10)
    s = {v: chain.q_to(q, v) @ normalize(data[v][1]).T for v in data}
    s["v1"] = 0.5 * s["v1"] + 0.3
    allv = np.hstack([s["v1"], s["v2"], s["v3"]])
    allid = np.concatenate([data[v][0] for v in ("v1", "v2", "v3")])
    o = np.argsort(-allv, axis=1)[:, :10]
    assert_same_topk(res.ids, res.scores, allid[o], np.take_along_axis(allv, o, 1))
    with pytest.raises(InvalidInputError, match="scale must be positive"):
        svc.collection("g").set_calibration("v3", "v1", -1.0, 0.0)


def test_fitted_calibration_matches_score_moments(chain):
    svc = _service(chain)
    _fill(svc)
    held_out = _queries(60, seed=99)
    scale, shift = svc.calibrate("g", "v3", "v1", held_out, k=10)
    assert svc.stats("g")["calibration"] == {"v3|v1": [scale, shift]}
    coll = svc.collection("g")
    plans, _ = coll._plan("v3", False, calibrated=True)
    by = {p.version: p for p in plans}
    qn = normalize(held_out).astype(np.float32)
    ref = search_plans([by["v3"]], qn, 10)[0]
    got = search_plans([by["v1"]], qn, 10)[0]
    assert abs(got.mean() - ref.mean()) < 1e-4 and abs(got.std() - ref.std()) < 1e-4


def test_calibration_from_stored_items_leaves_out_their_own_match(chain):
    """Held-out queries that are stored v3 items: the moments match a brute-force oracle without self-matches."""
    svc = _service(chain)
    data = _fill(svc)
    ids3, x3 = data["v3"]
    rows = np.arange(0, 100, 3)
    k = 5
    scale, shift = svc.calibrate("g", "v3", "v1", x3[rows], k=k, query_ids=ids3[rows])
    qn = normalize(x3[rows])
    own = qn @ normalize(x3).T
    own[np.arange(len(rows)), rows] = -np.inf  # the query's own item is left out
    ref = -np.sort(-own, axis=1)[:, :k]
    cross = -np.sort(-(chain.q_to(x3[rows], "v1") @ normalize(data["v1"][1]).T), axis=1)[:, :k]
    want_scale = ref.std() / cross.std()
    assert scale == pytest.approx(want_scale, rel=1e-4)
    assert shift == pytest.approx(ref.mean() - want_scale * cross.mean(), abs=1e-4)
    # without the ids, every query's best own-segment score is its own item (1.0): a different, biased fit
    biased_scale, _ = svc.calibrate("g", "v3", "v1", x3[rows], k=k)
    assert biased_scale != pytest.approx(scale, rel=1e-3)
    with pytest.raises(InvalidInputError, match="ids for"):
        svc.calibrate("g", "v3", "v1", x3[rows], k=k, query_ids=ids3[rows][:-1])


def test_aliases_switch_atomically(chain):
    svc = _service(chain)
    svc.create_collection("g2")
    x = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    svc.add("g", "v1", [1, 2], x)
    svc.add("g2", "v1", [3, 4], x)
    svc.set_alias("live", "g")
    assert svc.search("live", "v1", x[:1], k=1).ids[0, 0] == 1
    svc.set_alias("live", "g2")
    assert svc.search("live", "v1", x[:1], k=1).ids[0, 0] == 3
    with pytest.raises(ConflictError):
        svc.set_alias("g", "g2")
    with pytest.raises(ConflictError):
        svc.create_collection("live")
    svc.remove_alias("live")
    with pytest.raises(CollectionNotFoundError):
        svc.search("live", "v1", x, k=1)


BAD_SEARCHES = [
    (dict(version="v3", queries=[[float("nan")] * 32]), InvalidInputError, "NaN or Inf"),
    (dict(version="v3", queries=[[float("inf")] * 32]), InvalidInputError, "NaN or Inf"),
    (dict(version="v3", queries=[[1e39] * 32]), InvalidInputError, "beyond float32"),
    (dict(version="v3", queries=[[0.1] * 31]), DimensionMismatchError, "dim 31 but version 'v3' has dim 32"),
    (dict(version="v3", queries=[[0.1] * 32, [0.1] * 31]), InvalidInputError, "rectangular"),
    (dict(version="v3", queries=[["a"] * 32]), InvalidInputError, "numbers"),
    (dict(version="v3", queries=[0.1] * 32), InvalidInputError, "2-D"),
    (dict(version="v3", queries=[]), InvalidInputError, "2-D|empty"),
    (dict(version="v3", queries=[[0.0] * 32]), InvalidInputError, "zero vector"),
    (dict(version="v3", queries=[[0.1] * 32], k=0), InvalidInputError, "k must be at least 1"),
    (dict(version="v3", queries=[[0.1] * 32], k=101), LimitExceededError, "above the limit of 100"),
    (dict(version="v3", queries=[[0.1] * 32], k=2.5), InvalidInputError, "k must be an integer"),
    (dict(version="v9", queries=[[0.1] * 32]), VersionNotFoundError, "unknown model version 'v9'"),
]


@pytest.mark.parametrize(("kw", "err", "msg"), BAD_SEARCHES)
def test_bad_search_input_is_refused_with_a_message(chain, kw, err, msg):
    svc = _service(chain)
    _fill(svc)
    with pytest.raises(err, match=msg):
        svc.search("g", kw.pop("version"), kw.pop("queries"), **kw)


@pytest.mark.parametrize(
    ("ids", "err", "msg"),
    [([-1], InvalidInputError, "ids must lie in"), ([2**63], InvalidInputError, "ids must lie in"),
     ([1.5], InvalidInputError, "integers"), ([True], InvalidInputError, "integers"),
     ([1, 2], InvalidInputError, "2 ids for 1 vectors"), ("abc", InvalidInputError, "list of integers")],
)
def test_bad_ids_are_refused(chain, ids, err, msg):
    svc = _service(chain)
    with pytest.raises(err, match=msg):
        svc.add("g", "v1", ids, np.ones((1, 16)))


def test_other_bad_requests(chain):
    svc = _service(chain)
    with pytest.raises(CollectionNotFoundError, match="no collection or alias named 'nope'"):
        svc.add("nope", "v1", [1], np.ones((1, 16)))
    with pytest.raises(InvalidInputError, match="metadata"):
        svc.add("g", "v1", [1], np.ones((1, 16)), metadata=["not an object"])
    with pytest.raises(ConfigError, match="unknown collection option"):
        svc.create_collection("h", factroy="Flat")
    with pytest.raises(ConfigError, match="invalid FAISS factory"):
        svc.create_collection("h", factory="IVFxx")
    with pytest.raises(InvalidInputError, match="collection name"):
        svc.create_collection("../etc")
    small = IndexService(None, max_batch=2)
    small.register_version(chain.dirs["v1"])
    small.create_collection("g")
    with pytest.raises(LimitExceededError, match="above the limit of 2"):
        small.add("g", "v1", [1, 2, 3], np.ones((3, 16)))
    # nothing acknowledged was affected by the refusals
    assert len(svc.collection("g")) == 0


def test_every_error_carries_a_4xx_status():
    from compatembed_index.errors import ERROR_TYPES, NotReadyError, SnapshotError

    for name, cls in ERROR_TYPES.items():
        assert issubclass(cls, IndexServiceError) and cls.name() == name
        if cls not in (SnapshotError, NotReadyError):
            assert 400 <= cls.status_code < 500, name


def test_factory_that_cannot_serve_a_version_fails_before_anything_is_written(chain, tmp_path):
    svc = _open(chain, tmp_path / "d")
    # PQ32 fits the 1536-d creation check but not v1's 16 dimensions
    svc.create_collection("g", factory="Flat", factories={"v1": "PQ32"})
    svc.add("g", "v2", [1, 2], np.ones((2, 24)))
    with pytest.raises(ConfigError, match="PQ32"):
        svc.add("g", "v1", [3, 4], np.ones((2, 16)))
    with pytest.raises(ConfigError, match="PQ32"):
        svc.upgrade("g", "v1", [1], np.ones((1, 16)))
    assert svc.store.count("g") == {"v2": 2}  # nothing of the refused writes reached the store
    assert svc.versions_of("g", [1, 2, 3]) == ["v2", "v2", None]
    svc.close()
    again = IndexService(tmp_path / "d")  # and the service still starts
    assert again.versions_of("g", [1, 2, 3]) == ["v2", "v2", None]
    again.close()


def test_write_racing_a_drop_is_refused_and_never_reappears(chain, tmp_path):
    svc = _open(chain, tmp_path / "d")
    svc.create_collection("g")
    looked_up = svc.collection("g")  # a writer that found the collection just before the drop
    svc.drop_collection("g")
    with pytest.raises(CollectionNotFoundError, match="dropped"):
        looked_up.add("v1", [1, 2, 3], np.ones((3, 16)))
    svc.create_collection("g")
    svc.close()
    again = IndexService(tmp_path / "d")
    assert len(again.collection("g")) == 0
    again.close()


def test_concurrent_snapshots_of_one_collection_both_succeed_and_verify(chain, tmp_path):
    from compatembed_index import snapshot as snap

    svc = _open(chain, tmp_path / "d")
    svc.create_collection("g")
    _fill(svc)
    for _ in range(3):
        errors: list[BaseException] = []

        def take():
            try:
                svc.snapshot("g")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for path in snap.list_snapshots(tmp_path / "d" / "snapshots", "g"):
            snap.verify_snapshot(path)
    svc.close()
    again = IndexService(tmp_path / "d")
    assert again.collection("g").load_report == [] and len(again.collection("g")) == 600
    again.close()


def test_calibration_is_dropped_when_its_route_changes(chain):
    svc = _service(chain)
    _fill(svc)
    rng = np.random.default_rng(3)
    svc.calibrate("g", "v3", "v1", rng.normal(size=(8, 32)), k=3)
    svc.calibrate("g", "v3", "v2", rng.normal(size=(8, 32)), k=3)
    assert set(svc.stats("g")["calibration"]) == {"v3|v1", "v3|v2"}
    # v1 is now searched through a forward copy: scores of another route, so its fit no longer applies
    svc.materialise("g", "v1", "v3")
    assert svc.search("g", "v3", rng.normal(size=(2, 32)), k=3).routes["v1"] == "copy:v1>v3"
    assert set(svc.stats("g")["calibration"]) == {"v3|v2"}
    svc.calibrate("g", "v3", "v1", rng.normal(size=(8, 32)), k=3)
    svc.collection("g").drop_materialised("v1", "v3")
    assert set(svc.stats("g")["calibration"]) == {"v3|v2"}
    with pytest.raises(InvalidInputError, match="cross-version"):
        svc.collection("g").set_calibration("v3", "v3", 1.0, 0.0)


def test_normalisation_neither_overflows_nor_underflows(chain):
    from compatembed_index.validation import normalize_rows

    rows = np.array([[1e20, 2e20, 0, 0], [1e-25, 0, 0, 0], [3, 4, 0, 0]], dtype=np.float32)
    got = normalize_rows(rows, what="vectors")
    ref = rows.astype(np.float64) / np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # end to end: a huge but finite vector is stored as its direction and found by it
    svc = _service(chain)
    svc.add("g", "v1", [7], np.full((1, 16), 1e20, dtype=np.float32))
    res = svc.search("g", "v1", np.ones((1, 16)), k=1)
    assert res.ids[0, 0] == 7 and res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_version_whose_forward_map_needs_side_information_registers_but_is_no_route(tmp_path):
    """FCT with side information: the index stores old vectors alone, so it cannot upgrade them; it says why."""
    import json

    rng = np.random.default_rng(3)
    write_version(tmp_path, "old", 4)
    d = write_version(tmp_path, "new", 5, forward=("old", [(rng.normal(size=(5, 4 + 3)), rng.normal(size=5))], "relu", True))
    m = json.loads((d / "manifest.json").read_text())
    m["compatibility"][0]["side_input"] = {"version": "psi", "dim": 3}
    (d / "manifest.json").write_text(json.dumps(m))
    svc = IndexService(None, max_k=10)
    svc.register_version(tmp_path / "old")
    svc.register_version(d)
    svc.create_collection("g")
    svc.add("g", "old", np.arange(10), rng.normal(size=(10, 4)).astype(np.float32))
    with pytest.raises(NoRouteError, match="side-information vector of version psi, which the index does not store"):
        svc.materialise("g", "old", "new")
    with pytest.raises(NoRouteError, match="no route from version new to segment old"):
        svc.search("g", "new", rng.normal(size=(2, 5)).astype(np.float32), k=3)
