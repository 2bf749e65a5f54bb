"""The one interface of a mixed-version gallery, in process or over HTTP.

:class:`~compatembed_index.api.IndexService` (in process) and
:class:`~compatembed_index.client.IndexClient` (a server on the network) both implement
:class:`Gallery`: the same methods, the same arguments, the same return types and the same error
classes (:mod:`compatembed_index.errors`). Code written against ``Gallery`` runs unchanged against
either, and one behavioural test suite runs against both (``tests/index/test_gallery_interface.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from compatembed_index.results import SearchResult

Metadata = list[dict[str, Any] | None] | None


@runtime_checkable
class Gallery(Protocol):
    """What a mixed-version gallery offers its callers (versions, collections, aliases, items, search)."""

    # -- versions
    def register_version(self, path: str | Path) -> dict[str, Any]:
        """Register a model version directory; returns ``{version_id, dim, normalized, edges}``."""
        ...

    def versions(self) -> list[dict[str, Any]]:
        """Registered versions, each as :meth:`register_version` returns it."""
        ...

    # -- collections and aliases
    def create_collection(self, name: str, **options: Any) -> dict[str, Any]:
        """Create an empty collection (options: ``CollectionConfig`` fields); returns its stats."""
        ...

    def drop_collection(self, name: str) -> None:
        """Delete a collection with its items, snapshots and aliases."""
        ...

    def list_collections(self) -> list[str]:
        """Collection names, sorted."""
        ...

    def stats(self, collection: str) -> dict[str, Any]:
        """One collection's sizes, factories, copies, calibration and sequence numbers."""
        ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` (an atomic switch)."""
        ...

    def remove_alias(self, alias: str) -> None:
        """Delete ``alias``."""
        ...

    def aliases(self) -> dict[str, str]:
        """Alias → collection."""
        ...

    # -- items
    def add(self, collection: str, version: str, ids: Any, vectors: Any, metadata: Metadata = None, *,
            upsert: bool = False) -> int:
        """Add (or replace, with ``upsert``) items of ``version``; returns the write's sequence number."""
        ...

    def upgrade(self, collection: str, version: str, ids: Any, vectors: Any, metadata: Metadata = None) -> int:
        """Move existing items to ``version`` with new vectors (partial backfill); returns the sequence number."""
        ...

    def delete(self, collection: str, ids: Any) -> int:
        """Delete items; returns how many existed."""
        ...

    def versions_of(self, collection: str, ids: Any) -> list[str | None]:
        """The version whose segment holds each item (None where absent)."""
        ...

    def get_points(self, collection: str, ids: Any, *, include_vectors: bool = True,
                   include_metadata: bool = True) -> list[dict[str, Any] | None]:
        """Stored items as ``{id, version, metadata, vector}`` (``vector``: (D,) float32 as stored, in
        ``version``'s space), None where an id is absent: what "more like this" searches with."""
        ...

    # -- search and routes
    def search(self, collection: str, version: str, queries: Any, k: int = 10, *, allow_partial: bool = False,
               include_metadata: bool = True) -> SearchResult:
        """Mixed-version top-k of queries of ``version`` over every segment it has a route to."""
        ...

    def materialise(self, collection: str, source: str, target: str) -> dict[str, Any]:
        """Forward-upgrade segment ``source`` into ``target``'s space (stored vectors, no images)."""
        ...

    def calibrate(self, collection: str, query_version: str, segment_version: str, queries: Any, k: int = 10, *,
                  query_ids: Any = None) -> tuple[float, float]:
        """Fit one cross-version route's score map from held-out queries; returns ``(scale, shift)``."""
        ...

    def set_calibration(self, collection: str, query_version: str, segment_version: str, scale: float,
                        shift: float) -> None:
        """Set one cross-version route's score map explicitly."""
        ...

    # -- durability
    def snapshot(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Snapshot one collection (or all); returns ``{collection, id, seq, name}`` per snapshot, where
        ``name`` is relative to the data directory (no absolute server path)."""
        ...

    def close(self) -> None:
        """Release what the gallery holds (the store, or the connection pool)."""
        ...
