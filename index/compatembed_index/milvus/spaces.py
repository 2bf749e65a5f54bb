"""One gallery's items in Milvus: a collection per version space and per forward copy.

Why one collection per space, not one collection with a vector field per version: versions arrive
after a gallery exists (a new vector field would be a schema change, which servers allow only for
nullable fields, and Milvus 2.3–2.5 have no nullable vectors), and milvus-lite 3.2.2 accepts nullable
FLOAT_VECTOR fields but refuses any insert batch in which one of them is None on every row
("FieldData 'v32' declared FloatVector but no float_vector data is set"; a batch that mixes rows of
two versions is accepted, omitting the key is refused too). A collection per space works on lite and
on every server, and a forward copy is just one more collection.

The price is that a move between versions (an upgrade) crosses collections, which Milvus does not do
atomically. A move therefore (1) upserts the item into its new space with a newer sequence number
(Strong), (2) waits ``move_grace_s``, then (3) deletes it from its old space (Strong). Between (1) and
(3) a search can meet the item twice: the merge keeps one hit per id
(:func:`~compatembed_index.merge.drop_duplicate_ids`). A search could miss it only if it read the new
space before (1) and the old one after (3); a search pass whose reads span less than ``move_grace_s``
cannot. A move is recorded in the catalog from before (1) to after (3), so a pass that took longer is
run again only when a recorded move overlapped it (:class:`~compatembed_index.milvus.collection.MilvusCollection`).
A writer that dies between (1) and (3) leaves two rows: :meth:`GallerySpaces.locate` believes the
newer sequence number, and :meth:`GallerySpaces.repair` deletes the older row.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from compatembed_index.errors import ConfigError
from compatembed_index.milvus import STRONG

_logger = logging.getLogger(__name__)

_ESCAPES = {"_": "_u", ".": "_d", "-": "_h"}
SEP = "_x"  # never produced by the escapes, so names split back unambiguously

MAX_NAME = 255
WRITE_ROWS = 2048  # rows per insert/upsert message (gRPC messages are capped at 64 MiB)
QUERY_IDS = 4096  # ids per `id in [...]` query (a query answers at most 16,384 rows)
SEARCH_ROWS = 1024  # queries per search call (nq)
META_BYTES = 65_535  # a VARCHAR holds at most this many bytes


@runtime_checkable
class MoveLog(Protocol):
    """Where moves in flight are recorded, shared by every replica of the service (the service's
    :class:`~compatembed_index.milvus.catalog.MilvusCatalog` is one). Times are nanoseconds since the epoch."""

    def begin_move(self, gallery: str, token: int) -> None:
        """Record that move ``token`` starts now, before its first write."""

    def end_move(self, gallery: str, token: int) -> None:
        """Record that move ``token`` ended now, after its last delete."""

    def moves(self, gallery: str) -> dict[int, tuple[int, int | None]]:
        """token → (start, end or None while in flight)."""

    def forget_moves(self, gallery: str, started_before_ns: int) -> int:
        """Drop the records of moves that started before ``started_before_ns``; returns how many."""


def _escape(part: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in part)


def _unescape(part: str) -> str:
    return re.sub(r"_([udh])", lambda m: {"u": "_", "d": ".", "h": "-"}[m.group(1)], part)


def space_name(prefix: str, gallery: str, key: tuple[str, ...]) -> str:
    """The Milvus collection of ``key``: ``(version,)`` for a segment, ``(source, target)`` for a copy.

    Raises:
        ConfigError: the name would pass Milvus's 255 characters.
    """
    name = prefix + SEP.join(_escape(p) for p in (gallery, *key))
    if len(name) > MAX_NAME:
        raise ConfigError(f"the Milvus collection name for {gallery}/{'>'.join(key)} would take {len(name)} "
                          f"characters (Milvus allows {MAX_NAME}): use shorter collection or version names")
    return name


def milvus_index(factory: str, search_params: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The Milvus index (type, build params, search params) that stands for a FAISS factory string.

    ``Flat`` → FLAT (exact), ``HNSW<M>`` → HNSW (``efSearch`` → ``ef``), ``IVF<n>,Flat`` → IVF_FLAT
    (``nprobe``). Other factories have no faithful Milvus counterpart here and are refused.

    Raises:
        ConfigError: a factory or search parameter the Milvus backend does not map.
    """
    params: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in search_params.split(","))):
        key, _, value = part.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"search parameter {part!r} is not NAME=NUMBER") from None
    f = factory.replace(" ", "")
    if f == "Flat":
        return "FLAT", {}, {}
    if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
        return "HNSW", {"M": int(m.group(1)), "efConstruction": 200}, {"ef": int(params.get("efSearch", 64))}
    if m := re.fullmatch(r"IVF(\d+),Flat", f):
        return "IVF_FLAT", {"nlist": int(m.group(1))}, {"nprobe": int(params.get("nprobe", 1))}
    raise ConfigError(f"factory {factory!r} has no Milvus counterpart here: the Milvus backend takes Flat, "
                      "HNSW<M> and IVF<nlist>,Flat")


class MilvusSpace:
    """One Milvus collection searched like a FAISS segment (:class:`~compatembed_index.merge.Searchable`)."""

    def __init__(self, client: Any, name: str, dim: int, metric: str, ntotal: int, params: dict[str, Any], *,
                 counted: bool = True) -> None:
        self.client, self.name, self.dim, self.metric, self.ntotal = client, name, dim, metric, ntotal
        self.params = params
        self.counted = counted  # False: planned without a count (it may be empty)
        self.answered = False  # whether a search of this view returned any hit

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of (Q, D) queries: scores higher-is-better (IP, or −squared L2 as Milvus's L2 gives)."""
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        params = dict(self.params)
        if "ef" in params:
            params["ef"] = max(params["ef"], k)  # HNSW needs ef >= k
        for lo in range(0, len(q), SEARCH_ROWS):
            res = self.client.search(self.name, data=q[lo:lo + SEARCH_ROWS].tolist(), anns_field="vec", limit=k,
                                     output_fields=["id"], consistency_level=STRONG,
                                     search_params={"metric_type": self.metric.upper(), "params": params})
            for r, hits in enumerate(res):
                for j, h in enumerate(list(hits)[:k]):
                    ids[lo + r, j] = int(h["id"])
                    d = float(h["distance"])
                    scores[lo + r, j] = d if self.metric == "ip" else -d
        self.answered = self.answered or bool((ids >= 0).any())
        return scores, ids


class GallerySpaces:
    """The Milvus collections of one gallery, and the writes that keep each item in one space.

    Args:
        client: a connected ``pymilvus.MilvusClient``.
        prefix: namespace of this deployment's Milvus collections.
        gallery: the gallery (service collection) name.
        move_grace_s: wait between inserting moved items in their new space and deleting them from the
            old one; searches whose reads span longer are run again if a move overlapped them.
        moves: where moves are recorded (the service's :class:`~compatembed_index.milvus.catalog.MilvusCatalog`);
            without it every slow search pass counts as overlapping a move.
    """

    def __init__(self, client: Any, prefix: str, gallery: str, *, move_grace_s: float = 0.5,
                 moves: MoveLog | None = None) -> None:
        self.client, self.prefix, self.gallery, self.move_grace_s = client, prefix, gallery, move_grace_s
        self.moves = moves  # None: moves are not recorded
        self._head = prefix + _escape(gallery) + SEP
        self._seq_lock = threading.Lock()
        self._last_seq = 0

    def name(self, key: tuple[str, ...]) -> str:
        """Milvus collection name of a segment ``(version,)`` or copy ``(source, target)``."""
        return space_name(self.prefix, self.gallery, key)

    def next_seq(self) -> int:
        """A sequence number: nanoseconds since the epoch, strictly increasing in this process. Replicas
        order writes of one item by it, so their clocks must agree to better than the time between two
        writes of one item."""
        with self._seq_lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns())
            return self._last_seq

    # -- collections --------------------------------------------------------------------------------
    def keys(self) -> list[tuple[str, ...]]:
        """Segments ``(version,)`` and copies ``(source, target)`` that exist in Milvus."""
        out = []
        for n in self.client.list_collections():
            if n.startswith(self._head):
                out.append(tuple(_unescape(p) for p in n[len(self._head):].split(SEP)))
        return out

    def ensure(self, key: tuple[str, ...], dim: int, metric: str, index: tuple[str, dict[str, Any]]) -> str:
        """Create (if missing) and load the collection of ``key``; returns its name."""
        from pymilvus import DataType, MilvusClient

        name = self.name(key)
        if not self.client.has_collection(name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("seq", DataType.INT64)
            if len(key) == 1:
                # "" stands for no metadata (JSON text is never empty): servers before 2.5 have no nullable fields
                schema.add_field("meta", DataType.VARCHAR, max_length=META_BYTES)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
            params = self.client.prepare_index_params()
            params.add_index("vec", index_type=index[0], metric_type=metric.upper(), params=index[1])
            try:
                self.client.create_collection(name, schema=schema, index_params=params, consistency_level=STRONG)
            except Exception:
                if not self.client.has_collection(name):  # another replica may have made it meanwhile
                    raise
        self.client.load_collection(name)
        return name

    def load(self) -> None:
        """Load every collection of the gallery (after a restart Milvus holds them released)."""
        for key in self.keys():
            self.client.load_collection(self.name(key))

    def drop(self, key: tuple[str, ...] | None = None) -> None:
        """Drop one collection, or (None) every collection of the gallery."""
        for k in [key] if key is not None else self.keys():
            if self.client.has_collection(self.name(k)):
                self.client.drop_collection(self.name(k))

    def count(self, key: tuple[str, ...]) -> int:
        """Rows in the collection of ``key`` (0 when it does not exist)."""
        name = self.name(key)
        if not self.client.has_collection(name):
            return 0
        rows = self.client.query(name, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        return int(rows[0]["count(*)"])

    # -- reads ------------------------------------------------------------------------------------------
    def holders(self, ids: np.ndarray) -> dict[int, list[tuple[str, int]]]:
        """Every segment holding each id, with the row's sequence number (more than one only mid-move)."""
        found: dict[int, list[tuple[str, int]]] = {}
        for key in self.keys():
            if len(key) != 1:
                continue
            for lo in range(0, len(ids), QUERY_IDS):
                chunk = ids[lo:lo + QUERY_IDS].tolist()
                rows = self.client.query(self.name(key), filter=f"id in {chunk}", output_fields=["id", "seq"],
                                         limit=len(chunk), consistency_level=STRONG)
                for r in rows:
                    found.setdefault(int(r["id"]), []).append((key[0], int(r["seq"])))
        return found

    def locate(self, ids: np.ndarray) -> list[str | None]:
        """The version holding each id (None where absent); mid-move, the newer write wins."""
        found = self.holders(ids)
        return [max(found[i], key=lambda h: h[1])[0] if i in found else None for i in ids.tolist()]

    def metadata(self, version: str, ids: list[int]) -> dict[int, str | None]:
        """Stored metadata (JSON text) of ``ids`` in ``version``'s segment (ids not there are left out)."""
        out: dict[int, str | None] = {}
        for lo in range(0, len(ids), QUERY_IDS):
            chunk = ids[lo:lo + QUERY_IDS]
            for r in self.client.query(self.name((version,)), filter=f"id in {chunk}", output_fields=["id", "meta"],
                                       limit=len(chunk), consistency_level=STRONG):
                out[int(r["id"])] = r.get("meta") or None
        return out

    def items(self, version: str, ids: list[int], *, vectors: bool) -> dict[int, tuple[str | None, np.ndarray | None]]:
        """Stored (metadata, vector) of ``ids`` in ``version``'s segment (ids not there are left out)."""
        fields = ["id", "meta", "vec"] if vectors else ["id", "meta"]
        out: dict[int, tuple[str | None, np.ndarray | None]] = {}
        for lo in range(0, len(ids), QUERY_IDS):
            chunk = ids[lo:lo + QUERY_IDS]
            for r in self.client.query(self.name((version,)), filter=f"id in {chunk}", output_fields=fields,
                                       limit=len(chunk), consistency_level=STRONG):
                out[int(r["id"])] = (r.get("meta") or None, np.asarray(r["vec"], np.float32) if vectors else None)
        return out

    def rows(self, key: tuple[str, ...], batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) of a collection, in batches."""
        it = self.client.query_iterator(self.name(key), batch_size=batch, filter="", output_fields=["id", "vec"])
        try:
            while True:
                page = it.next()
                if not page:
                    return
                yield (np.array([int(r["id"]) for r in page], np.int64),
                       np.array([r["vec"] for r in page], np.float32))
        finally:
            it.close()

    # -- writes -----------------------------------------------------------------------------------------
    def _upsert(self, key: tuple[str, ...], ids: np.ndarray, x: np.ndarray, seq: int,
                meta: list[str | None] | None) -> None:
        name = self.name(key)
        for lo in range(0, len(ids), WRITE_ROWS):
            rows = []
            for j in range(lo, min(lo + WRITE_ROWS, len(ids))):
                row: dict[str, Any] = {"id": int(ids[j]), "seq": seq, "vec": x[j].tolist()}
                if meta is not None:
                    row["meta"] = meta[j] or ""
                rows.append(row)
            self.client.upsert(name, rows)

    def _delete(self, key: tuple[str, ...], ids: list[int]) -> None:
        name = self.name(key)
        if self.client.has_collection(name):
            for lo in range(0, len(ids), QUERY_IDS):
                self.client.delete(name, filter=f"id in {ids[lo:lo + QUERY_IDS]}")

    def write(self, version: str, ids: np.ndarray, x: np.ndarray, meta: list[str | None] | None,
              forwarded: dict[tuple[str, str], np.ndarray], *,
              holders: dict[int, list[tuple[str, int]]] | None = None) -> int:
        """Put items in ``version``'s segment (and its copies), then take them out of any other segment.

        Args:
            version: the segment the items belong to from now on.
            ids: (N,) ids; x: (N, D) vectors in ``version``'s space.
            meta: per-item metadata JSON, or None to keep what each item has (an upgrade).
            forwarded: ``(version, target)`` → the vectors mapped into each materialised copy.
            holders: :meth:`holders` of ``ids`` when the caller already read it.

        Returns:
            The write's sequence number.
        """
        holders = self.holders(ids) if holders is None else holders
        if meta is None:  # keep each item's metadata: read it from the segment holding its newest row
            meta = []
            newest = {i: max(h, key=lambda t: t[1])[0] for i, h in holders.items()}
            by_v: dict[str, list[int]] = {}
            for i in ids.tolist():
                if i in newest:
                    by_v.setdefault(newest[i], []).append(i)
            known: dict[int, str | None] = {}
            for v, vids in by_v.items():
                known.update(self.metadata(v, vids))
            meta = [known.get(i) for i in ids.tolist()]
        seq = self.next_seq()
        stale: dict[str, list[int]] = {}
        for i, hs in holders.items():
            for v, _ in hs:
                if v != version:
                    stale.setdefault(v, []).append(i)
        moving = bool(stale) and self.moves is not None
        if moving:
            self.moves.begin_move(self.gallery, seq)  # before the first write: a slow search pass will see it
        try:
            self._upsert((version,), ids, x, seq, meta)
            for (s, t), y in forwarded.items():
                self._upsert((s, t), ids, y, seq, None)
            if stale:
                time.sleep(self.move_grace_s)  # searches that began before the upsert finish before the delete
                self.remove_from(stale)
        finally:
            if moving:
                self.moves.end_move(self.gallery, seq)
        return seq

    def moved_during(self, start_ns: int, end_ns: int) -> bool:
        """Whether a recorded move overlapped ``[start_ns, end_ns]`` (wall clock, widened by the grace for clock
        differences between replicas); True when moves are not recorded here."""
        if self.moves is None:
            return True
        slack = int(self.move_grace_s * 1e9)
        return any(start <= end_ns + slack and (end is None or end >= start_ns - slack)
                   for start, end in self.moves.moves(self.gallery).values())

    def remove_from(self, stale: dict[str, list[int]]) -> None:
        """Delete ``ids`` from each version's segment and from that segment's copies."""
        copies = [k for k in self.keys() if len(k) == 2]
        for v, vids in stale.items():
            self._delete((v,), vids)
            for k in copies:
                if k[0] == v:
                    self._delete(k, vids)

    def remove(self, ids: np.ndarray) -> int:
        """Delete items wherever they are; returns how many existed."""
        holders = self.holders(ids)
        stale: dict[str, list[int]] = {}
        for i, hs in holders.items():
            for v, _ in hs:
                stale.setdefault(v, []).append(i)
        self.remove_from(stale)
        return len(holders)

    def build_copy(self, source: str, target: str, dim: int, metric: str, index: tuple[str, dict[str, Any]],
                   forward: Callable[[np.ndarray], np.ndarray]) -> int:
        """(Re)build the forward copy of segment ``source`` in ``target``'s space; returns its size."""
        self.drop((source, target))
        self.ensure((source, target), dim, metric, index)
        n = 0
        if self.client.has_collection(self.name((source,))):
            seq = self.next_seq()
            for ids, x in self.rows((source,)):
                self._upsert((source, target), ids, forward(x), seq, None)
                n += len(ids)
        return n

    def repair(self) -> int:
        """Delete the older row of every item found in two segments (a move cut short) and forget the moves
        recorded as started before the repair (run it when no writer is moving items); returns rows deleted."""
        began = time.time_ns()
        seen: dict[int, tuple[str, int]] = {}
        stale: dict[str, list[int]] = {}
        for key in self.keys():
            if len(key) != 1:
                continue
            it = self.client.query_iterator(self.name(key), batch_size=4096, filter="", output_fields=["id", "seq"])
            try:
                while page := it.next():
                    for r in page:
                        i, s = int(r["id"]), int(r["seq"])
                        if i in seen:
                            old_v, old_s = seen[i]
                            loser = key[0] if s < old_s else old_v
                            stale.setdefault(loser, []).append(i)
                            if s > old_s:
                                seen[i] = (key[0], s)
                        else:
                            seen[i] = (key[0], s)
            finally:
                it.close()
        self.remove_from(stale)
        if self.moves is not None:  # the dead writers' moves are finished now
            self.moves.forget_moves(self.gallery, began)
        return sum(len(v) for v in stale.values())
