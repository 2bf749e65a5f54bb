"""Benchmark (not a test): the same mixed-version searches through the FAISS and the Milvus backend.

One gallery of three chained versions (v3 → v2 affine, v2 → v1 prefix; made by
:func:`tools.bench_index.make_chain`), split between the versions, is loaded into both backends from
the same vectors in one run. The same v3 queries are searched through both, routes and merge being
the service's; each backend's recall@k is measured against exact search (numpy: the queries mapped
into each space, cosine over every item, merged), next to ingest time and per-request latency
(p50/p99 of one-query searches, in process) and the batch throughput. Milvus targets (``--milvus``):
``lite`` (milvus-lite embedded, a temporary ``.db``), ``standalone`` (a Milvus server process started
here on 127.0.0.1 by :mod:`tools.milvus_server`, stopped at the end), or the URI of a running server;
by default both ``lite`` and ``standalone``.

Writes ``docs/results/milvus_bench.json`` and ``.md`` (``--out``).

Example::

    python -m tools.bench_milvus --gallery 20000 --queries 200 --factories Flat,HNSW32
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index.api import IndexService

from tools.bench_index import machine, make_chain

LOG = logging.getLogger("bench_milvus")
REPO = Path(__file__).resolve().parents[1]
SPLIT = {"v1": 0.5, "v2": 0.3, "v3": 0.2}  # share of the gallery per version (a backfill under way)


def _norm(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def exact_topk(q3: np.ndarray, arrays: dict[str, Any], data: dict[str, tuple[np.ndarray, np.ndarray]],
               k: int) -> np.ndarray:
    """Exact merged top-k ids of v3 queries over the mixed gallery (numpy, the contract's transforms)."""
    q = {"v3": _norm(q3)}
    q["v2"] = _norm(q["v3"] @ arrays["W"].T + arrays["b"])
    q["v1"] = _norm(q["v2"][:, : arrays["d1"]])
    scores = np.hstack([q[v] @ _norm(x).T for v, (_, x) in data.items()])
    ids = np.concatenate([i for i, _ in data.values()])
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def _pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.array(xs) * 1000.0, p))


def bench_backend(svc: IndexService, name: str, factory: str, search_params: str,
                  data: dict[str, tuple[np.ndarray, np.ndarray]], q: np.ndarray, k: int,
                  exact: np.ndarray, single: int) -> dict[str, Any]:
    """Load the gallery, then time batch and one-query searches; returns the row of the report."""
    svc.create_collection(name, factory=factory, search_params=search_params)
    t0 = time.perf_counter()
    for v, (ids, x) in data.items():
        for lo in range(0, len(ids), 5000):
            svc.add(name, v, ids[lo:lo + 5000], x[lo:lo + 5000])
    ingest = time.perf_counter() - t0
    svc.search(name, "v3", q[:2], k, include_metadata=False)  # warm
    t0 = time.perf_counter()
    res = svc.search(name, "v3", q, k, include_metadata=False)
    batch = time.perf_counter() - t0
    lat = []
    for i in range(min(single, len(q))):
        t1 = time.perf_counter()
        svc.search(name, "v3", q[i:i + 1], k, include_metadata=False)
        lat.append(time.perf_counter() - t1)
    return {"backend": svc.backend, "factory": factory, "search_params": search_params,
            "ingest_s": ingest, "ingest_items_per_s": sum(len(i) for i, _ in data.values()) / ingest,
            "batch_queries": len(q), "batch_s": batch, "batch_qps": len(q) / batch,
            "single_query_ms_p50": _pct(lat, 50), "single_query_ms_p99": _pct(lat, 99), "single_queries": len(lat),
            "recall_at_k": recall(res.ids, exact), "routes": res.routes, "ids": res.ids}


def _server_version(uri: str) -> str:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        return client.get_server_version()
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every factory through FAISS and every Milvus target; returns the JSON-ready results."""
    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_milvus_"))
    d1, d2, d3 = args.dims
    arrays = make_chain(tmp / "versions", d1, d2, d3, rng)
    dims = {"v1": d1, "v2": d2, "v3": d3}
    data, start = {}, 0
    for v, share in SPLIT.items():
        n = int(args.gallery * share)
        data[v] = (np.arange(start, start + n, dtype=np.int64), rng.normal(size=(n, dims[v])).astype(np.float32))
        start += n
    q = rng.normal(size=(args.queries, d3)).astype(np.float32)
    exact = exact_topk(q, arrays, data, args.k)
    rows = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)  # last: after the services and the server stopped
        services = [IndexService(None, max_batch=10**6)]
        stack.callback(services[0].close)
        labels = ["faiss"]
        for target in args.milvus:
            if target == "lite":
                uri, label = str(tmp / "bench.db"), "milvus-lite (embedded)"
            elif target == "standalone":
                from tools.milvus_server import running_milvus_server

                LOG.info("starting a Milvus server process")
                uri = stack.enter_context(running_milvus_server(tmp / "server"))
                label = "milvus standalone " + _server_version(uri)
            else:
                uri, label = target, "milvus at " + target
            svc = IndexService(None, backend="milvus", milvus_uri=uri, milvus_prefix=args.milvus_prefix, max_batch=10**6)
            stack.callback(svc.close)
            if target not in ("lite", "standalone"):  # leave a shared server as it was
                stack.callback(lambda svc=svc: [svc.drop_collection(f"bench{n}") for n in range(len(args.factories))])
            services.append(svc)
            labels.append(label)
        for svc in services:
            for v in ("v1", "v2", "v3"):
                svc.register_version(tmp / "versions" / v)
        for n, spec in enumerate(args.factories):
            factory, _, params = spec.partition(":")
            group = []
            for svc, label in zip(services, labels):
                LOG.info("%s %s: loading %d items", label, factory, args.gallery)
                group.append({**bench_backend(svc, f"bench{n}", factory, params, data, q, args.k, exact, args.single),
                              "backend": label})
            reference = group[0]["ids"]
            for r in group:
                r["same_ids_as_faiss"] = float(np.mean([set(x.tolist()) == set(y.tolist())
                                                        for x, y in zip(r["ids"], reference)]))
            for r in group:
                r.pop("ids")
            rows += group
    import pymilvus

    return {"argv": " ".join(sys.argv[1:]), "gallery": args.gallery, "split": SPLIT, "dims": dims,
            "queries": args.queries, "k": args.k, "milvus": args.milvus,
            "pymilvus": pymilvus.__version__, "machine": {**machine(), "python_impl": platform.python_implementation()},
            "rows": rows}


def write_md(res: dict[str, Any], path: Path) -> None:
    """The results as a short markdown table."""
    lines = [
        "# FAISS and Milvus backends: the same mixed-version searches",
        "",
        f"Generated by `python -m tools.bench_milvus {res['argv']}`.",
        "",
        f"Gallery {res['gallery']} items split {res['split']} between v1/v2/v3 (dims {res['dims']}), "
        f"{res['queries']} v3 queries, k={res['k']}; routes and merge are the service's on both backends. "
        f"pymilvus {res['pymilvus']}. Machine: {res['machine']['cpu_count']} CPUs, "
        f"load average at start {res['machine']['load_average_at_start']}.",
        "",
        "| backend | factory | recall@k vs exact | same ids as FAISS | ingest items/s | batch QPS "
        "| one query p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['factory']} {r['search_params']} | {r['recall_at_k']:.4f} "
                     f"| {r['same_ids_as_faiss']:.3f} | {r['ingest_items_per_s']:.0f} | {r['batch_qps']:.1f} "
                     f"| {r['single_query_ms_p50']:.2f} | {r['single_query_ms_p99']:.2f} |")
    lines += ["", "A Milvus search pass makes one Strong search call per segment, all at once (the v3 queries reach "
              "every segment, so none is counted); the metadata is not fetched (`include_metadata=false`). Recall "
              "is measured, not assumed: an HNSW row of Milvus can differ from FAISS's HNSW on the same settings."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, then write ``--out`` (JSON) and its ``.md``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", type=int, default=20_000, help="items in the mixed gallery")
    p.add_argument("--queries", type=int, default=200, help="v3 queries")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--dims", type=int, nargs=3, default=[64, 96, 128], metavar=("D1", "D2", "D3"))
    p.add_argument("--factories", type=lambda s: s.split(","), default=["Flat", "HNSW32:efSearch=64"],
                   help="comma-separated FACTORY[:SEARCH_PARAMS], each mapped to Milvus (Flat, HNSW<M>, IVF<n>,Flat)")
    p.add_argument("--single", type=int, default=100, help="one-query searches timed per backend")
    p.add_argument("--milvus", nargs="+", default=["lite", "standalone"], metavar="TARGET",
                   help="lite (embedded milvus-lite), standalone (a Milvus server process started here), or a server "
                        "URI such as http://host:19530 (default: lite standalone)")
    p.add_argument("--milvus-prefix", default="bench_", help="prefix of the Milvus collections made")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/milvus_bench.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    write_md(res, args.out.with_suffix(".md"))
    LOG.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
