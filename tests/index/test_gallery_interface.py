"""One behavioural suite, run against both implementations of ``Gallery`` (the service in process and
the HTTP client talking to a real server on 127.0.0.1) and both backends (FAISS/SQLite, and Milvus
through milvus-lite in a temporary directory). Same answers (checked against a brute-force oracle),
same return types, same error classes."""

from __future__ import annotations

import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.client import IndexClient
from compatembed_index.errors import (
    CollectionNotFoundError,
    ConfigError,
    ConflictError,
    DuplicateIdError,
    InvalidInputError,
    NoRouteError,
    VersionNotFoundError,
)
from compatembed_index.interface import Gallery
from compatembed_index.results import SearchResult
from compatembed_index.server import create_app
from compatembed_index.settings import IndexSettings

from index_helpers import Chain, ServedApp, assert_same_topk, milvus_service, normalize, oracle_topk

SIZES = {"v1": (120, Chain.D1), "v3": (80, Chain.D3)}
OFFSET = {"v1": 0, "v3": 10_000}


@pytest.fixture(params=["local", "remote", "local-milvus", "remote-milvus"])
def gallery(request, tmp_path):
    """A fresh gallery with the chain's versions registered, in process or over HTTP, on FAISS or Milvus."""
    chain = Chain(tmp_path / "versions")
    svc = milvus_service(tmp_path) if request.param.endswith("milvus") else IndexService(tmp_path / "data")
    if request.param.startswith("local"):
        g: Gallery = svc
        served = None
    else:
        settings = IndexSettings()
        served = ServedApp(create_app(svc, settings), settings)
        g = IndexClient(served.__enter__())
    for d in chain.dirs.values():
        g.register_version(d)
    yield g, chain
    g.close()
    if served is not None:
        served.__exit__(None, None, None)
        svc.close()


def _fill(g: Gallery, seed: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g.create_collection("g")
    rng = np.random.default_rng(seed)
    data = {}
    for v, (n, d) in SIZES.items():
        ids = np.arange(n) + OFFSET[v]
        x = rng.normal(size=(n, d)).astype(np.float32)
        g.add("g", v, ids, x, [{"v": v, "i": int(i)} for i in ids])
        data[v] = (ids, x)
    return data


def test_both_implement_the_protocol(gallery):
    g, _ = gallery
    assert isinstance(g, Gallery)


def test_versions_are_described_alike(gallery):
    g, chain = gallery
    again = g.register_version(chain.dirs["v3"])  # idempotent
    assert again["version_id"] == "v3" and again["dim"] == Chain.D3 and again["normalized"] is True
    assert {"kind": "affine", "target": "v2"} in again["edges"]
    assert [v["version_id"] for v in g.versions()] == sorted(chain.dirs)
    assert again in g.versions()


def test_search_answers_the_oracle_with_metadata_and_padding(gallery):
    g, chain = gallery
    data = _fill(g)
    q3 = np.random.default_rng(2).normal(size=(5, Chain.D3))
    res = g.search("g", "v3", q3, k=9)
    assert isinstance(res, SearchResult)
    ref_ids, ref_scores = oracle_topk({"v3": normalize(q3), "v1": chain.q_to(q3, "v1")}, data, 9)
    assert_same_topk(res.ids, res.scores, ref_ids, ref_scores)
    for i in range(len(q3)):
        assert [m["i"] for m in res.metadata[i]] == res.ids[i].tolist()
        assert [{"v": v} for v in res.versions[i]] == [{"v": m["v"]} for m in res.metadata[i]]
    assert res.routes == {"v1": "query:v3>v2>v1", "v3": "direct"}

    few = g.search("g", "v3", q3[:1], k=300, include_metadata=False)  # more than the 200 items
    assert few.metadata is None and few.ids.shape == (1, 300)
    assert (few.ids[0, 200:] == -1).all() and np.isneginf(few.scores[0, 200:]).all()
    assert few.versions[0][200] is None


def test_routes_and_partial_search(gallery):
    g, _ = gallery
    _fill(g)
    q1 = np.random.default_rng(3).normal(size=(2, Chain.D1))
    with pytest.raises(NoRouteError):
        g.search("g", "v1", q1)  # v1 queries cannot reach the v3 segment
    res = g.search("g", "v1", q1, allow_partial=True)
    assert res.skipped == ["v3"] and set(res.versions[0]) == {"v1"}


def test_writes_upgrade_and_delete(gallery):
    g, _ = gallery
    data = _fill(g)
    ids1, x1 = data["v1"]
    with pytest.raises(DuplicateIdError):
        g.add("g", "v1", ids1[:2], x1[:2])
    seq = g.add("g", "v1", ids1[:2], x1[:2] * 2, [{"new": True}, None], upsert=True)
    assert isinstance(seq, int)
    moved = np.random.default_rng(4).normal(size=(3, Chain.D3))
    seq2 = g.upgrade("g", "v3", ids1[:3], moved)
    assert seq2 > seq
    assert g.versions_of("g", [int(i) for i in ids1[:4]]) == ["v3", "v3", "v3", "v1"]
    hit = g.search("g", "v3", moved[:1], k=1)
    assert hit.ids[0, 0] == ids1[0] and hit.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert g.delete("g", [int(ids1[0]), 999_999]) == 1
    assert g.versions_of("g", [int(ids1[0])]) == [None]
    assert g.stats("g")["items"] == sum(n for n, _ in SIZES.values()) - 1


def test_materialise_and_calibration(gallery):
    g, _ = gallery
    _fill(g)
    info = g.materialise("g", "v1", "v3")
    assert info["vectors"] == SIZES["v1"][0]
    res = g.search("g", "v3", np.random.default_rng(5).normal(size=(2, Chain.D3)))
    assert res.routes["v1"] == "copy:v1>v3"
    scale, shift = g.calibrate("g", "v3", "v1", np.random.default_rng(6).normal(size=(20, Chain.D3)), k=5)
    assert np.isfinite([scale, shift]).all() and scale > 0
    g.set_calibration("g", "v3", "v1", 0.5, 0.25)
    assert g.stats("g")["calibration"] == {"v3|v1": [0.5, 0.25]}
    with pytest.raises(InvalidInputError):
        g.set_calibration("g", "v3", "v1", -1.0, 0.0)


def test_snapshot_records_name_no_server_path(gallery):
    g, _ = gallery
    _fill(g)
    if g.stats("g").get("backend") == "milvus":
        with pytest.raises(ConfigError, match="Milvus persists"):
            g.snapshot("g")  # Milvus keeps every acknowledged write itself
        return
    records = g.snapshot("g")
    assert len(records) == 1
    r = records[0]
    assert r["collection"] == "g" and r["name"] == f"snapshots/g/{r['id']}" and r["seq"] == int(r["id"])
    every = g.snapshot()  # all collections: one record each, none naming an absolute path
    assert [rec["collection"] for rec in every] == ["g"] and not every[0]["name"].startswith("/")


def test_collections_and_aliases(gallery):
    g, _ = gallery
    _fill(g)
    with pytest.raises(ConflictError):
        g.create_collection("g")
    g.create_collection("other")
    assert g.list_collections() == ["g", "other"]
    g.set_alias("live", "g")
    assert g.aliases() == {"live": "g"}
    assert g.stats("live")["name"] == "g"
    g.remove_alias("live")
    assert g.aliases() == {}
    g.drop_collection("other")
    assert g.list_collections() == ["g"]
    with pytest.raises(CollectionNotFoundError):
        g.stats("other")
    with pytest.raises(CollectionNotFoundError):
        g.drop_collection("other")


def test_bad_input_raises_the_same_errors(gallery):
    g, _ = gallery
    _fill(g)
    bad = np.ones((1, Chain.D3))
    bad[0, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        g.search("g", "v3", bad)
    with pytest.raises(InvalidInputError, match="dimension|dim"):
        g.search("g", "v3", np.ones((1, Chain.D3 + 1)))
    with pytest.raises(VersionNotFoundError):
        g.search("g", "v9", np.ones((1, Chain.D3)))
    with pytest.raises(CollectionNotFoundError):
        g.add("nope", "v1", [1], np.ones((1, Chain.D1)))


def test_stored_items_read_back_as_written(gallery):
    """get_points: each item's version, metadata and stored vector (normalised), None where absent."""
    g, _ = gallery
    data = _fill(g)
    ids1, x1 = data["v1"]
    ids3, x3 = data["v3"]
    got = g.get_points("g", [int(ids3[2]), 999_999, int(ids1[5])])
    assert got[1] is None
    assert got[0]["version"] == "v3" and got[0]["metadata"] == {"v": "v3", "i": int(ids3[2])}
    np.testing.assert_allclose(got[0]["vector"], normalize(x3[2:3])[0], atol=1e-6)
    assert got[2]["version"] == "v1"
    np.testing.assert_allclose(got[2]["vector"], normalize(x1[5:6])[0], atol=1e-6)
    bare = g.get_points("g", [int(ids1[0])], include_vectors=False, include_metadata=False)
    assert bare == [{"id": int(ids1[0]), "version": "v1"}]
    moved = np.random.default_rng(7).normal(size=(1, Chain.D3))
    g.upgrade("g", "v3", ids1[:1], moved)  # after a move, read where it is now
    after = g.get_points("g", [int(ids1[0])])[0]
    assert after["version"] == "v3"
    np.testing.assert_allclose(after["vector"], normalize(moved)[0], atol=1e-6)
