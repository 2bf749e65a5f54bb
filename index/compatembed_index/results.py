"""What a search answers: merged top-k ids, scores, the version of each hit, metadata, routes.

Its own module (numpy only) so that the HTTP client returns the same type as the service without
importing FAISS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SearchResult:
    """Merged top-k results of a batch of queries.

    Attributes:
        ids: (Q, k) int64, −1 where fewer than k items were found.
        scores: (Q, k) float32, −inf where no item.
        versions: (Q, k) version id of the item that answered (None where no item).
        metadata: (Q, k) metadata objects (None when absent or not requested).
        routes: segment version → how it was searched (``direct``, ``query:v3>v2>v1``, ``copy:v1>v3``).
        skipped: segment versions skipped for lack of a route (only with ``allow_partial``).
    """

    ids: np.ndarray
    scores: np.ndarray
    versions: list[list[str | None]]
    metadata: list[list[Any]] | None
    routes: dict[str, str]
    skipped: list[str]

    def hits(self, i: int) -> list[dict[str, Any]]:
        """Results of query ``i`` as a list of ``{id, score, version, metadata}`` (no padding)."""
        out = []
        for j in range(self.ids.shape[1]):
            if self.ids[i, j] < 0:
                break
            out.append({
                "id": int(self.ids[i, j]),
                "score": float(self.scores[i, j]),
                "version": self.versions[i][j],
                "metadata": None if self.metadata is None else self.metadata[i][j],
            })
        return out
