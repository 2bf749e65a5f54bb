"""Micro-batched searches: same answers as one search at a time, errors reach only their request,
bounded batches; over HTTP, base64 vectors and a write that is not starved by a crowd of searches."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from compatembed_index import collection as collection_module
from compatembed_index.api import IndexService
from compatembed_index.batching import SearchBatcher
from compatembed_index.client import IndexClient
from compatembed_index.server import create_app
from compatembed_index.settings import IndexSettings

from index_helpers import Chain, ServedApp, assert_same_topk, normalize, oracle_topk

WAIT = 10.0  # generous: the machine may be loaded


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _pending(batcher: SearchBatcher, key) -> int:
    with batcher._cond:
        q = batcher._queues.get(key)
        return 0 if q is None else len(q.pending)


class _Gated:
    """A row-wise function (row sums) whose first call blocks until released, recording every batch."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, q: np.ndarray) -> np.ndarray:
        self.calls.append(q.copy())
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(WAIT)
        if (q < 0).any():
            raise ValueError(f"negative query row {int(np.flatnonzero((q < 0).any(axis=1))[0])}")
        return q.sum(axis=1)


def _run_concurrently(batcher: SearchBatcher, fn: _Gated, queries: list[np.ndarray], key="k", max_rows=None):
    """The first query leads (and blocks); the others queue behind it; then all are released."""
    with ThreadPoolExecutor(len(queries)) as pool:
        def one(q):
            try:
                result, rows = batcher.run(key, q, fn, max_rows=max_rows)
                return result[rows]
            except ValueError as exc:
                return exc

        first = pool.submit(one, queries[0])
        assert fn.entered.wait(WAIT)
        rest = []
        for n, q in enumerate(queries[1:], start=1):  # queued in a known order
            rest.append(pool.submit(one, q))
            _wait_for(lambda n=n: _pending(batcher, key) == n, "request did not queue")
        fn.release.set()
        return [first.result(WAIT)] + [f.result(WAIT) for f in rest]


def test_requests_that_wait_share_one_call_and_get_their_own_rows():
    batcher, fn = SearchBatcher(), _Gated()
    queries = [np.full((n, 3), float(i + 1)) for i, n in enumerate([1, 1, 2, 1, 3])]
    results = _run_concurrently(batcher, fn, queries)
    assert [len(c) for c in fn.calls] == [1, 1 + 2 + 1 + 3]  # the leader alone, then every waiter at once
    for q, r in zip(queries, results):
        np.testing.assert_array_equal(r, q.sum(axis=1))  # the oracle: each request's own rows
    assert batcher.requests == 5 and batcher.batches == 2


def test_an_error_reaches_only_the_request_that_caused_it():
    batcher, fn = SearchBatcher(), _Gated()
    queries = [np.ones((1, 2)), np.ones((1, 2)) * 2, -np.ones((1, 2)), np.ones((2, 2)) * 3]
    results = _run_concurrently(batcher, fn, queries)
    assert isinstance(results[2], ValueError)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i], queries[i].sum(axis=1))


@pytest.mark.parametrize("max_rows,call_max", [(4, None), (100, 3)])
def test_batches_never_exceed_their_bound(max_rows, call_max):
    batcher, fn = SearchBatcher(max_rows=max_rows), _Gated()
    queries = [np.full((1, 2), float(i)) for i in range(1, 9)]
    results = _run_concurrently(batcher, fn, queries, max_rows=call_max)
    bound = min(max_rows, call_max or max_rows)
    assert all(len(c) <= bound for c in fn.calls)
    assert sum(len(c) for c in fn.calls) == 8
    np.testing.assert_array_equal(np.concatenate(results), [2.0 * i for i in range(1, 9)])


def test_disabled_batcher_calls_once_per_request():
    batcher = SearchBatcher(enabled=False)
    result, rows = batcher.run("k", np.ones((2, 2)), lambda q: q.sum(axis=1))
    np.testing.assert_array_equal(result[rows], [2.0, 2.0])
    assert batcher.batches == batcher.requests == 1
    with pytest.raises(ValueError, match="max_rows"):
        SearchBatcher(max_rows=0)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("batching"))
    rng = np.random.default_rng(3)
    x = {"v1": rng.normal(size=(300, Chain.D1)), "v3": rng.normal(size=(200, Chain.D3))}
    ids = {"v1": np.arange(300), "v3": np.arange(200) + 1000}
    return chain, x, ids


def _service(gallery, batch: bool) -> IndexService:
    chain, x, ids = gallery
    svc = IndexService(None, batch_searches=batch)
    for d in chain.dirs.values():
        svc.register_version(d)
    svc.create_collection("g")
    for v in x:
        svc.add("g", v, ids[v], x[v], [{"id": int(i)} for i in ids[v]])
    return svc


def test_concurrent_searches_equal_the_brute_force_oracle(gallery, monkeypatch):
    """Many threads, one query each, mixed versions: every answer is the oracle's, with its own metadata."""
    chain, x, ids = gallery
    svc = _service(gallery, batch=True)
    coll = svc.collection("g")
    slow = collection_module.search_plans
    entered = threading.Event()

    def first_slow(plans, q, k):  # hold the first batch long enough for the others to queue behind it
        if not entered.is_set():
            entered.set()
            time.sleep(0.3)
        return slow(plans, q, k)

    monkeypatch.setattr(collection_module, "search_plans", first_slow)
    q3 = np.random.default_rng(4).normal(size=(24, Chain.D3))
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: svc.search("g", "v3", q3[i:i + 1], k=7), range(24)))
    assert coll._batcher.batches < coll._batcher.requests  # they did ride together
    ref_ids, ref_scores = oracle_topk(
        {"v3": normalize(q3), "v1": chain.q_to(q3, "v1")},
        {"v3": (ids["v3"], x["v3"]), "v1": (ids["v1"], x["v1"])}, 7)
    got_ids = np.concatenate([a.ids for a in answers])
    got_scores = np.concatenate([a.scores for a in answers])
    assert_same_topk(got_ids, got_scores, ref_ids, ref_scores)
    for a in answers:
        assert [m["id"] for m in a.metadata[0]] == a.ids[0].tolist()
        assert a.routes == {"v3": "direct", "v1": "query:v3>v2>v1"}


@pytest.fixture(scope="module")
def served(gallery):
    svc = _service(gallery, batch=True)
    settings = IndexSettings(read_threads=2, write_threads=2)
    with ServedApp(create_app(svc, settings), settings) as url:
        yield url, svc


def test_base64_vectors_answer_like_json_rows(served):
    url, svc = served
    q = np.random.default_rng(5).normal(size=(3, Chain.D3)).astype(np.float32)
    b64 = {"shape": [3, Chain.D3], "data": base64.b64encode(q.astype("<f4").tobytes()).decode()}
    with httpx.Client(base_url=url, timeout=WAIT) as http:
        as_rows = http.post("/collections/g/search", json={"version": "v3", "vectors": q.tolist(), "k": 5})
        as_b64 = http.post("/collections/g/search", json={"version": "v3", "vectors_b64": b64, "k": 5})
        assert as_rows.status_code == as_b64.status_code == 200, as_b64.text
        assert as_rows.json() == as_b64.json()
        ref = svc.search("g", "v3", q, k=5)
        assert [[h["id"] for h in hits] for hits in as_b64.json()["results"]] == ref.ids.tolist()

        bad = {
            "not base64": ({"vectors_b64": {**b64, "data": "@@@"}}, 400, "base64"),
            "short data": ({"vectors_b64": {**b64, "shape": [4, Chain.D3]}}, 400, "needs 512"),
            "rows of another dim": ({"vectors_b64": {**b64, "shape": [6, Chain.D3 // 2]}}, 400, "dim"),
            "empty shape": ({"vectors_b64": {**b64, "shape": [0, Chain.D3]}}, 400, "positive"),
            "no shape": ({"vectors_b64": {"data": b64["data"]}}, 422, "shape"),
            "both encodings": ({"vectors_b64": b64, "vectors": q.tolist()}, 422, "exactly once"),
            "neither": ({}, 422, "exactly once"),
            "non-finite": ({"vectors_b64": {"shape": [1, Chain.D3], "data": base64.b64encode(
                np.full(Chain.D3, np.inf, "<f4").tobytes()).decode()}}, 400, "NaN or Inf"),
        }
        for what, (fields, status, words) in bad.items():
            r = http.post("/collections/g/search", json={"version": "v3", "k": 5, **fields})
            assert r.status_code == status, (what, r.text)
            assert words in r.json()["message"], (what, r.text)
        r = http.post("/collections/g/search", json={"version": "nope", "vectors_b64": b64})
        assert r.status_code == 404 and "nope" in r.json()["message"]


def test_client_sends_binary_vectors_and_round_trips(served):
    url, svc = served
    client = IndexClient(url)
    try:
        x = np.random.default_rng(6).normal(size=(4, Chain.D1)).astype(np.float32)
        client.add("g", "v1", [5000, 5001, 5002, 5003], x)
        assert client.versions_of("g", [5000, 5003]) == ["v1", "v1"]
        hit = client.search("g", "v1", x[:1], k=1, allow_partial=True)
        assert hit.ids[0, 0] == 5000 and hit.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    finally:
        client.delete("g", [5000, 5001, 5002, 5003])
        client.close()


def test_a_crowd_of_searches_does_not_keep_a_write_from_starting(served, monkeypatch):
    """More blocked searches than any shared thread pool holds: the write still runs at once."""
    url, svc = served
    release = threading.Event()
    inside = threading.Semaphore(0)
    real_search = svc.search

    def blocked_search(*args, **kwargs):  # holds a read thread, not the collection's lock
        inside.release()
        assert release.wait(WAIT * 3)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(svc, "search", blocked_search)
    q = np.zeros((1, Chain.D3)).tolist()
    q[0][0] = 1.0
    crowd = 48  # above anyio's default of 40 threads, the pool reads and writes shared before
    with ThreadPoolExecutor(crowd) as pool:
        futures = [pool.submit(httpx.post, f"{url}/collections/g/search", json={"version": "v3", "vectors": q},
                               timeout=WAIT * 4) for _ in range(crowd)]
        for _ in range(2):  # both read threads are taken; the rest of the crowd waits for one
            assert inside.acquire(timeout=WAIT)
        try:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/collections/g/points", timeout=WAIT,
                           json={"version": "v1", "ids": [7000], "vectors": [[1.0] + [0.0] * (Chain.D1 - 1)]})
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < WAIT
        finally:
            release.set()
        assert all(f.result().status_code == 200 for f in futures)
    assert svc.versions_of("g", [7000]) == ["v1"]
    svc.delete("g", [7000])
