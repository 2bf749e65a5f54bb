"""Versions, collection configs and aliases kept in Milvus: the state every service replica shares.

One Milvus collection (``<prefix>catalog``) holds key → text rows: ``version/<id>`` (the manifest),
``file/<id>/<path>/<n>`` (base64 chunks of its transform files), ``collection/<name>`` (the config as
JSON), ``alias/<name>`` and ``move/<gallery>/<token>`` (when a move between segments started and
ended, so that a slow search pass knows whether one overlapped it). Milvus needs a vector field in
every collection, so each row carries a 2-dimensional zero vector that nothing searches. Rows are
written with Strong consistency and read back whole, so a replica that reloads the catalog sees every acknowledged change.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from compatembed_index.milvus import STRONG
from compatembed_index.store import Catalog

CHUNK_CHARS = 60_000
"""Base64 characters per file chunk (a VARCHAR holds at most 65,535 bytes)."""
_QUERY_LIMIT = 16_384  # Milvus caps one query's offset + limit at 16,384 rows


class MilvusCatalog(Catalog):
    """:class:`~compatembed_index.store.Catalog` in one Milvus collection.

    Args:
        client: a connected ``pymilvus.MilvusClient``.
        prefix: prefix of every Milvus collection this service owns (one namespace per deployment).
    """

    def __init__(self, client: Any, *, prefix: str = "ce_") -> None:
        from pymilvus import DataType, MilvusClient

        self.client = client
        self.name = f"{prefix}catalog"
        if not client.has_collection(self.name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=1024)
            schema.add_field("value", DataType.VARCHAR, max_length=65_535)
            schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
            index = client.prepare_index_params()
            index.add_index("unused", index_type="FLAT", metric_type="L2")
            try:
                client.create_collection(self.name, schema=schema, index_params=index, consistency_level=STRONG)
            except Exception:
                if not client.has_collection(self.name):  # another replica may have created it meanwhile
                    raise
        client.load_collection(self.name)

    # -- rows ---------------------------------------------------------------------------------------
    def _put(self, rows: dict[str, str]) -> None:
        if rows:
            self.client.upsert(self.name, [{"key": k, "value": v, "unused": [0.0, 0.0]} for k, v in rows.items()])

    def _delete(self, keys: list[str]) -> None:
        if keys:
            self.client.delete(self.name, ids=keys)

    def _prefixed(self, prefix: str) -> dict[str, str]:
        rows = self.client.query(self.name, filter=f'key like "{prefix}%"', output_fields=["key", "value"],
                                 limit=_QUERY_LIMIT, consistency_level=STRONG)
        return {r["key"]: r["value"] for r in rows}

    # -- Catalog --------------------------------------------------------------------------------------
    def put_version(self, version_id: str, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        rows: dict[str, str] = {}
        for path, data in files.items():
            text = base64.b64encode(data).decode()
            for n in range(max(1, -(-len(text) // CHUNK_CHARS))):
                rows[f"file/{version_id}/{path}/{n:06d}"] = text[n * CHUNK_CHARS:(n + 1) * CHUNK_CHARS]
        self._put(rows)  # files first: a version row is only ever read with its files present
        self._put({f"version/{version_id}": json.dumps(manifest)})

    def versions(self) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        out = []
        for key, manifest in sorted(self._prefixed("version/").items()):
            vid = key.split("/", 1)[1]
            chunks: dict[str, list[tuple[str, str]]] = {}
            for fkey, text in self._prefixed(f"file/{vid}/").items():
                path, n = fkey[len(f"file/{vid}/"):].rsplit("/", 1)
                chunks.setdefault(path, []).append((n, text))
            files = {p: base64.b64decode("".join(t for _, t in sorted(parts))) for p, parts in chunks.items()}
            out.append((json.loads(manifest), files))
        return out

    def create_collection(self, name: str, config: dict[str, Any]) -> int:
        self._put({f"collection/{name}": json.dumps(config)})
        return self.last_seq()

    def update_collection(self, name: str, config: dict[str, Any]) -> int:
        return self.create_collection(name, config)

    def drop_collection(self, name: str) -> int:
        self._delete([f"collection/{name}", *(f"alias/{a}" for a, c in self.aliases().items() if c == name),
                      *(f"move/{name}/{t}" for t in self.moves(name))])
        return self.last_seq()

    def collections(self) -> dict[str, dict[str, Any]]:
        return {k.split("/", 1)[1]: json.loads(v) for k, v in self._prefixed("collection/").items()}

    def set_alias(self, alias: str, collection: str | None) -> int:
        if collection is None:
            self._delete([f"alias/{alias}"])
        else:
            self._put({f"alias/{alias}": collection})
        return self.last_seq()

    def aliases(self) -> dict[str, str]:
        return {k.split("/", 1)[1]: v for k, v in self._prefixed("alias/").items()}

    # -- moves in flight ---------------------------------------------------------------------------------
    def begin_move(self, gallery: str, token: int) -> None:
        """Record that a move of items between ``gallery``'s segments starts now (before its first write)."""
        self._put({f"move/{gallery}/{token}": json.dumps({"start_ns": time.time_ns(), "end_ns": None})})

    def end_move(self, gallery: str, token: int, *, keep_s: float = 60.0) -> None:
        """Record that the move ``token`` ended now (after its last delete), and forget this gallery's moves
        that ended more than ``keep_s`` ago."""
        now = time.time_ns()
        moves = self.moves(gallery)
        start = moves.get(token, (now, None))[0]
        self._put({f"move/{gallery}/{token}": json.dumps({"start_ns": start, "end_ns": now})})
        self._delete([f"move/{gallery}/{t}" for t, (_, end) in moves.items()
                      if end is not None and end < now - int(keep_s * 1e9)])

    def moves(self, gallery: str) -> dict[int, tuple[int, int | None]]:
        """Recorded moves of ``gallery``: token → (start, end or None while in flight), nanoseconds since the epoch."""
        head = f"move/{gallery}/"
        out = {}
        for key, value in self._prefixed(head).items():
            if key.startswith(head):  # `like` may treat characters of the name as wildcards
                record = json.loads(value)
                out[int(key[len(head):])] = (int(record["start_ns"]), record["end_ns"])
        return out

    def forget_moves(self, gallery: str, started_before_ns: int) -> int:
        """Drop ``gallery``'s move records that started before ``started_before_ns`` (after a repair); returns how many."""
        old = [t for t, (start, _) in self.moves(gallery).items() if start < started_before_ns]
        self._delete([f"move/{gallery}/{t}" for t in old])
        return len(old)

    def last_seq(self) -> int:
        """Nanoseconds since the epoch: replicas share no counter, so sequence numbers are times."""
        return time.time_ns()

    def close(self) -> None:
        """The client is closed by its owner (the service)."""
