"""Real HTTP through uvicorn on 127.0.0.1: routes, auth, typed errors, a sweep of malformed requests."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from compatembed_index.api import IndexService
from compatembed_index.client import IndexClient
from compatembed_index.errors import DuplicateIdError, NoRouteError, UnauthorizedError
from compatembed_index.server import create_app
from compatembed_index.settings import IndexSettings

from index_helpers import Chain, ServedApp

KEY = "s3cret"
LIMIT = 300_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    chain = Chain(root / "versions")
    svc = IndexService(root / "data", max_k=50, max_batch=500)
    for d in chain.dirs.values():
        svc.register_version(d)
    svc.create_collection("g")
    rng = np.random.default_rng(0)
    for v, n, d, off in (("v1", 200, 16, 0), ("v2", 100, 24, 1000), ("v3", 50, 32, 2000)):
        svc.add("g", v, np.arange(n) + off, rng.normal(size=(n, d)), [{"v": v}] * n)
    settings = IndexSettings(api_key=KEY, max_body_bytes=LIMIT, max_k=50, max_batch=500)
    with ServedApp(create_app(svc, settings), settings) as url:
        yield url, svc, chain
    svc.close()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c


def test_probes_and_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"ready": True}
    def count(text: str, series: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(series + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    ok = 'compatembed_index_requests_total{method="GET",route="/collections/{name}",status="200"}'
    missing = 'compatembed_index_requests_total{method="GET",route="/collections/{name}",status="404"}'
    timed = 'compatembed_index_request_seconds_count{route="/collections/{name}"}'
    before = http.get("/metrics").text
    assert http.get("/collections/g").status_code == 200
    assert http.get("/collections/nope").status_code == 404
    text = http.get("/metrics").text
    assert 'compatembed_index_items{collection="g"} 350.0' in text
    # each request is counted once under its route template and the status the client saw, and timed
    assert count(text, ok) == count(before, ok) + 1
    assert count(text, missing) == count(before, missing) + 1
    assert count(text, timed) == count(before, timed) + 2


def test_a_client_that_leaves_mid_body_is_not_counted_as_a_server_error(served, http):
    """The body middleware sees the disconnect and answers nothing: /metrics says 499, never 500."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(served[0])
    series = 'compatembed_index_requests_total{method="POST",route="unmatched",status="%s"}'

    def count(status: str) -> float:
        lines = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(series % status + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before_499, before_500 = count("499"), count("500")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /collections/g/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"version\": ")
    deadline = time.monotonic() + 10
    while count("499") == before_499:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)
    assert count("500") == before_500


def test_http_search_equals_in_process_search(served, http):
    _, svc, _ = served
    q = np.random.default_rng(1).normal(size=(6, 32))
    r = http.post("/collections/g/search", json={"version": "v3", "vectors": q.tolist(), "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = svc.search("g", "v3", q, k=7)
    assert body["routes"] == ref.routes
    for i, hits in enumerate(body["results"]):
        assert [h["id"] for h in hits] == ref.ids[i].tolist()
        np.testing.assert_allclose([h["score"] for h in hits], ref.scores[i], atol=1e-6)
        assert all(h["metadata"] == {"v": h["version"]} for h in hits)


def test_writes_need_the_key_and_reads_do_not(served, http):
    body = {"version": "v1", "ids": [90_001], "vectors": [[0.5] * 16]}
    r = http.post("/collections/g/points", json=body)
    assert r.status_code == 401 and r.json()["error"] == "UnauthorizedError"
    assert http.post("/collections/g/points", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    r = http.post("/collections/g/points", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    r = http.post("/collections/g/points/delete", json={"ids": [90_001]}, headers={"X-API-Key": KEY})
    assert r.json() == {"deleted": 1}
    assert http.post("/collections/g/search", json={"version": "v3", "vectors": [[1.0] * 32]}).status_code == 200


def test_client_reraises_typed_errors(served):
    url, _, _ = served
    with pytest.raises(UnauthorizedError):
        IndexClient(url).add("g", "v1", [1], np.ones((1, 16)))
    client = IndexClient(url, api_key=KEY)
    with pytest.raises(DuplicateIdError, match="already in collection"):
        client.add("g", "v1", [1], np.ones((1, 16)))
    with pytest.raises(NoRouteError, match="no route from version v1 to segment v2"):
        client.search("g", "v1", np.ones((1, 16)))
    assert client.search("g", "v1", np.ones((1, 16)), allow_partial=True).skipped == ["v2", "v3"]
    client.close()


def test_collection_lifecycle_upgrade_materialise_alias(served):
    url, svc, chain = served
    c = IndexClient(url, api_key=KEY)
    c.create_collection("h", factory="HNSW8")
    rng = np.random.default_rng(2)
    c.add("h", "v1", np.arange(30), rng.normal(size=(30, 16)))
    c.upgrade("h", "v3", [0, 1], rng.normal(size=(2, 32)))
    assert c.versions_of("h", [1, 2, 999]) == ["v3", "v1", None]
    info = c.materialise("h", "v1", "v3")
    assert info["vectors"] == 28
    scale, shift = c.calibrate("h", "v3", "v1", rng.normal(size=(4, 32)), k=3)
    assert scale > 0 and c.stats("h")["calibration"] == {"v3|v1": [scale, shift]}
    c.set_alias("live", "h")
    st = c.stats("live")
    assert st["segments"]["v3"]["ntotal"] == 2 and st["materialised"][0]["ntotal"] == 28
    assert c.search("live", "v3", rng.normal(size=(2, 32)), k=5).routes == {"v1": "copy:v1>v3", "v3": "direct"}
    c.close()


def _raw(http, method, path, content, headers=None):
    return http.request(method, path, content=content,
                        headers={"content-type": "application/json", "X-API-Key": KEY, **(headers or {})})


V3 = [[0.1] * 32]
MALFORMED = [
    ("POST", "/collections/g/search", "{not json"),
    ("POST", "/collections/g/search", ""),
    ("POST", "/collections/g/search", "[]"),
    ("POST", "/collections/g/search", '{"version": "v3", "vectors": [[NaN' + ", 0.1" * 31 + "]]}"),
    ("POST", "/collections/g/search", '{"version": "v3", "vectors": [[Infinity' + ", 0.1" * 31 + "]]}"),
    ("POST", "/collections/g/search", '{"version": "v3", "vectors": [[1e400' + ", 0.1" * 31 + "]]}"),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[1e39] * 32]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[0.1] * 31]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[0.1] * 32, [0.1] * 3]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [["a"] * 32]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[True] * 32]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [0.1] * 32}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": []}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[]]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": "abc"}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[0.0] * 32]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": 0}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": -3}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": 51}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": "5"}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": 2.5}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "k": True}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": V3, "colour": "red"}),
    ("POST", "/collections/g/search", {"vectors": V3}),
    ("POST", "/collections/g/search", {"version": "v9", "vectors": V3}),
    ("POST", "/collections/g/search", {"version": 3, "vectors": V3}),
    ("POST", "/collections/g/search", {"version": "v2", "vectors": [[0.1] * 24]}),
    ("POST", "/collections/g/search", {"version": "v3", "vectors": [[0.1] * 32] * 501}),
    ("POST", "/collections/nope/search", {"version": "v3", "vectors": V3}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [5, 5], "vectors": [[0.1] * 16] * 2}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [1], "vectors": [[0.1] * 16]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [-1], "vectors": [[0.1] * 16]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [2**63], "vectors": [[0.1] * 16]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [1.5], "vectors": [[0.1] * 16]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [7, 8], "vectors": [[0.1] * 16]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [99_999], "vectors": [[0.1] * 15]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [99_999], "vectors": [[0.1] * 16], "metadata": [1]}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [99_999], "vectors": [[0.1] * 16], "metadata": []}),
    ("POST", "/collections/g/points", {"version": "v1", "ids": [], "vectors": []}),
    ("POST", "/collections/g/points/upgrade", {"version": "v3", "ids": [77_777], "vectors": V3}),
    ("POST", "/collections/g/points/delete", {"ids": "all"}),
    ("POST", "/collections/g/points/versions", {"ids": [3, 3]}),
    ("POST", "/collections/g/points/versions", {"ids": []}),
    ("POST", "/collections/g/points/versions", {"ids": list(range(501))}),
    ("POST", "/collections/nope/points/versions", {"ids": [1]}),
    ("POST", "/collections/g/materialise", {"source": "v3", "target": "v1"}),
    ("POST", "/collections/g/materialise", {"source": "v1", "target": "v1"}),
    ("POST", "/collections", {"name": "g"}),
    ("POST", "/collections", {"name": "../x"}),
    ("POST", "/collections", {"name": "x", "factory": "IVF,nonsense"}),
    ("POST", "/collections", {"name": "x", "factroy": "Flat"}),
    ("POST", "/collections", {"name": "x", "factory": "IVF4,Flat", "search_params": "nprobe=0"}),
    ("POST", "/collections", {"name": "y", "factory": "IVF16,Flat", "train_size": 8}),
    ("PUT", "/collections/g/calibration", {"query_version": "v3", "segment_version": "v3", "scale": 1, "shift": 0}),
    ("POST", "/versions", {"path": "/nonexistent/version"}),
    ("PUT", "/collections/g/calibration", {"query_version": "v3", "segment_version": "v1", "scale": -1, "shift": 0}),
    ("PUT", "/aliases/g", {"collection": "g"}),
    ("PUT", "/aliases/a1", {"collection": "missing"}),
    ("DELETE", "/collections/missing", None),
    ("GET", "/collections/missing", None),
    ("POST", "/collections/g/search", "x" * (LIMIT + 1)),
]


@pytest.mark.parametrize(("method", "path", "body"), MALFORMED, ids=[f"{i}-{m[1]}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_a_4xx_that_names_the_problem(served, http, method, path, body):
    _, svc, _ = served
    before = len(svc.collection("g"))
    content = body if isinstance(body, str) else (None if body is None else json.dumps(body))
    r = _raw(http, method, path, content)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    payload = r.json()
    assert set(payload) == {"error", "message"} and payload["message"]
    assert len(svc.collection("g")) == before  # nothing acknowledged is affected


def test_oversized_streamed_body_without_length_is_refused(http):
    def chunks():
        for _ in range(40):
            yield b"[" * 10_000

    r = http.post("/collections/g/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "LimitExceededError"


def test_concurrent_searches_and_writes_never_fail(served):
    url, _, _ = served
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 32)).tolist()

    def search(_):
        with httpx.Client(base_url=url, timeout=30) as c:
            return c.post("/collections/g/search", json={"version": "v3", "vectors": q, "k": 10}).status_code

    def write(i):
        with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as c:
            body = {"version": "v3", "ids": [500_000 + i], "vectors": rng.normal(size=(1, 32)).tolist()}
            return c.post("/collections/g/points", json=body).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda i: search(i) if i % 3 else write(i), range(24)))
    assert set(codes) == {200}


def test_app_opens_its_own_service_and_reports_readiness(tmp_path):
    from fastapi.testclient import TestClient

    settings = IndexSettings(data_dir=tmp_path / "d")
    with TestClient(create_app(None, settings)) as c:
        deadline = time.monotonic() + 20
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/collections", json={"name": "x"}).status_code == 201  # no key configured: open
    assert (tmp_path / "d" / "index.sqlite3").is_file()
