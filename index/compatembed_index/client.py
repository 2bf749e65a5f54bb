"""The HTTP client of the index service: :class:`~compatembed_index.interface.Gallery` over the network.

It has the methods, arguments and return types of :class:`~compatembed_index.api.IndexService`
(``search`` returns the same :class:`~compatembed_index.collection.SearchResult`) and re-raises its errors.

The server answers errors as ``{"error": name, "message": ...}``; the client looks the name up in
:data:`~compatembed_index.errors.ERROR_TYPES` and raises the same class, so code written against the
Python API handles remote errors unchanged. Needs ``httpx`` (imported when a client is created).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson

from compatembed_index.errors import ERROR_TYPES, IndexServiceError
from compatembed_index.results import SearchResult


def _rows(x: Any) -> list[list[float]]:
    return np.asarray(x, dtype=np.float64).tolist() if isinstance(x, np.ndarray) else x


def _b64(x: Any) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(x, dtype="<f4")).tobytes()).decode("ascii")


def _ids(ids: Any) -> list[int]:
    return np.asarray(ids).tolist() if isinstance(ids, np.ndarray) else list(ids)


class IndexClient:
    """Client of the index service's HTTP API (implements :class:`~compatembed_index.interface.Gallery`).

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``.
        api_key: sent as ``X-API-Key`` when given.
        timeout: seconds per request.
        binary: send vectors as base64 float32 with their shape (``vectors_b64``) rather than JSON numbers: smaller
            bodies, no float formatting or parsing, and exactly the float32 values the server stores.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 binary: bool = True) -> None:
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self.binary = binary

    def _vectors(self, x: Any) -> dict[str, Any]:
        if self.binary:
            try:
                arr = np.asarray(x, dtype=np.float32)
            except (TypeError, ValueError):  # ragged or not numbers: sent as JSON, for the server to name
                arr = None
            if arr is not None and arr.ndim == 2:
                return {"vectors_b64": {"shape": list(arr.shape), "data": _b64(arr)}}
        return {"vectors": _rows(x)}

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        content = None if body is None else orjson.dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        r = self._http.request(method, path, content=content, headers=headers)
        if r.status_code >= 400:
            try:
                payload = r.json()
                cls = ERROR_TYPES.get(payload.get("error"), IndexServiceError)
                message = payload.get("message", r.text)
            except ValueError:
                cls, message = IndexServiceError, r.text
            err = cls(message)
            err.status_code = r.status_code
            raise err
        return r.json()

    # -- versions
    def register_version(self, path: str | Path) -> dict[str, Any]:
        """Register a version directory (a path on the server); returns ``{version_id, dim, normalized, edges}``."""
        return self._call("POST", "/versions", {"path": str(path)})

    def versions(self) -> list[dict[str, Any]]:
        """Registered versions."""
        return self._call("GET", "/versions")

    # -- collections and aliases
    def create_collection(self, name: str, **options: Any) -> dict[str, Any]:
        """Create a collection; returns its stats."""
        return self._call("POST", "/collections", {"name": name, **options})

    def drop_collection(self, name: str) -> None:
        """Delete a collection, its items, snapshots and aliases."""
        self._call("DELETE", f"/collections/{_seg(name)}")

    def list_collections(self) -> list[str]:
        """Collection names."""
        return self._call("GET", "/collections")["collections"]

    def stats(self, collection: str) -> dict[str, Any]:
        """Collection stats."""
        return self._call("GET", f"/collections/{_seg(collection)}")

    def set_alias(self, alias: str, collection: str) -> None:
        """Point an alias at a collection."""
        self._call("PUT", f"/aliases/{_seg(alias)}", {"collection": collection})

    def remove_alias(self, alias: str) -> None:
        """Delete an alias."""
        self._call("DELETE", f"/aliases/{_seg(alias)}")

    def aliases(self) -> dict[str, str]:
        """Alias → collection."""
        return self._call("GET", "/aliases")

    # -- items
    def add(self, collection: str, version: str, ids: Any, vectors: Any,
            metadata: list[dict[str, Any] | None] | None = None, *, upsert: bool = False) -> int:
        """Add items; returns the write's sequence number."""
        body = {"version": version, "ids": _ids(ids), **self._vectors(vectors), "metadata": metadata, "upsert": upsert}
        return self._call("POST", f"/collections/{_seg(collection)}/points", body)["seq"]

    def upgrade(self, collection: str, version: str, ids: Any, vectors: Any,
                metadata: list[dict[str, Any] | None] | None = None) -> int:
        """Move items to ``version``; returns the write's sequence number."""
        body = {"version": version, "ids": _ids(ids), **self._vectors(vectors), "metadata": metadata}
        return self._call("POST", f"/collections/{_seg(collection)}/points/upgrade", body)["seq"]

    def delete(self, collection: str, ids: Any) -> int:
        """Delete items; returns how many existed."""
        return self._call("POST", f"/collections/{_seg(collection)}/points/delete", {"ids": _ids(ids)})["deleted"]

    def versions_of(self, collection: str, ids: Any) -> list[str | None]:
        """The version whose segment holds each item (None where absent)."""
        return self._call("POST", f"/collections/{_seg(collection)}/points/versions", {"ids": _ids(ids)})["versions"]

    def get_points(self, collection: str, ids: Any, *, include_vectors: bool = True,
                   include_metadata: bool = True) -> list[dict[str, Any] | None]:
        """Stored items (None where absent); vectors travel as base64 float32 and come back as (D,) float32."""
        body = {"ids": _ids(ids), "include_vectors": include_vectors, "include_metadata": include_metadata,
                "binary": True}
        points = self._call("POST", f"/collections/{_seg(collection)}/points/get", body)["points"]
        for p in points:
            if p is not None and "vector_b64" in p:
                p["vector"] = np.frombuffer(base64.b64decode(p.pop("vector_b64")), dtype="<f4").astype(np.float32)
        return points

    # -- search and routes
    def search(self, collection: str, version: str, queries: Any, k: int = 10, *,
               allow_partial: bool = False, include_metadata: bool = True) -> SearchResult:
        """Mixed-version search; the same :class:`SearchResult` as in process (padded with id −1, score −inf)."""
        body = {"version": version, **self._vectors(queries), "k": k, "allow_partial": allow_partial,
                "include_metadata": include_metadata}
        payload = self._call("POST", f"/collections/{_seg(collection)}/search", body)
        return _search_result(payload, k, include_metadata)

    def materialise(self, collection: str, source: str, target: str) -> dict[str, Any]:
        """Forward-upgrade a segment."""
        return self._call("POST", f"/collections/{_seg(collection)}/materialise", {"source": source, "target": target})

    def calibrate(self, collection: str, query_version: str, segment_version: str, queries: Any, k: int = 10,
                  *, query_ids: Any = None) -> tuple[float, float]:
        """Fit one route's score calibration from held-out queries; returns (scale, shift)."""
        body = {"query_version": query_version, "segment_version": segment_version, **self._vectors(queries), "k": k,
                "ids": None if query_ids is None else _ids(query_ids)}
        r = self._call("POST", f"/collections/{_seg(collection)}/calibrate", body)
        return r["scale"], r["shift"]

    def set_calibration(self, collection: str, query_version: str, segment_version: str, scale: float,
                        shift: float) -> None:
        """Set one route's score map explicitly."""
        body = {"query_version": query_version, "segment_version": segment_version, "scale": scale, "shift": shift}
        self._call("PUT", f"/collections/{_seg(collection)}/calibration", body)

    # -- durability
    def snapshot(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Snapshot one collection (or every collection); returns ``{collection, id, seq, name}`` per snapshot."""
        names = [collection] if collection is not None else self.list_collections()
        return [r for n in names for r in self._call("POST", f"/collections/{_seg(n)}/snapshot")["snapshots"]]

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> IndexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _seg(name: str) -> str:
    """``name`` as one URL path segment (a name with ``/`` or ``?`` must not change the route)."""
    return quote(name, safe="")


def _search_result(payload: dict[str, Any], k: int, include_metadata: bool) -> SearchResult:
    """The JSON answer of a search as the :class:`SearchResult` the service returns in process."""
    rows = payload["results"]
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    versions: list[list[str | None]] = [[None] * k for _ in rows]
    metadata: list[list[Any]] | None = [[None] * k for _ in rows] if include_metadata else None
    for i, hits in enumerate(rows):
        for j, hit in enumerate(hits):
            ids[i, j], scores[i, j], versions[i][j] = hit["id"], hit["score"], hit["version"]
            if metadata is not None:
                metadata[i][j] = hit["metadata"]
    return SearchResult(ids, scores, versions, metadata, payload["routes"], payload["skipped"])
