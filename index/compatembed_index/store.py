"""The durable store: items (vectors, metadata, sequence numbers), collections, aliases, versions.

The store is the source of truth; FAISS indexes are caches rebuilt or caught up from it. :class:`Store`
is the small interface the rest of the service uses, so a distributed engine can replace SQLite later.
:class:`SQLiteStore` runs SQLite in WAL mode with ``synchronous=FULL``: a write method returns only
after its transaction has committed and the WAL has been fsynced, which is when the service
acknowledges the write.

Every write transaction takes the next global sequence number. An item row carries the sequence
number of its last change; a delete keeps the row as a tombstone (``deleted = 1``, no vector) so that
replaying "rows with seq > snapshot seq" also replays deletions. Tombstones older than every
snapshot can be compacted away.
"""

from __future__ import annotations

import abc
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ItemRows:
    """A chunk of item rows read back from the store.

    Attributes:
        ids: (N,) int64.
        versions: N version ids.
        vectors: N float32 arrays (None for tombstones).
        metadata: N JSON strings or None.
        deleted: (N,) bool.
        seqs: (N,) int64 sequence numbers.
    """

    ids: np.ndarray
    versions: list[str]
    vectors: list[np.ndarray | None]
    metadata: list[str | None]
    deleted: np.ndarray
    seqs: np.ndarray
    matrix: np.ndarray | None = None
    """(N, D) float32 vectors in one array, when the rows were read for one version (no tombstones)."""


class Catalog(abc.ABC):
    """Versions, collection configs and aliases: the part of the store every backend needs
    (:class:`SQLiteStore` on one machine; ``MilvusCatalog`` in Milvus, shared by service replicas)."""

    @abc.abstractmethod
    def put_version(self, version_id: str, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        """Persist a registered model version (manifest and transform files)."""

    @abc.abstractmethod
    def versions(self) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        """Every persisted version as (manifest, files)."""

    @abc.abstractmethod
    def create_collection(self, name: str, config: dict[str, Any]) -> int:
        """Persist a new collection; returns the sequence number of the write."""

    @abc.abstractmethod
    def update_collection(self, name: str, config: dict[str, Any]) -> int:
        """Replace a collection's config; returns the sequence number."""

    @abc.abstractmethod
    def drop_collection(self, name: str) -> int:
        """Delete a collection, its items and the aliases pointing at it; returns the sequence number."""

    @abc.abstractmethod
    def collections(self) -> dict[str, dict[str, Any]]:
        """Collection name → config."""

    @abc.abstractmethod
    def set_alias(self, alias: str, collection: str | None) -> int:
        """Point ``alias`` at ``collection`` (None removes it); returns the sequence number."""

    @abc.abstractmethod
    def aliases(self) -> dict[str, str]:
        """Alias → collection."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The latest committed sequence number."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store."""


class Store(Catalog):
    """What the FAISS backend needs from durable storage: the catalog and the items (:class:`SQLiteStore`)."""

    @abc.abstractmethod
    def upsert_items(self, collection: str, version: str, ids: np.ndarray, vectors: np.ndarray,
                     metadata: Sequence[str | None] | None) -> int:
        """Insert or replace items (N,) with vectors (N, D) in one transaction; returns its sequence number.

        ``metadata`` None keeps each existing row's metadata (used by upgrades).
        """

    @abc.abstractmethod
    def delete_items(self, collection: str, ids: np.ndarray) -> tuple[int, int]:
        """Tombstone ``ids``; returns (sequence number, number of live items deleted)."""

    @abc.abstractmethod
    def locations(self, collection: str) -> Iterator[tuple[np.ndarray, list[str], list[str | None]]]:
        """Live items in chunks of (ids, versions, metadata), without vectors."""

    @abc.abstractmethod
    def iter_rows(self, collection: str, *, after_seq: int = 0, version: str | None = None,
                  include_deleted: bool = False) -> Iterator[ItemRows]:
        """Item rows with ``seq > after_seq`` (optionally of one version) in chunks, ordered by (seq, id)."""

    def get_items(self, collection: str, ids: np.ndarray) -> dict[int, tuple[str, np.ndarray]]:
        """The live items among ``ids``: id → (version, (D,) float32 stored vector); absent ids are left out.

        This default scans every live row; :class:`SQLiteStore` looks the ids up by key.
        """
        wanted = set(np.asarray(ids, dtype=np.int64).tolist())
        out: dict[int, tuple[str, np.ndarray]] = {}
        for rows in self.iter_rows(collection):
            for i, v, x in zip(rows.ids.tolist(), rows.versions, rows.vectors):
                if i in wanted and x is not None:
                    out[i] = (v, x)
        return out

    @abc.abstractmethod
    def count(self, collection: str) -> dict[str, int]:
        """Live items per version."""

    @abc.abstractmethod
    def compact(self, collection: str, upto_seq: int) -> int:
        """Drop tombstones with ``seq <= upto_seq``; returns how many."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (version_id TEXT PRIMARY KEY, manifest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS version_files (
    version_id TEXT NOT NULL, path TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (version_id, path));
CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, config TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, collection TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL, id INTEGER NOT NULL, version TEXT NOT NULL, vector BLOB,
    metadata TEXT, deleted INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL,
    UNIQUE (collection, id));
CREATE INDEX IF NOT EXISTS items_seq ON items (collection, seq, id);
CREATE INDEX IF NOT EXISTS items_version ON items (collection, version, deleted, id);
"""


class SQLiteStore(Store):
    """SQLite (WAL, ``synchronous=FULL``) implementation of :class:`Store`.

    Args:
        path: database file, or ``":memory:"`` for a store that lives as long as the process.
        chunk: rows per chunk when reading back.
    """

    def __init__(self, path: str | Path, *, chunk: int = 65536) -> None:
        self.path = str(path)
        self.chunk = chunk
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._conn.executescript(_SCHEMA)
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('seq', 0)")
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            (schema,) = c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if schema != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: store schema {schema} is not the supported {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _next_seq(self, c: sqlite3.Connection) -> int:
        c.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
        return int(c.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def put_version(self, version_id: str, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", (version_id, json.dumps(manifest)))
            c.execute("DELETE FROM version_files WHERE version_id = ?", (version_id,))
            c.executemany(
                "INSERT INTO version_files VALUES (?, ?, ?)", [(version_id, p, d) for p, d in files.items()]
            )

    def versions(self) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        with self._lock:
            rows = self._conn.execute("SELECT version_id, manifest FROM versions ORDER BY version_id").fetchall()
            out = []
            for vid, manifest in rows:
                files = dict(
                    self._conn.execute("SELECT path, data FROM version_files WHERE version_id = ?", (vid,))
                )
                out.append((json.loads(manifest), files))
            return out

    def create_collection(self, name: str, config: dict[str, Any]) -> int:
        with self._tx() as c:
            seq = self._next_seq(c)
            c.execute("INSERT INTO collections VALUES (?, ?, ?)", (name, json.dumps(config), seq))
            return seq

    def update_collection(self, name: str, config: dict[str, Any]) -> int:
        with self._tx() as c:
            seq = self._next_seq(c)
            c.execute("UPDATE collections SET config = ?, seq = ? WHERE name = ?", (json.dumps(config), seq, name))
            return seq

    def drop_collection(self, name: str) -> int:
        with self._tx() as c:
            seq = self._next_seq(c)
            c.execute("DELETE FROM items WHERE collection = ?", (name,))
            c.execute("DELETE FROM aliases WHERE collection = ?", (name,))
            c.execute("DELETE FROM collections WHERE name = ?", (name,))
            return seq

    def collections(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {n: json.loads(cfg) for n, cfg in self._conn.execute("SELECT name, config FROM collections")}

    def set_alias(self, alias: str, collection: str | None) -> int:
        with self._tx() as c:
            seq = self._next_seq(c)
            if collection is None:
                c.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            else:
                c.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?)", (alias, collection))
            return seq

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT alias, collection FROM aliases"))

    def upsert_items(
        self,
        collection: str,
        version: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        metadata: Sequence[str | None] | None,
    ) -> int:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._tx() as c:
            seq = self._next_seq(c)
            if metadata is None:
                c.executemany(
                    "INSERT INTO items (collection, id, version, vector, metadata, deleted, seq) "
                    "VALUES (?, ?, ?, ?, NULL, 0, ?) ON CONFLICT (collection, id) DO UPDATE SET "
                    "version = excluded.version, vector = excluded.vector, deleted = 0, seq = excluded.seq",
                    ((collection, int(i), version, v.tobytes(), seq) for i, v in zip(ids, vectors)),
                )
            else:
                c.executemany(
                    "INSERT INTO items (collection, id, version, vector, metadata, deleted, seq) "
                    "VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (collection, id) DO UPDATE SET "
                    "version = excluded.version, vector = excluded.vector, metadata = excluded.metadata, "
                    "deleted = 0, seq = excluded.seq",
                    ((collection, int(i), version, v.tobytes(), m, seq) for i, v, m in zip(ids, vectors, metadata)),
                )
            return seq

    def delete_items(self, collection: str, ids: np.ndarray) -> tuple[int, int]:
        with self._tx() as c:
            seq = self._next_seq(c)
            cur = c.executemany(
                "UPDATE items SET deleted = 1, vector = NULL, metadata = NULL, seq = ? "
                "WHERE collection = ? AND id = ? AND deleted = 0",
                ((seq, collection, int(i)) for i in ids),
            )
            return seq, int(cur.rowcount)

    def locations(self, collection: str) -> Iterator[tuple[np.ndarray, list[str], list[str | None]]]:
        last = -1
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT id, version, metadata FROM items WHERE collection = ? AND deleted = 0 AND id > ? "
                    "ORDER BY id LIMIT ?",
                    (collection, last, self.chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield (np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows], [r[2] for r in rows])

    def iter_rows(self, collection: str, *, after_seq: int = 0, version: str | None = None,
                  include_deleted: bool = False) -> Iterator[ItemRows]:
        cursor = (after_seq, -1)
        cond = "" if include_deleted else " AND deleted = 0"
        if version is not None:
            cond += " AND version = ?"
        while True:
            params: list[Any] = [collection, cursor[0], cursor[0], cursor[1]]
            if version is not None:
                params.append(version)
            with self._lock:
                rows = self._conn.execute(
                    "SELECT id, version, vector, metadata, deleted, seq FROM items "
                    f"WHERE collection = ? AND (seq > ? OR (seq = ? AND id > ?)){cond} ORDER BY seq, id LIMIT ?",
                    (*params, self.chunk),
                ).fetchall()
            if not rows:
                return
            cursor = (rows[-1][5], rows[-1][0])
            matrix = None
            if version is not None and not include_deleted:
                matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ItemRows(
                ids=np.array([r[0] for r in rows], dtype=np.int64),
                versions=[r[1] for r in rows],
                vectors=[None if r[2] is None else np.frombuffer(r[2], dtype=np.float32) for r in rows],
                metadata=[r[3] for r in rows],
                deleted=np.array([bool(r[4]) for r in rows]),
                seqs=np.array([r[5] for r in rows], dtype=np.int64),
                matrix=matrix,
            )

    def get_items(self, collection: str, ids: np.ndarray) -> dict[int, tuple[str, np.ndarray]]:
        out: dict[int, tuple[str, np.ndarray]] = {}
        keys = [int(i) for i in np.asarray(ids, dtype=np.int64).tolist()]
        for start in range(0, len(keys), 500):  # below SQLite's limit on bound parameters
            part = keys[start:start + 500]
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT id, version, vector FROM items WHERE collection = ? AND deleted = 0 "
                    f"AND id IN ({','.join('?' * len(part))})", (collection, *part)).fetchall()
            out.update((int(r[0]), (r[1], np.frombuffer(r[2], dtype=np.float32))) for r in rows)
        return out

    def count(self, collection: str) -> dict[str, int]:
        with self._lock:
            return dict(
                self._conn.execute(
                    "SELECT version, COUNT(*) FROM items WHERE collection = ? AND deleted = 0 GROUP BY version",
                    (collection,),
                )
            )

    def last_seq(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def compact(self, collection: str, upto_seq: int) -> int:
        with self._tx() as c:
            cur = c.execute(
                "DELETE FROM items WHERE collection = ? AND deleted = 1 AND seq <= ?", (collection, upto_seq)
            )
            return int(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
