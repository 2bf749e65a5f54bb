"""One query version searching one gallery version: the route between their spaces, then the metrics.

:func:`evaluate_pair` is the one computation behind every cross-version number: the ``compatembed-eval``
report, each cell of the compatibility matrix and the validation after training. Cross-version vectors
follow the compatibility route that training wrote into the manifests (the index service's own routing
code), then the protocol's rule: truncate both sides to the smaller dimension and renormalise.

Torch-free at import: the manifests are read only when a route is followed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compatembed.errors import EvalError
from compatembed.eval.retrieval import retrieval_metrics

if TYPE_CHECKING:  # EmbeddingSet lives next to the torch embedding code
    from compatembed_index.registry import VersionRegistry

    from compatembed.embeddings import EmbeddingSet


def route_pair(
    query: EmbeddingSet, gallery: EmbeddingSet, *, route: str = "auto", side: EmbeddingSet | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Bring query and gallery vectors into one space along the registered routes, if any.

    A query route (prefix/affine edges, new → old) maps the queries; otherwise a forward route
    (old → new, FCT-style) upgrades the stored gallery vectors; otherwise a forward edge with side
    information (FCT's ψ) upgrades them from ``concat(old vector, side vector)``, ``side`` holding the side
    version's embeddings of the gallery items. Without a route the raw vectors are compared (the protocol
    then truncates to the smaller dimension): that is what an independent model gets.

    Returns:
        (query vectors, gallery vectors, description of the route: ``"same version"``,
        ``"query: prefix"``, ``"query: prefix+affine"``, ``"gallery: forward"``, ``"gallery: forward+side"``,
        or ``"none (raw)"``).

    Raises:
        EvalError: the only route needs side information and ``side`` is missing, of another version, or
            does not hold every gallery item.
    """
    if route not in ("auto", "raw"):
        raise EvalError(f"unknown route={route!r}; use auto or raw")
    q_id, g_id = query.meta.get("version_id"), gallery.meta.get("version_id")
    if q_id is not None and q_id == g_id:
        return query.embeddings, gallery.embeddings, "same version"
    if route == "raw" or "version_dir" not in query.meta or "version_dir" not in gallery.meta:
        return query.embeddings, gallery.embeddings, "none (raw)"
    registry = version_registry([query.meta["version_dir"], gallery.meta["version_dir"]])
    found = registry.query_route(str(q_id), str(g_id))
    if found is not None:
        kinds = "+".join(step.edge.kind for step in found.steps)
        return found.apply(query.embeddings), gallery.embeddings, f"query: {kinds}"
    upgrade = registry.forward_route(str(g_id), str(q_id))
    if upgrade is not None:
        kinds = "+".join(step.edge.kind for step in upgrade.steps)
        return query.embeddings, upgrade.apply(gallery.embeddings), f"gallery: {kinds}"
    with_side = registry.side_forward_route(str(g_id), str(q_id))
    if with_side is not None:
        side_id = str(with_side.steps[0].edge.side_version)
        upgraded = with_side.apply(gallery.embeddings, _side_vectors(side, gallery, side_id, str(q_id)))
        return query.embeddings, upgraded, "gallery: forward+side"
    return query.embeddings, gallery.embeddings, "none (raw)"


def _side_vectors(side: EmbeddingSet | None, gallery: EmbeddingSet, side_id: str, query_id: str) -> np.ndarray:
    """The side version's vectors of the gallery items, in the gallery's order."""
    if side is None:
        raise EvalError(
            f"{query_id} upgrades the gallery of {gallery.meta.get('version_id')} with side information from version "
            f"{side_id!r}: give that version's embeddings of the same items (compatembed-eval side=<its directory>)"
        )
    if side.meta.get("version_id") != side_id:
        raise EvalError(f"side information must come from version {side_id!r}, got {side.meta.get('version_id')!r}")
    position = {int(i): n for n, i in enumerate(side.ids)}
    missing = [int(i) for i in gallery.ids if int(i) not in position]
    if missing:
        raise EvalError(f"side information of {side_id!r} lacks {len(missing)} gallery items (first ids: {missing[:5]})")
    return side.embeddings[[position[int(i)] for i in gallery.ids]]


def version_registry(version_dirs: list[str]) -> VersionRegistry:
    """The index service's registry holding these versions and every ancestor training recorded."""
    from compatembed_index.registry import VersionRegistry, read_version_dir

    from compatembed.models.version import ancestor_dirs  # needs torch: imported on use, not with this package

    registry = VersionRegistry()
    for directory in ancestor_dirs(version_dirs):
        registry.register(read_version_dir(directory))
    return registry


def evaluate_pair(
    query: EmbeddingSet,
    gallery: EmbeddingSet,
    *,
    leave_one_out: bool,
    topk: tuple[int, ...] = (1, 5),
    route: str = "auto",
    backend: str = "faiss",
    side: EmbeddingSet | None = None,
) -> dict[str, Any]:
    """Metrics of ``query`` searching ``gallery`` after routing (``side`` as :func:`route_pair` takes it), with the route."""
    q_vectors, g_vectors, taken = route_pair(query, gallery, route=route, side=side)
    metrics = retrieval_metrics(
        q_vectors,
        query.labels,
        g_vectors,
        gallery.labels,
        query_ids=query.ids,
        gallery_ids=gallery.ids,
        leave_one_out=leave_one_out,
        topk=topk,
        backend=backend,
    )
    return {**metrics, "route": taken}
