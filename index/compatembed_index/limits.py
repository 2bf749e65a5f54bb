"""Resource limits that one request must not exceed, beyond ``max_k`` and ``max_batch``.

The HTTP service takes them from :class:`~compatembed_index.settings.IndexSettings`
(:meth:`Limits.from_settings`). The Python API uses the defaults below unless told otherwise: the
factory and metadata limits protect the process and the stored data, while the per-search result and
response limits are off (None), since an in-process caller (an evaluation asking for a full ranking)
pays for what it asks for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-request and per-collection resource limits.

    Attributes:
        max_result_slots: largest ``queries × k`` of one search or calibration (None: no limit).
        max_response_bytes: largest estimated size of one search response (None: no limit).
        max_metadata_bytes: largest JSON encoding of one item's metadata.
        max_metadata_depth: deepest nesting of one item's metadata (objects and lists).
        max_nlist: most inverted lists of an IVF or IMI index.
        max_hnsw_m: largest HNSW ``M`` (neighbours per node and layer), also of an IVF's HNSW quantiser.
        max_pq_m: most sub-quantisers of a PQ or OPQ.
        max_pq_nbits: most bits per PQ sub-quantiser code (2**nbits centroids each).
        max_search_param: largest value of a search parameter (``nprobe``, ``efSearch``, ...).
        max_index_bytes: largest estimated memory of one segment: what the index allocates before its
            first vector (coarse centroids, list heads, codebooks, transforms) plus its training set.
    """

    max_result_slots: int | None = None
    max_response_bytes: int | None = None
    max_metadata_bytes: int = 64 * 1024
    max_metadata_depth: int = 32
    max_nlist: int = 65_536
    max_hnsw_m: int = 128
    max_pq_m: int = 256
    max_pq_nbits: int = 12
    max_search_param: int = 65_536
    max_index_bytes: int = 4 * GiB

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The limits configured in an :class:`~compatembed_index.settings.IndexSettings`."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})
