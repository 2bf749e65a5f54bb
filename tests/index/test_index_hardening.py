"""Holes a single request could open: resources it could exhaust, unsafe defaults, stored data that
would break later reads. Each test reproduces one hole and checks the refusal that closes it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from compatembed_index.api import IndexService
from compatembed_index.cli import main
from compatembed_index.errors import (
    ConfigError,
    InvalidInputError,
    LimitExceededError,
    ManifestError,
)
from compatembed_index.registry import read_version_dir
from compatembed_index.server import create_app
from compatembed_index.settings import IndexSettings

from index_helpers import Chain, ServedApp, write_version

# New names (Limits, uvicorn_config, ...) are imported inside the tests that use them, so that this
# module also runs against the code before these fixes and each test shows its own hole there.
KEY = "s3cret"


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path / "versions")


def _service(chain, data_dir=None, **kw):
    svc = IndexService(data_dir, **kw)
    for d in chain.dirs.values():
        svc.register_version(d)
    return svc


def _filled(chain, data_dir=None, **kw):
    svc = _service(chain, data_dir, **kw)
    svc.create_collection("g")
    rng = np.random.default_rng(0)
    svc.add("g", "v1", np.arange(40), rng.normal(size=(40, 16)), [{"n": i} for i in range(40)])
    svc.add("g", "v3", np.arange(100, 120), rng.normal(size=(20, 32)))
    return svc


@pytest.fixture
def client(chain, tmp_path):
    """The app over a filled collection, with a key, through Starlette's in-process client."""
    limits = {"max_result_slots": 1000, "max_response_bytes": 20_000}
    known = {k: v for k, v in limits.items() if k in IndexSettings.model_fields}  # all of them, since the fixes
    settings = IndexSettings(api_key=KEY, max_k=50, max_batch=500, **known)
    service_limits = {}
    if known == limits:  # (not so before these fixes) a caller's service keeps its own limits: give it these
        from compatembed_index.limits import Limits

        service_limits["limits"] = Limits.from_settings(settings)
    svc = _filled(chain, tmp_path / "data", max_k=50, max_batch=500, **service_limits)
    with TestClient(create_app(svc, settings), raise_server_exceptions=False) as c:
        yield c, svc, tmp_path
    svc.close()


def _error_of(r) -> dict:
    payload = r.json()
    assert set(payload) == {"error", "message"}, payload
    return payload


# -- 1. factory strings are bounded before anything is built ------------------------------------------

_CREATE_UNDER_RLIMIT = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # today's code would need gigabytes
    from compatembed_index.api import IndexService
    from compatembed_index.errors import IndexServiceError
    try:
        IndexService(None).create_collection("g", factory=sys.argv[1])
        print("accepted")
    except IndexServiceError as exc:
        print(type(exc).__name__, exc)
    """
)


@pytest.mark.parametrize(("factory", "limit"), [("IVF100000000,Flat", "max_nlist"), ("PQ16x16", "max_pq_nbits"),
                                                ("IMI2x16,Flat", "max_nlist")])
def test_huge_factories_are_refused_before_faiss_allocates(factory, limit):
    # in a child process under a 2 GiB address-space limit: a build that allocated would fail there,
    # not exhaust this machine
    r = subprocess.run([sys.executable, "-c", _CREATE_UNDER_RLIMIT, factory], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ConfigError") and limit in r.stdout, r.stdout


@pytest.mark.parametrize(("factory", "limit"), [
    ("HNSW100000", "max_hnsw_m"),
    ("IVF64_HNSW100000,Flat", "max_hnsw_m"),
    ("PQ1024", "max_pq_m"),
    ("OPQ1024_64,PQ8", "max_pq_m"),
    ("IVF64,PQ8x13", "max_pq_nbits"),
])
def test_factory_counts_above_their_limit_are_refused(chain, factory, limit):
    svc = _service(chain)
    with pytest.raises(ConfigError, match=limit):
        svc.create_collection("g", factory=factory)
    assert svc.list_collections() == []


@pytest.mark.parametrize("factory", ["HNSW1", "HNSW0", "IVF0,Flat", "PQ4x0", "NSG4", "IVF4,LSH", "IVF4"])
def test_factories_that_crash_or_hang_faiss_are_refused(chain, factory):
    # HNSW0/1 abort or segfault on the first add, PQ4x0 dies of SIGFPE, a small NSG hangs its build
    with pytest.raises(ConfigError, match="invalid FAISS factory string"):
        _service(chain).create_collection("g", factory=factory)


def test_common_factories_still_pass():
    from compatembed_index.factory import parse_factory
    from compatembed_index.limits import Limits

    for f in ("Flat", "IDMap2,Flat", "HNSW32", "HNSW32_SQ8", "HNSW16,PQ8", "IVF256,Flat", "IVF256_HNSW32,Flat",
              "IVF64,PQ16", "IVF64,PQ16x4fs", "IVF64,SQ8", "IMI2x8,Flat", "OPQ16_64,IVF256,PQ16", "PCA64,IVF16,Flat",
              "RR64,Flat", "L2norm,Flat", "PQ32x4fsr", "SQfp16", "IVF64,PQ8,RFlat", "IVF64,PQ8,Refine(SQfp16)"):
        parse_factory(f, Limits())


def test_estimated_memory_is_bounded_with_the_version_dimension(chain):
    from compatembed_index.limits import Limits

    small = Limits(max_index_bytes=64 << 20)
    svc = _service(chain, limits=small)
    # IVF8192 trains on 39 × 8192 staged vectors by default: ~126 MB at dim 32
    with pytest.raises(ConfigError, match=r"max_index_bytes=67108864.*train_size"):
        svc.create_collection("g", factory="IVF8192,Flat")
    svc.create_collection("g", factory="IVF8192,Flat", train_size=8192)  # a smaller training set fits
    # a version registered after the collection is checked at its first write, before anything is stored
    svc2 = IndexService(None, limits=small)
    svc2.create_collection("h", factory="IVF16384,Flat")  # no version registered: nothing to estimate yet
    svc2.register_version(chain.dirs["v1"])
    with pytest.raises(ConfigError, match="max_index_bytes"):
        svc2.add("h", "v1", [1], np.ones((1, 16)))
    assert len(svc2.collection("h")) == 0 and svc2.store.count("h") == {}


def test_search_params_are_bounded(chain):
    with pytest.raises(ConfigError, match="max_search_param"):
        _service(chain).create_collection("g", factory="HNSW16", search_params="efSearch=1000000000")
    with pytest.raises(ConfigError, match="must be name=<positive number>"):
        _service(chain).create_collection("g", factory="HNSW16", search_params="\ud800=4")


def test_factory_limits_come_from_the_service_settings(tmp_path):
    with TestClient(create_app(None, IndexSettings(data_dir=tmp_path / "d", max_nlist=16))) as c:
        deadline = time.monotonic() + 20
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = c.post("/collections", json={"name": "x", "factory": "IVF32,Flat"})
        assert r.status_code == 400 and "max_nlist=16" in _error_of(r)["message"]
        assert c.post("/collections", json={"name": "x", "factory": "IVF16,Flat"}).status_code == 201


# -- 2. queries × k and the response size are bounded ----------------------------------------------

def test_result_slots_are_bounded_by_default_settings(chain):
    from compatembed_index.limits import Limits

    svc = _filled(chain, max_k=1000, max_batch=10_000, limits=Limits.from_settings(IndexSettings()))
    q = np.random.default_rng(1).normal(size=(1000, 32))
    t0 = time.perf_counter()
    with pytest.raises(LimitExceededError, match="1000000 result slots, above the limit max_result_slots=100000"):
        svc.search("g", "v3", q, k=1000)
    assert time.perf_counter() - t0 < 5  # refused before the search runs
    with pytest.raises(LimitExceededError, match="max_result_slots"):
        svc.calibrate("g", "v3", "v1", q, k=1000)
    assert svc.search("g", "v3", q[:100], k=1000).ids.shape == (100, 1000)  # 100,000 slots is fine


def test_http_search_over_the_slot_or_response_limit_gets_413(client):
    c, _, _ = client
    q = np.random.default_rng(1).normal(size=(30, 32)).tolist()
    r = c.post("/collections/g/search", json={"version": "v3", "vectors": q, "k": 50})
    assert r.status_code == 413 and "max_result_slots=1000" in _error_of(r)["message"]
    # 20 queries × k=50 fit the slots, but their hits with metadata would exceed 20,000 bytes
    r = c.post("/collections/g/search", json={"version": "v3", "vectors": q[:20], "k": 50})
    assert r.status_code == 413 and "max_response_bytes=20000" in _error_of(r)["message"]
    r = c.post("/collections/g/search", json={"version": "v3", "vectors": q[:5], "k": 50})
    assert r.status_code == 200 and len(r.content) < 20_000


# -- 3. a body that never arrives is answered 408; idle connections are closed ------------------------

def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_declared_body_that_never_arrives_gets_408_from_a_real_server(chain):
    svc = _filled(chain)
    settings = IndexSettings(body_timeout_seconds=1, keep_alive_seconds=1)
    with ServedApp(create_app(svc, settings), settings) as url:
        port = int(url.rsplit(":", 1)[1])
        for sent in (b"", b'{"version": "v3"'):  # nothing at all, and a body that stops half-way
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /collections/g/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n" + sent)
                t0 = time.monotonic()
                head = _read_response(sock, timeout=10)
                assert head.startswith(b"HTTP/1.1 408"), head
                assert time.monotonic() - t0 < 5
                assert b"connection: close" in head.lower()
                sock.settimeout(5)
                while sock.recv(4096):  # the server closes the connection
                    pass
        # an idle keep-alive connection is closed after keep_alive_seconds
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock, timeout=10).startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            sock.settimeout(10)
            while sock.recv(4096):
                pass
            assert time.monotonic() - t0 < 5
    svc.close()


def test_serve_passes_the_keep_alive_timeout_to_uvicorn(monkeypatch):
    import uvicorn

    for var in ("COMPATEMBED_INDEX_API_KEY", "COMPATEMBED_INDEX_HOST"):
        monkeypatch.delenv(var, raising=False)
    seen = []

    def fake_run(self, *a, **k):
        seen.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", "--keep-alive", "3", "--body-timeout", "2.5"]) == 0
    assert seen[-1].timeout_keep_alive == 3
    assert main(["serve"]) == 0 and seen[-1].timeout_keep_alive == 5


# -- 4. no silent loss of authentication ---------------------------------------------------------

@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
def test_empty_or_blank_api_key_is_a_startup_error(monkeypatch, capsys, key):
    with pytest.raises(ValidationError, match="api_key is empty or blank"):
        IndexSettings(api_key=key)
    monkeypatch.setenv("COMPATEMBED_INDEX_API_KEY", key)
    with pytest.raises(ValidationError, match="api_key is empty or blank"):
        IndexSettings()
    monkeypatch.delenv("COMPATEMBED_INDEX_API_KEY")
    assert main(["serve", "--api-key", key]) == 2
    assert "api_key" in capsys.readouterr().err


def test_non_loopback_bind_without_a_key_needs_insecure(monkeypatch, capsys):
    import uvicorn

    for var in ("COMPATEMBED_INDEX_API_KEY", "COMPATEMBED_INDEX_HOST", "COMPATEMBED_INDEX_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    started = []

    def fake_run(self, *a, **k):
        started.append(self.config.host)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert main(["serve", "--host", host]) == 2
        assert "--insecure" in capsys.readouterr().err
    assert started == []
    assert main(["serve", "--host", "0.0.0.0", "--insecure"]) == 0
    assert "without an API key" in capsys.readouterr().err  # a warning
    assert main(["serve", "--host", "0.0.0.0", "--api-key", KEY]) == 0
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert main(["serve", "--host", host]) == 0
    assert started == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "127.0.0.2", "::1", "localhost"]


# -- 5. authentication comes before the body is parsed ------------------------------------------------

def test_writes_are_authenticated_before_the_body_is_parsed(client):
    c, svc, _ = client
    r = c.post("/collections/g/points", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and _error_of(r)["error"] == "UnauthorizedError"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = c.post("/versions", json={"path": 5})  # a schema violation is not reported to a caller without a key
    assert r.status_code == 401
    r = c.post("/collections/g/points", content=b"{not json",
               headers={"content-type": "application/json", "X-API-Key": KEY})
    assert r.status_code == 422
    # reads need no key, and a 401 is counted under its route
    assert c.post("/collections/g/search", json={"version": "v3", "vectors": [[1.0] * 32]}).status_code == 200
    assert 'route="/collections/{name}/points",status="401"' in c.get("/metrics").text


def test_an_unauthenticated_write_is_refused_without_waiting_for_its_body(chain):
    svc = _filled(chain)
    settings = IndexSettings(api_key=KEY, body_timeout_seconds=30)
    with ServedApp(create_app(svc, settings), settings) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(b"POST /collections/g/points HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\n\r\n")
            t0 = time.monotonic()
            assert _read_response(sock, timeout=10).startswith(b"HTTP/1.1 401")
            assert time.monotonic() - t0 < 5
    svc.close()


# -- 6. no absolute server paths in answers ------------------------------------------------------

def test_snapshot_answers_hold_ids_and_relative_names(client):
    c, svc, tmp_path = client
    r = c.post("/collections/g/snapshot", headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert str(tmp_path) not in r.text
    (rec,) = r.json()["snapshots"]
    assert rec["collection"] == "g" and rec["id"] == f"{rec['seq']:020d}"
    assert rec["name"] == f"snapshots/g/{rec['id']}" and (tmp_path / "data" / rec["name"] / "manifest.json").is_file()
    assert str(tmp_path) not in c.get("/collections/g").text


# -- 7. the OpenAPI document and 405 ---------------------------------------------------------------

def test_openapi_describes_every_answer_and_the_api_key(client):
    c, _, _ = client
    doc = c.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                       "description": schemes["APIKeyHeader"]["description"]}
    assert schemes["BearerAuth"]["scheme"] == "bearer"
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}

    def codes(method, path):
        return set(ops[(method, path)]["responses"])

    add = ("POST", "/collections/{name}/points")
    assert {"200", "400", "401", "404", "408", "409", "413", "422", "500", "503"} <= codes(*add)
    assert ops[add]["security"] == [{"APIKeyHeader": []}, {"BearerAuth": []}]
    assert {"400", "404", "409", "413", "422"} <= codes("POST", "/collections/{name}/search")
    assert "401" not in codes("POST", "/collections/{name}/search") and "security" not in ops[
        ("POST", "/collections/{name}/search")]
    assert {"401", "409", "422"} <= codes("POST", "/versions")
    assert {"401", "404"} <= codes("POST", "/collections/{name}/snapshot")
    err = ops[add]["responses"]["413"]["content"]["application/json"]["schema"]["$ref"]
    assert err.endswith("/ErrorBody") and set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {
        "error", "message"}
    for (method, path), op in ops.items():  # every operation describes its errors
        if path not in ("/health", "/ready", "/metrics"):
            assert {"400", "413", "500", "503"} <= set(op["responses"]), (method, path)


def test_405_names_the_allowed_methods(client):
    c, _, _ = client
    r = c.put("/collections")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert c.patch("/collections/g").headers["allow"] == "DELETE, GET"
    assert c.get("/collections/g/search").headers["allow"] == "POST"


# -- 8. metadata that could not be returned is not accepted -------------------------------------------

def _nested(depth: int) -> dict:
    m: dict = {"leaf": 1}
    for _ in range(depth - 1):
        m = {"a": m}
    return m


def test_metadata_that_would_break_searches_is_refused_at_write(client):
    c, svc, _ = client
    h = {"X-API-Key": KEY, "content-type": "application/json"}
    body = {"version": "v3", "ids": [7000], "vectors": [[0.5] * 32]}
    r = c.post("/collections/g/points", json={**body, "metadata": [_nested(252)]}, headers=h)
    assert r.status_code == 400 and "deeper than the limit of 32" in _error_of(r)["message"]
    raw = json.dumps({**body, "metadata": [{"name": "@"}]}).replace("@", "\\ud800")  # a lone surrogate
    r = c.post("/collections/g/points", content=raw, headers=h)
    assert r.status_code == 400 and "surrogate" in _error_of(r)["message"]
    raw = json.dumps({**body, "metadata": [{"@": 1}]}).replace("@", "\\udfff")  # in a key as well
    assert c.post("/collections/g/points", content=raw, headers=h).status_code == 400
    r = c.post("/collections/g/points", json={**body, "metadata": [{"blob": "x" * 70_000}]}, headers=h)
    assert r.status_code == 413 and "max_metadata_bytes" in _error_of(r)["message"]
    assert svc.versions_of("g", [7000]) == [None]
    # what is accepted can always be returned: the deepest allowed metadata, non-ASCII text
    ok = {"deep": _nested(31), "text": "Grüße ✓ 𝄞"}
    assert c.post("/collections/g/points", json={**body, "metadata": [ok]}, headers=h).status_code == 200
    r = c.post("/collections/g/search", json={"version": "v3", "vectors": [[0.5] * 32], "k": 1})
    assert r.status_code == 200 and r.json()["results"][0][0] == {"id": 7000, "score": pytest.approx(1.0, abs=1e-5),
                                                                  "version": "v3", "metadata": ok}


# -- 9. version paths ------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "problem"), [
    ("\\ud800", "surrogate"),
    ("x" * 100_000, "above the limit of 4096"),
    ("/tmp/a\\u0000b", "NUL"),
    ("/tmp/" + "x" * 300 + "/v1", "longer than 255 bytes"),
    ("", "non-empty"),
])
def test_unusable_version_paths_are_refused_with_a_4xx(client, path, problem):
    c, _, _ = client
    raw = '{"path": "' + path + '"}'
    r = c.post("/versions", content=raw, headers={"X-API-Key": KEY, "content-type": "application/json"})
    assert r.status_code == 400 and problem in _error_of(r)["message"], r.text


def test_unreadable_version_directory_is_a_manifest_error(tmp_path):
    d = write_version(tmp_path, "v1", 8)
    (d / "manifest.json").chmod(0)
    try:
        if _readable(d / "manifest.json"):
            pytest.skip("running as a user who reads files regardless of their mode")
        with pytest.raises(ManifestError, match="cannot read"):
            read_version_dir(d)
    finally:
        (d / "manifest.json").chmod(0o644)


def _readable(p: Path) -> bool:
    try:
        p.read_bytes()
        return True
    except OSError:
        return False


# -- 10. edges must fit the dimensions of the versions they join --------------------------------------

def test_identity_edge_between_different_dimensions_is_refused_at_registration(tmp_path, chain):
    old = write_version(tmp_path, "old", 8)
    new = write_version(tmp_path, "new", 12, identity="old")
    svc = IndexService(None)
    svc.register_version(old)
    with pytest.raises(ManifestError, match="identity edge new -> old maps dim 12 -> 12, but the versions have dims "
                                            "12 and 8"):
        svc.register_version(new)
    assert [v["version_id"] for v in svc.versions()] == ["old"]
    # the other order: the misfit edge is found when its target arrives
    svc2 = IndexService(None)
    svc2.register_version(new)
    with pytest.raises(ManifestError, match="dims 12 and 8"):
        svc2.register_version(old)
    # forward edges too: an MLP whose input does not fit the source
    rng = np.random.default_rng(0)
    fwd = write_version(tmp_path / "f", "fwd", 8, forward=("old", [(rng.normal(size=(8, 6)), np.zeros(8))], "relu",
                                                           True))
    with pytest.raises(ManifestError, match="forward edge old -> fwd maps dim 6 -> 8"):
        svc.register_version(fwd)


def test_misfit_edge_over_http_is_a_422(client, tmp_path):
    c, _, _ = client
    d = write_version(tmp_path / "extra", "v9", 20, identity="v1")
    r = c.post("/versions", json={"path": str(d)}, headers={"X-API-Key": KEY})
    assert r.status_code == 422 and _error_of(r)["error"] == "ManifestError"
    assert "v9" not in {v["version_id"] for v in c.get("/versions").json()}


def test_stored_misfit_version_still_loads(tmp_path):
    """A version stored before registration checked edges must not stop the service from starting."""
    write_version(tmp_path, "old", 8)
    new = read_version_dir(write_version(tmp_path, "new", 12, identity="old"))
    svc = IndexService(tmp_path / "d")
    svc.register_version(tmp_path / "old")
    svc.store.put_version(new.version_id, new.manifest, new.files)  # as the unchecked code stored it
    svc.close()
    again = IndexService(tmp_path / "d")
    assert {v["version_id"] for v in again.versions()} == {"old", "new"}
    with pytest.raises(ManifestError, match="dims 12 and 8"):
        again.route("new", "old")
    again.close()


# -- 11. names are matched in full ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ab\n", "ab\n\n", "\nab", "a b"])
def test_names_with_a_trailing_newline_are_refused(chain, tmp_path, name):
    svc = _filled(chain)
    with pytest.raises(InvalidInputError, match="collection name"):
        svc.create_collection(name)
    with pytest.raises(InvalidInputError, match="alias name"):
        svc.set_alias(name, "g")
    assert svc.list_collections() == ["g"] and svc.aliases() == {}
    d = write_version(tmp_path / "n", "vx", 8)
    m = json.loads((d / "manifest.json").read_text())
    m["version_id"] = "vx\n"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="version_id"):
        read_version_dir(d)
    m["version_id"], m["compatibility"] = "vx", [{"kind": "identity", "target": "v1\n"}]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="target"):
        read_version_dir(d)


# -- 12. scores are always finite ------------------------------------------------------------------

def test_calibration_that_would_overflow_is_refused(client):
    c, svc, _ = client
    for scale, shift in ((1e300, 0.0), (1e7, 0.0), (1.0, 1e35), (1.0, -1e35)):
        r = c.put("/collections/g/calibration", json={"query_version": "v3", "segment_version": "v1",
                                                       "scale": scale, "shift": shift}, headers={"X-API-Key": KEY})
        assert r.status_code == 400 and "float32" in _error_of(r)["message"], (scale, shift, r.text)
    assert svc.stats("g")["calibration"] == {}
    r = c.post("/collections/g/search", json={"version": "v3", "vectors": [[0.3] * 32], "k": 50})
    assert r.status_code == 200
    assert all(isinstance(h["score"], float) for h in r.json()["results"][0])


def test_a_stored_overflowing_calibration_is_dropped_at_load(chain, tmp_path):
    svc = _filled(chain, tmp_path / "d")
    cfg = svc.collection("g").config.to_dict()
    cfg["calibration"] = {"v3|v1": [1e300, 0.0]}  # as the unchecked code stored it
    svc.store.update_collection("g", cfg)
    svc.close()
    svc = IndexService(tmp_path / "d")
    assert svc.stats("g")["calibration"] == {}
    assert any("v3|v1 dropped" in p for p in svc.stats("g")["load_report"])
    res = svc.search("g", "v3", np.ones((2, 32)), k=60)
    assert np.isfinite(res.scores[res.ids >= 0]).all()
    svc.close()


def test_l2_vectors_whose_distances_would_overflow_are_refused(tmp_path):
    svc = IndexService(None)
    svc.register_version(write_version(tmp_path, "raw", 4, normalized=False))
    svc.create_collection("g")
    with pytest.raises(InvalidInputError, match="norm 2e\\+19, above the limit of 1e\\+15"):
        svc.add("g", "raw", [1], [[2e19, 0, 0, 0]])
    assert len(svc.collection("g")) == 0
    svc.add("g", "raw", [1, 2], [[1e15 / 2, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]])  # at the bound: still found
    res = svc.search("g", "raw", [[-1e15 / 2, 0, 0, 0]], k=2)
    assert sorted(res.ids[0].tolist()) == [1, 2] and np.isfinite(res.scores).all()
    assert res.scores[0, 0] == pytest.approx(-(1e15 / 2 + 1) ** 2 - 29, rel=1e-5)
    with pytest.raises(InvalidInputError, match="queries row 0 has L2 norm"):
        svc.search("g", "raw", [[0, 0, 3e18, 0]], k=2)


def test_queries_mapped_into_an_l2_space_are_bounded_too(tmp_path):
    svc = IndexService(None)
    svc.register_version(write_version(tmp_path, "raw", 4, normalized=False))
    svc.register_version(write_version(tmp_path, "big", 4, affine=("raw", np.eye(4) * 1e20, np.zeros(4), False)))
    svc.create_collection("g")
    svc.add("g", "raw", [1], [[1.0, 0, 0, 0]])
    with pytest.raises(InvalidInputError, match="queries mapped along query:big>raw"):
        svc.search("g", "big", [[1.0, 0, 0, 0]], k=1)
