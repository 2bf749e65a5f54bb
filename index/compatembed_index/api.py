"""The Python API of the index service: versions, collections, aliases, and their durable state.

:class:`IndexService` owns one data directory::

    <data_dir>/index.sqlite3     the store (SQLite, WAL, synchronous=FULL): the source of truth
    <data_dir>/snapshots/        FAISS snapshots per collection (atomic, checksummed)
    <data_dir>/LOCK              held (flock) by the one process serving the directory

Example:
    >>> svc = IndexService("/srv/gallery")                      # doctest: +SKIP
    >>> svc.register_version("runs/v1"); svc.register_version("runs/v2")
    >>> svc.create_collection("photos", factory="HNSW32")
    >>> svc.add("photos", "v1", ids, vectors_v1)
    >>> res = svc.search("photos", "v2", queries_v2, k=10)     # searches v1 items through v2 → v1
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from compatembed_index.collection import Collection, CollectionConfig, SearchResult
from compatembed_index.errors import (
    CollectionNotFoundError,
    ConfigError,
    ConflictError,
    DataDirLockedError,
    InvalidInputError,
    ManifestError,
)
from compatembed_index.factory import check_factory, check_search_params
from compatembed_index.limits import Limits
from compatembed_index.registry import ModelVersion, VersionRegistry, parse_version, read_version_dir
from compatembed_index.routing import RoutedCollection
from compatembed_index.rwlock import RWLock
from compatembed_index.segment import Segment
from compatembed_index.store import Catalog, SQLiteStore, Store
from compatembed_index.validation import check_name

BACKENDS = ("faiss", "milvus")
"""Where a gallery's vectors live: FAISS segments over SQLite in ``data_dir``, or Milvus at ``milvus_uri``."""

_logger = logging.getLogger(__name__)


class _DirLock:
    """An exclusive ``flock`` on ``<data_dir>/LOCK``: two processes must not serve one directory."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DataDirLockedError(f"{path.parent}: data directory is in use by another process") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        import fcntl

        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def _describe(v: ModelVersion) -> dict[str, Any]:
    return {"version_id": v.version_id, "dim": v.dim, "normalized": v.normalized,
            "edges": [{"kind": e.kind, ("source" if e.kind == "forward" else "target"): e.other} for e in v.edges]}


class IndexService:
    """Mixed-version galleries with durable writes (implements :class:`~compatembed_index.interface.Gallery`).

    Args:
        data_dir: directory for the store and snapshots; None keeps everything in memory (tests, demos).
        max_k: largest k a search may ask for.
        max_batch: largest number of vectors, queries or ids in one call.
        mmap: load snapshot indexes memory-mapped where FAISS allows it.
        keep_snapshots: snapshots kept per collection.
        store: a :class:`Store` to use instead of the SQLite store in ``data_dir``.
        limits: factory, metadata, result and response limits (:class:`Limits`; its defaults otherwise).
        batch_searches: run concurrent searches of a collection with the same query version and options
            as one FAISS call (:mod:`~compatembed_index.batching`).
        backend: ``faiss`` (FAISS segments and the SQLite store in ``data_dir``, one process) or
            ``milvus`` (everything in Milvus at ``milvus_uri``; ``data_dir`` is not used, and any number
            of service replicas may serve the same Milvus).
        milvus_uri: ``./gallery.db`` (milvus-lite, in process) or ``http://host:19530``.
        milvus_prefix: prefix of the Milvus collections this service owns (one namespace per deployment).
        move_grace_s: Milvus: wait between a moved item's insert and its delete (see
            :mod:`compatembed_index.milvus.spaces`).
        catalog_ttl_s: Milvus: how often a replica re-reads versions, collections and aliases.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        max_k: int = 1000,
        max_batch: int = 100_000,
        mmap: bool = False,
        keep_snapshots: int = 2,
        store: Catalog | None = None,
        limits: Limits | None = None,
        batch_searches: bool = True,
        backend: str = "faiss",
        milvus_uri: str | None = None,
        milvus_prefix: str = "ce_",
        move_grace_s: float = 0.5,
        catalog_ttl_s: float = 1.0,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "milvus" and not milvus_uri:
            raise ConfigError("the milvus backend needs a Milvus URI (./gallery.db or http://host:19530)")
        self.backend = backend
        self.batch_searches = batch_searches
        self.data_dir = Path(data_dir) if data_dir is not None and backend == "faiss" else None
        self.max_k, self.max_batch, self.mmap, self.keep_snapshots = max_k, max_batch, mmap, keep_snapshots
        self.limits = limits or Limits()
        self.milvus_prefix, self.move_grace_s, self.catalog_ttl_s = milvus_prefix, move_grace_s, catalog_ttl_s
        self._milvus: Any = None
        self._dirlock: _DirLock | None = None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dirlock = _DirLock(self.data_dir / "LOCK")
        try:
            if store is None and backend == "milvus":
                from compatembed_index.milvus import connect
                from compatembed_index.milvus.catalog import MilvusCatalog

                self._milvus = connect(milvus_uri)  # type: ignore[arg-type]
                store = MilvusCatalog(self._milvus, prefix=milvus_prefix)
            elif store is None:
                store = SQLiteStore(self.data_dir / "index.sqlite3" if self.data_dir else ":memory:")
            self.store = store
            self._refreshed = time.monotonic()
            self.registry = VersionRegistry()
            self._lock = RWLock()
            self._collections: dict[str, RoutedCollection] = {}
            self._aliases: dict[str, str] = {}
            self._ready = threading.Event()
            self._load()
        except BaseException:
            if self._dirlock:
                self._dirlock.release()
            raise

    @property
    def snapshot_root(self) -> Path | None:
        """Where snapshots are written (None in memory)."""
        return self.data_dir / "snapshots" if self.data_dir is not None else None

    @property
    def ready(self) -> bool:
        """True once every collection is loaded."""
        return self._ready.is_set()

    def _load(self) -> None:
        for manifest, files in self.store.versions():
            version = parse_version(manifest, files)
            try:
                self.registry.register(version)
            except ManifestError as exc:  # stored before registration checked edges: searches using it fail
                _logger.error("stored version %s: %s", version.version_id, exc)
                self.registry.register(version, check_edges=False)
        for name, raw in sorted(self.store.collections().items()):
            coll = self._make_collection(name, CollectionConfig.from_dict(raw))
            coll.load()
            self._collections[name] = coll
        self._aliases = self.store.aliases()
        self._ready.set()

    def _refresh(self, *, force: bool = False) -> None:
        """Milvus: pick up versions, collections, configs and aliases that other replicas wrote."""
        if self.backend != "milvus" or (not force and time.monotonic() - self._refreshed < self.catalog_ttl_s):
            return
        self._refreshed = time.monotonic()
        for manifest, files in self.store.versions():
            if manifest.get("version_id") not in self.registry:
                self.registry.register(parse_version(manifest, files), check_edges=False)
        configs = self.store.collections()
        with self._lock.write():
            for name, raw in sorted(configs.items()):
                if name in self._collections:
                    self._collections[name].config = CollectionConfig.from_dict(raw)
                else:
                    coll = self._make_collection(name, CollectionConfig.from_dict(raw))
                    coll.load()
                    self._collections[name] = coll
            for name in [n for n in self._collections if n not in configs]:
                self._collections.pop(name).dropped = True
            self._aliases = self.store.aliases()

    def _make_collection(self, name: str, config: CollectionConfig) -> RoutedCollection:
        if self.backend == "milvus":
            from compatembed_index.milvus.collection import MilvusCollection

            return MilvusCollection(name, config, self.registry, self.store, client=self._milvus,
                                    prefix=self.milvus_prefix, move_grace_s=self.move_grace_s, max_k=self.max_k,
                                    max_batch=self.max_batch, limits=self.limits,
                                    batch_searches=self.batch_searches)
        assert isinstance(self.store, Store)
        return Collection(name, config, self.registry, self.store, snapshot_root=self.snapshot_root,
                          max_k=self.max_k, max_batch=self.max_batch, mmap=self.mmap,
                          keep_snapshots=self.keep_snapshots, limits=self.limits, batch_searches=self.batch_searches)

    # -- versions ---------------------------------------------------------------------------------
    def repair(self, collection: str) -> int:
        """Milvus: finish moves that a dead writer left half done; returns how many stale rows were deleted.

        Raises:
            ConfigError: the FAISS backend (its moves are one transaction; nothing to repair).
        """
        coll = self.collection(collection)
        if not hasattr(coll, "repair"):
            raise ConfigError("repair is for the Milvus backend: FAISS/SQLite moves are one transaction")
        return int(coll.repair())

    def register_version(self, path: str | Path) -> dict[str, Any]:
        """Register the model version directory at ``path`` (checksums verified; idempotent).

        Returns ``{version_id, dim, normalized, edges}``, as :meth:`versions` lists it; the parsed
        :class:`ModelVersion` is ``self.registry.get(version_id)``.

        Raises:
            InvalidInputError: ``path`` is not a usable path (empty, too long, a NUL or a lone surrogate).
            ManifestError: the directory breaks the contract, fails a checksum, cannot be read, or
                declares an edge that does not fit the dimensions of a registered version.
            ConflictError: another manifest is registered under the same id.
        """
        version = read_version_dir(path)
        with self._lock.write():
            if self.registry.register(version):
                self.store.put_version(version.version_id, version.manifest, version.files)
        return _describe(self.registry.get(version.version_id))

    def import_version(self, manifest: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        """Register a version from its manifest and files (as a catalog holds them): copies between services."""
        version = parse_version(manifest, files)
        with self._lock.write():
            if self.registry.register(version):
                self.store.put_version(version.version_id, version.manifest, version.files)
        return _describe(self.registry.get(version.version_id))

    def versions(self) -> list[dict[str, Any]]:
        """Registered versions with their dimension, normalisation and edges."""
        self._refresh()
        return [_describe(v) for v in self.registry.list()]

    def route(self, query_version: str, segment_version: str) -> list[str] | None:
        """The chain of versions a query of ``query_version`` follows to ``segment_version`` (None: no route)."""
        r = self.registry.query_route(query_version, segment_version)
        return None if r is None else r.path

    # -- collections ------------------------------------------------------------------------------
    def create_collection(self, name: str, **options: Any) -> dict[str, Any]:
        """Create an empty collection; ``options`` are :class:`CollectionConfig` fields.

        Raises:
            ConflictError: the name is taken by a collection or an alias.
            ConfigError: an unknown option, an unusable factory string, or a factory whose counts (nlist,
                HNSW M, PQ M and nbits) or estimated memory at a registered version's dimension exceed
                the limits (:class:`Limits`).
        """
        check_name(name, "collection")
        config = CollectionConfig.from_dict(options)
        if config.materialised or config.calibration:
            raise InvalidInputError("materialised copies and calibration are set after creation")
        if self.backend == "milvus":
            self._refresh(force=True)
            with self._lock.write():
                if name in self._collections or name in self._aliases:
                    raise ConflictError(f"name {name!r} is already used by a collection or alias")
                coll = self._make_collection(name, config)  # refuses a factory Milvus cannot build
                self.store.create_collection(name, config.to_dict())
                self._collections[name] = coll
            return coll.stats()
        # Parse and bound every factory string before FAISS builds anything (it allocates as it parses),
        # with the memory estimate at the dimension of each registered version that would use it; a
        # version registered later is checked at its first write.
        factories = {config.factory, *config.factories.values()}
        for f in factories:
            check_factory(f, self.limits, train_size=config.train_size)
        check_search_params(config.search_params, self.limits)
        for v in self.registry.list():
            check_factory(config.factory_for(v.version_id), self.limits, dim=v.dim, train_size=config.train_size,
                          what=f"version {v.version_id}")
        # Build a throwaway segment per factory string so a typo fails here rather than at the first add.
        # The real dimension is per version; 1536 is divisible by most PQ/OPQ sub-quantiser counts, and a
        # factory that does not fit a version's dimension fails (ConfigError) at that version's first add,
        # before anything is written.
        for f in factories:
            Segment(1536, f, "ip", train_size=config.train_size, search_params=config.search_params,
                    device=config.device)
        with self._lock.write():
            if name in self._collections or name in self._aliases:
                raise ConflictError(f"name {name!r} is already used by a collection or alias")
            self.store.create_collection(name, config.to_dict())
            coll = self._make_collection(name, config)
            self._collections[name] = coll
        return coll.stats()

    def drop_collection(self, name: str) -> None:
        """Delete a collection, its items, snapshots and the aliases that point at it."""
        import shutil

        with self._lock.write():
            if name not in self._collections:
                raise CollectionNotFoundError(f"no collection named {name!r}")
            coll = self._collections[name]
            # Wait for the collection's in-flight writes and mark it dropped under its own lock: a write
            # that looked the collection up before the drop then fails instead of being acknowledged
            # into a collection that no longer exists (and reappearing in a new one of the same name).
            # Lock order: service, then collection; no collection method takes the service lock.
            with coll.lock.write():
                coll.dropped = True
                self.store.drop_collection(name)
                if self.backend == "milvus":
                    coll.drop()  # type: ignore[attr-defined]
            del self._collections[name]
            self._aliases = {a: c for a, c in self._aliases.items() if c != name}
            if self.snapshot_root is not None:
                shutil.rmtree(self.snapshot_root / name, ignore_errors=True)

    def collection(self, name: str) -> RoutedCollection:
        """The collection called ``name`` or pointed at by alias ``name``."""
        self._refresh()
        with self._lock.read():
            target = self._aliases.get(name, name)
            coll = self._collections.get(target)
        if coll is None and self.backend == "milvus":  # made by another replica since the last refresh?
            self._refresh(force=True)
            with self._lock.read():
                coll = self._collections.get(self._aliases.get(name, name))
        if coll is None:
            raise CollectionNotFoundError(
                f"no collection or alias named {name!r} (collections: {sorted(self._collections) or 'none'})"
            )
        return coll

    def list_collections(self) -> list[str]:
        """Collection names."""
        self._refresh()
        with self._lock.read():
            return sorted(self._collections)

    # -- aliases ----------------------------------------------------------------------------------
    def set_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection``; the switch is one committed write, atomic for readers."""
        check_name(alias, "alias")
        with self._lock.write():
            if alias in self._collections:
                raise ConflictError(f"{alias!r} is a collection name; an alias cannot shadow it")
            if collection not in self._collections:
                raise CollectionNotFoundError(f"no collection named {collection!r}")
            self.store.set_alias(alias, collection)
            self._aliases[alias] = collection

    def remove_alias(self, alias: str) -> None:
        """Delete ``alias``."""
        with self._lock.write():
            if alias not in self._aliases:
                raise CollectionNotFoundError(f"no alias named {alias!r}")
            self.store.set_alias(alias, None)
            del self._aliases[alias]

    def aliases(self) -> dict[str, str]:
        """Alias → collection."""
        self._refresh()
        with self._lock.read():
            return dict(self._aliases)

    # -- data -------------------------------------------------------------------------------------
    def add(self, collection: str, version: str, ids: Any, vectors: Any,
            metadata: list[dict[str, Any] | None] | None = None, *, upsert: bool = False) -> int:
        """Add (or with ``upsert`` replace) items; returns the durable write's sequence number. See :meth:`Collection.add`."""
        return self.collection(collection).add(version, ids, vectors, metadata, upsert=upsert)

    def upgrade(self, collection: str, version: str, ids: Any, vectors: Any,
                metadata: list[dict[str, Any] | None] | None = None) -> int:
        """Move existing items to ``version`` with new vectors. See :meth:`Collection.upgrade`."""
        return self.collection(collection).upgrade(version, ids, vectors, metadata)

    def delete(self, collection: str, ids: Any) -> int:
        """Delete items; returns how many existed."""
        return self.collection(collection).delete(ids)[1]

    def versions_of(self, collection: str, ids: Any) -> list[str | None]:
        """The version whose segment holds each item (None where absent). See :meth:`Collection.versions_of`."""
        return self.collection(collection).versions_of(ids)

    def get_points(self, collection: str, ids: Any, *, include_vectors: bool = True,
                   include_metadata: bool = True) -> list[dict[str, Any] | None]:
        """Stored items with their version, metadata and stored vector (None where absent). See
        :meth:`Collection.get_points`."""
        return self.collection(collection).get_points(ids, include_vectors=include_vectors,
                                                      include_metadata=include_metadata)

    def search(self, collection: str, version: str, queries: Any, k: int = 10, *, allow_partial: bool = False,
               include_metadata: bool = True) -> SearchResult:
        """Mixed-version search. See :meth:`Collection.search`."""
        return self.collection(collection).search(version, queries, k, allow_partial=allow_partial,
                                                  include_metadata=include_metadata)

    def materialise(self, collection: str, source: str, target: str) -> dict[str, Any]:
        """Forward-upgrade segment ``source`` into ``target``'s space. See :meth:`Collection.materialise`."""
        return self.collection(collection).materialise(source, target)

    def set_calibration(self, collection: str, query_version: str, segment_version: str, scale: float,
                        shift: float) -> None:
        """Set one route's score map explicitly. See :meth:`Collection.set_calibration`."""
        self.collection(collection).set_calibration(query_version, segment_version, scale, shift)

    def calibrate(self, collection: str, query_version: str, segment_version: str, queries: Any,
                  k: int = 10, *, query_ids: Any = None) -> tuple[float, float]:
        """Fit one route's score calibration. See :meth:`Collection.calibrate`."""
        return self.collection(collection).calibrate(query_version, segment_version, queries, k, query_ids=query_ids)

    def snapshot_paths(self, collection: str | None = None) -> list[Path]:
        """Snapshot one collection (or all); returns the snapshot directories (absolute paths, for local use)."""
        return [self.data_dir / r["name"] for r in self.snapshot(collection)]  # type: ignore[operator]

    def snapshot(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Snapshot one collection (or all); returns what a remote caller may see of each snapshot.

        Each record holds the collection, the snapshot's ``id`` (its directory name, the zero-padded
        sequence number), ``seq``, and ``name``, the directory relative to the data directory. No
        absolute server path is disclosed.
        """
        names = [self.collection(collection).name] if collection else self.list_collections()
        out = []
        for n in names:
            path = self.collection(n).snapshot()
            out.append({"collection": n, "id": path.name, "seq": int(path.name),
                        "name": f"snapshots/{n}/{path.name}"})
        return out

    def stats(self, collection: str | None = None) -> dict[str, Any]:
        """Stats of one collection, or of the service (versions, collections, aliases)."""
        if collection is not None:
            return self.collection(collection).stats()
        return {"backend": self.backend, "versions": self.versions(), "aliases": self.aliases(),
                "collections": {n: self.collection(n).stats() for n in self.list_collections()},
                "last_seq": self.store.last_seq(), "data_dir": str(self.data_dir) if self.data_dir else None}

    def close(self, *, snapshot: bool = False) -> None:
        """Release the store and the directory lock (after a snapshot of every collection if asked)."""
        try:
            if snapshot and self.snapshot_root is not None:
                self.snapshot()
        finally:
            self.store.close()
            if self._milvus is not None:
                self._milvus.close()
                self._milvus = None
            if self._dirlock:
                self._dirlock.release()
                self._dirlock = None

    def __enter__(self) -> IndexService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
