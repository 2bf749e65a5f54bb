"""``compatembed-index``: manage and serve a mixed-version gallery from the command line.

Every command but ``serve`` opens the data directory, does one thing and prints JSON. Arrays are
``.npy`` files (``compatembed-extract`` writes ``embeddings.npy`` and ``ids.npy``); ``add`` and
``upgrade`` also take the directory it wrote (``--embeddings``), its ``shard-i-of-n`` parts merged.
Errors caused by input print one line to stderr and exit with status 2.

Examples::

    compatembed-index --data-dir gallery register runs/v1 runs/v2
    compatembed-index --data-dir gallery create photos --factory HNSW32
    compatembed-index --data-dir gallery add photos --version v1 --vectors emb.npy --ids ids.npy
    compatembed-index --data-dir gallery add photos --version v1 --embeddings emb/v1   # compatembed-extract's out, sharded or not
    compatembed-index --data-dir gallery search photos --version v2 --queries q.npy -k 10
    compatembed-index --data-dir gallery locate photos --ids ids.npy
    compatembed-index --data-dir gallery serve --port 8080 --api-key "$KEY"
    compatembed-index serve --backend milvus --milvus-uri ./gallery.db          # milvus-lite, embedded
    compatembed-index --backend milvus --milvus-uri http://host:19530 search photos --version v2 --queries q.npy
    compatembed-index --data-dir gallery export photos --to-milvus ./gallery.db  # and --from-milvus URI back
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compatembed_index.embedding_sets import read_embedding_set
from compatembed_index.errors import ConfigError, IndexServiceError, InvalidInputError

_logger = logging.getLogger(__name__)


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file not found: {path}") from None
    except ValueError as exc:
        raise InvalidInputError(f"{what} file {path} is not a plain .npy array: {exc}") from None


def _load_items(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, ids)`` of ``add``/``upgrade``: from ``--embeddings DIR`` or from ``--vectors`` and ``--ids``."""
    if args.embeddings is not None:
        if args.vectors is not None or args.ids is not None:
            raise InvalidInputError("give --embeddings DIR or --vectors and --ids, not both")
        stored = read_embedding_set(args.embeddings)
        made_by = stored.meta.get("version_id")
        if made_by is not None and made_by != args.version:
            raise InvalidInputError(f"{args.embeddings} was embedded by version {made_by!r}, not --version {args.version!r}")
        return stored.embeddings, stored.ids
    if args.vectors is None or args.ids is None:
        raise InvalidInputError("give --vectors and --ids (.npy files), or --embeddings DIR")
    return _load_npy(args.vectors, "vectors"), _load_npy(args.ids, "ids")


def _load_metadata(path: str | None, n: int) -> list[dict[str, Any] | None] | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        meta = [json.loads(line) if line.strip() and line.strip() != "null" else None for line in lines]
    except FileNotFoundError:
        raise InvalidInputError(f"metadata file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"metadata file {path}: not JSON lines ({exc})") from None
    if len(meta) != n:
        raise InvalidInputError(f"metadata file {path} has {len(meta)} lines for {n} items")
    return meta


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="compatembed-index",
        description="A mixed-version FAISS gallery: items embedded by different model versions, "
        "searched from any version through the compatibility edges in the version manifests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: COMPATEMBED_INDEX_DATA_DIR, COMPATEMBED_INDEX_API_KEY and the other "
        "COMPATEMBED_INDEX_* settings (see docs/index_service.md).",
    )
    p.add_argument("--data-dir", default=os.environ.get("COMPATEMBED_INDEX_DATA_DIR"),
                   help="store + snapshots directory (default: $COMPATEMBED_INDEX_DATA_DIR)")
    p.add_argument("--backend", choices=("faiss", "milvus"), default=None,
                   help="faiss (FAISS + SQLite in --data-dir, the default) or milvus (Milvus at --milvus-uri)")
    p.add_argument("--milvus-uri", default=None,
                   help="./gallery.db (milvus-lite, embedded) or http://host:19530 (Milvus standalone or cluster)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("register", help="register model version directories (checksums verified)")
    s.add_argument("paths", nargs="+", help="model version directories written by compatembed-train")

    s = sub.add_parser("create", help="create a collection")
    s.add_argument("name", help="name of the new collection")
    s.add_argument("--factory", default="Flat", help="FAISS factory string for every segment (default Flat)")
    s.add_argument("--factory-for", action="append", default=[], metavar="VERSION=FACTORY",
                   help="per-version factory override (repeatable)")
    s.add_argument("--search-params", default="", help="FAISS search parameters, e.g. nprobe=16 or efSearch=64")
    s.add_argument("--train-size", type=int, default=None, help="vectors to collect before training IVF/PQ")
    s.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu",
                   help="where segments live: gpu needs faiss-gpu and a GPU; auto uses one when faiss-gpu sees it")

    for name, helptext in (("add", "add items of one model version"),
                           ("upgrade", "move existing items to a newer version (partial backfill)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("name", help="collection or alias")
        s.add_argument("--version", required=True, help="model version that embedded the vectors")
        s.add_argument("--vectors", help=".npy (N, D) float32 (with --ids; or --embeddings)")
        s.add_argument("--ids", help=".npy (N,) integer ids")
        s.add_argument("--embeddings", metavar="DIR",
                       help="a directory compatembed-extract wrote, whole or in shard-i-of-n parts (merged, every id once)")
        s.add_argument("--metadata", help="JSON lines, one object (or null) per item")
        if name == "add":
            s.add_argument("--upsert", action="store_true", help="replace items that already exist")

    s = sub.add_parser("delete", help="delete items")
    s.add_argument("name", help="collection or alias")
    s.add_argument("--ids", required=True, help=".npy (N,) integer ids")

    s = sub.add_parser("locate", help="which version holds each item (what a partial backfill still has to do)")
    s.add_argument("name", help="collection or alias")
    s.add_argument("--ids", required=True, help=".npy (N,) integer ids")
    s.add_argument("--out", help="write the per-item versions here as JSON; stdout then gets the counts only")

    s = sub.add_parser("search", help="search with queries of one model version")
    s.add_argument("name", help="collection or alias")
    s.add_argument("--version", required=True, help="model version of the queries")
    s.add_argument("--queries", required=True, help=".npy (Q, D) float32")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--allow-partial", action="store_true", help="skip segments without a route instead of failing")
    s.add_argument("--out", help="write the JSON results here instead of stdout")

    s = sub.add_parser("materialise", help="forward-upgrade a segment into a newer version's space")
    s.add_argument("name", help="collection or alias")
    s.add_argument("--source", required=True)
    s.add_argument("--target", required=True)

    s = sub.add_parser("calibrate", help="fit the score calibration of one cross-version route from held-out queries")
    s.add_argument("name", help="collection or alias")
    s.add_argument("--query-version", required=True, help="version of the held-out queries")
    s.add_argument("--segment-version", required=True, help="the segment whose route is calibrated")
    s.add_argument("--queries", required=True, help=".npy (Q, D) float32 held-out queries")
    s.add_argument("--query-ids", default=None,
                   help=".npy (Q,) ids of the queries when they are stored items (their own match is left out)")
    s.add_argument("-k", type=int, default=10, help="top scores per query that enter the moments")

    s = sub.add_parser("snapshot", help="write FAISS snapshots (all collections by default)")
    s.add_argument("name", nargs="?", help="collection or alias (default: every collection)")

    s = sub.add_parser("stats", help="print service or collection stats")
    s.add_argument("name", nargs="?", help="collection or alias (default: the whole service)")

    s = sub.add_parser("alias", help="point an alias at a collection (atomic switch)")
    s.add_argument("alias")
    s.add_argument("collection")

    s = sub.add_parser("export", help="copy a collection from the FAISS data directory into Milvus, or back")
    s.add_argument("name", help="collection to copy")
    way = s.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-milvus", metavar="URI", help="copy --data-dir's collection into Milvus at URI")
    way.add_argument("--from-milvus", metavar="URI", help="copy the collection in Milvus at URI into --data-dir")
    s.add_argument("--as", dest="target", default=None, help="name of the copy (default: the same name)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    s = sub.add_parser("repair", help="Milvus: finish moves that a dead writer left half done")
    s.add_argument("name", help="collection or alias")

    s = sub.add_parser("serve", help="serve the HTTP API (binds 127.0.0.1 unless --host says otherwise)")
    s.add_argument("--backend", choices=("faiss", "milvus"), default=argparse.SUPPRESS,
                   help="faiss (default) or milvus")
    s.add_argument("--milvus-uri", default=argparse.SUPPRESS, help="./gallery.db or http://host:19530")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="TCP port (default 8080)")
    s.add_argument("--api-key", default=None,
                   help="require this key for writes (default: $COMPATEMBED_INDEX_API_KEY; none: writes open); "
                   "an empty or blank key is an error")
    s.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback --host without an API key (anyone who can reach it can write)")
    s.add_argument("--max-body-bytes", type=int, default=None)
    s.add_argument("--max-k", type=int, default=None)
    s.add_argument("--max-result-slots", type=int, default=None, help="largest queries × k per search")
    s.add_argument("--body-timeout", type=float, default=None, dest="body_timeout_seconds",
                   help="seconds to receive a whole request body before answering 408 (default 30)")
    s.add_argument("--keep-alive", type=int, default=None, dest="keep_alive_seconds",
                   help="seconds an idle keep-alive connection stays open (default 5)")
    s.add_argument("--read-threads", type=int, default=None,
                   help="worker threads reads may hold at once (default 32); writes queue apart")
    s.add_argument("--write-threads", type=int, default=None, help="worker threads writes may hold at once (default 4)")
    s.add_argument("--no-batching", action="store_true",
                   help="run each search as its own FAISS call (default: concurrent searches share one)")
    s.add_argument("--image-root", default=None,
                   help="directory of the items' images: the web page (/ui) shows metadata['image'] files under it")
    s.add_argument("--report-dir", default=None,
                   help="a compatibility report directory (report.md and plots) that the web page (/ui) shows")
    s.add_argument("--no-access-log", action="store_true",
                   help="no log line per request (saves server CPU; /metrics still counts every request)")
    return p


def _settings(args: argparse.Namespace) -> Any:
    from compatembed_index.settings import IndexSettings

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    for key in ("backend", "milvus_uri",
                "host", "port", "api_key", "max_body_bytes", "max_k", "max_result_slots", "body_timeout_seconds",
                "keep_alive_seconds", "read_threads", "write_threads", "image_root", "report_dir"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "no_access_log", False):
        overrides["access_log"] = False
    if getattr(args, "no_batching", False):
        overrides["batch_searches"] = False
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    return IndexSettings(**overrides)


def check_bind(settings: Any) -> None:
    """Refuse to serve a non-loopback address without an API key unless ``insecure`` says so (then warn).

    Raises:
        ConfigError: non-loopback host, no key, not ``insecure``.
    """
    if settings.loopback or settings.api_key is not None:
        return
    if not settings.insecure:
        raise ConfigError(
            f"refusing to bind {settings.host} without an API key: anyone who can reach it could write. Set "
            "--api-key (or COMPATEMBED_INDEX_API_KEY), bind 127.0.0.1, or pass --insecure to accept the risk"
        )
    print(f"warning: --insecure: binding {settings.host} without an API key: anyone who can reach it can write",
          file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from compatembed_index.server import create_app, uvicorn_config

    settings = _settings(args)
    check_bind(settings)
    if settings.data_dir is None and settings.backend == "faiss":
        _logger.warning("no --data-dir: serving an in-memory index (nothing survives a restart)")
    # keep-alive bounds idle connections; the app itself bounds the time to receive a body (408)
    server = uvicorn.Server(uvicorn_config(create_app(None, settings), settings))
    server.run()
    return 0 if server.started else 3


def _run(args: argparse.Namespace) -> Any:
    import dataclasses

    from compatembed_index.api import IndexService
    from compatembed_index.limits import Limits

    settings = _settings(args)
    if settings.backend == "faiss" and not args.data_dir:
        raise InvalidInputError("--data-dir (or COMPATEMBED_INDEX_DATA_DIR) is required")
    # local batch work: no per-request batch, result or response limits; factory and metadata limits hold,
    # since a server will later load what the CLI writes
    limits = dataclasses.replace(Limits.from_settings(settings), max_result_slots=None, max_response_bytes=None)

    def open_service(backend: str, uri: str | None) -> IndexService:
        return IndexService(args.data_dir, max_k=settings.max_k, max_batch=10**9, mmap=settings.mmap,
                            keep_snapshots=settings.keep_snapshots, limits=limits, backend=backend,
                            milvus_uri=uri, milvus_prefix=settings.milvus_prefix,
                            move_grace_s=settings.move_grace_seconds)

    if args.command == "export":
        from compatembed_index.export import copy_collection

        if not args.data_dir:
            raise InvalidInputError("export copies between --data-dir (FAISS/SQLite) and Milvus: give --data-dir")
        with open_service("faiss", None) as local, \
                open_service("milvus", args.to_milvus or args.from_milvus) as remote:
            src, dst = (local, remote) if args.to_milvus else (remote, local)
            return copy_collection(src, dst, args.name, target=args.target, progress=not args.no_progress)
    with open_service(settings.backend, settings.milvus_uri) as svc:
        c = args.command
        if c == "repair":
            return {"repaired": svc.repair(args.name)}
        if c == "register":
            return [svc.register_version(p)["version_id"] for p in args.paths]
        if c == "create":
            factories = {}
            for item in args.factory_for:
                if "=" not in item:
                    raise InvalidInputError(f"--factory-for needs VERSION=FACTORY, got {item!r}")
                v, f = item.split("=", 1)
                factories[v] = f
            return svc.create_collection(args.name, factory=args.factory, factories=factories,
                                         search_params=args.search_params, train_size=args.train_size,
                                         device=args.device)
        if c in ("add", "upgrade"):
            x, ids = _load_items(args)
            meta = _load_metadata(args.metadata, len(ids))
            if c == "add":
                seq = svc.add(args.name, args.version, ids, x, meta, upsert=args.upsert)
            else:
                seq = svc.upgrade(args.name, args.version, ids, x, meta)
            return {c: int(len(ids)), "seq": seq}
        if c == "delete":
            return {"deleted": svc.delete(args.name, _load_npy(args.ids, "ids"))}
        if c == "locate":
            ids = _load_npy(args.ids, "ids")
            versions = svc.versions_of(args.name, ids)
            counts: dict[str, int] = {}
            for v in versions:
                counts[v or "absent"] = counts.get(v or "absent", 0) + 1
            if args.out:
                Path(args.out).write_text(json.dumps({"ids": ids.tolist(), "versions": versions}))
                return {"counts": counts, "written": args.out}
            return {"counts": counts, "versions": versions}
        if c == "search":
            q = _load_npy(args.queries, "queries")
            res = svc.search(args.name, args.version, q, args.k, allow_partial=args.allow_partial)
            out = {"results": [res.hits(i) for i in range(len(q))], "routes": res.routes, "skipped": res.skipped}
            if args.out:
                Path(args.out).write_text(json.dumps(out))
                return {"written": args.out, "queries": len(q)}
            return out
        if c == "materialise":
            return svc.materialise(args.name, args.source, args.target)
        if c == "calibrate":
            q = _load_npy(args.queries, "queries")
            own = _load_npy(args.query_ids, "query ids") if args.query_ids else None
            scale, shift = svc.calibrate(args.name, args.query_version, args.segment_version, q, args.k, query_ids=own)
            return {"route": f"{args.query_version}|{args.segment_version}", "scale": scale, "shift": shift}
        if c == "snapshot":
            return {"snapshots": svc.snapshot(args.name)}
        if c == "stats":
            return svc.stats(args.name)
        if c == "alias":
            svc.set_alias(args.alias, args.collection)
            return {"alias": args.alias, "collection": args.collection}
    raise AssertionError(f"unhandled command {args.command}")  # argparse restricts the choices


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 for an error caused by input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        print(json.dumps(_run(args), indent=1, default=str))
        return 0
    except IndexServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"error: invalid setting: {exc.errors()[0].get('loc')}: {exc.errors()[0].get('msg')}",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
