"""PNG plots of a compatibility report: the matrix heatmap, the backfill curves and query neighbours (matplotlib ``Agg``).

matplotlib is imported on use with the non-interactive ``Agg`` backend, so plotting works on a server
without a display and importing this module costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from compatembed.eval.matrix import CompatibilityMatrix

_logger = logging.getLogger(__name__)

_LABELS = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "mAP@R": "mAP@R"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_matrix_heatmap(matrix: CompatibilityMatrix, path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """One heatmap per metric: row = query version, column = gallery version, lower triangle in percent.

    Cells that meet the empirical criterion (``C[t][j] > C[j][j]``) are marked with a check mark.

    Returns:
        ``path``, written as a PNG.
    """
    from compatembed.eval.compatibility import compatibility_criterion_matrix

    plt = _pyplot()
    metrics = list(metrics or matrix.metrics)
    t = len(matrix.names)
    size = (1.2 + 1.1 * t * len(metrics) + 0.8 * len(metrics), 1.2 + 0.9 * t)
    fig, axes = plt.subplots(1, len(metrics), figsize=size, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        c = np.array(matrix.values[metric], dtype=float)
        shown = np.where(np.tril(np.ones((t, t), bool)), 100 * c, np.nan)
        image = ax.imshow(np.ma.masked_invalid(shown), vmin=0, vmax=100, cmap="viridis")
        holds = compatibility_criterion_matrix(c)
        for i in range(t):
            for j in range(i + 1):
                mark = " ✓" if holds[i, j] else ""
                colour = "black" if shown[i, j] > 60 else "white"
                ax.text(j, i, f"{shown[i, j]:.1f}{mark}", ha="center", va="center", color=colour, fontsize=8)
        ax.set_xticks(range(t), matrix.names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(t), matrix.names, fontsize=8)
        ax.set_xlabel("gallery version")
        ax.set_ylabel("query version")
        ax.set_title(f"{_LABELS.get(metric, metric)} (%)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Compatibility matrix (✓: meets the criterion against the gallery's own model)", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_backfill(
    backfill: Mapping[str, Any],
    path: str | Path,
    metrics: Sequence[str] = ("top1", "mAP"),
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Backfill curves: each metric against the fraction of the gallery upgraded, one line per order.

    Args:
        backfill: ``{"old": id, "new": id, "curves": {name: [points]}}`` as the report stores it; points
            hold ``fraction`` and the metrics (random curves averaged over seeds also ``<metric>_std``).
        path: PNG file to write.
        metrics: one panel per metric.
        references: metric → ``{"old/old": value, "new/new": value}`` drawn as horizontal lines.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    curves = backfill["curves"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    styles = ["-o", "-s", "-^", "--o", "--s", "--^", ":o"]
    for ax, metric in zip(axes[0], metrics):
        for k, (name, points) in enumerate(curves.items()):
            x = 100 * np.array([p["fraction"] for p in points])
            y = 100 * np.array([p[metric] for p in points])
            ax.plot(x, y, styles[k % len(styles)], label=name, markersize=3)
            if f"{metric}_std" in points[0]:
                sd = 100 * np.array([p[f"{metric}_std"] for p in points])
                ax.fill_between(x, y - sd, y + sd, alpha=0.2)
        for (label, value), style in zip((references or {}).get(metric, {}).items(), (":", "-.")):
            ax.axhline(100 * value, color="grey", linestyle=style, linewidth=1, label=label)
        ax.set_xlabel(f"gallery upgraded to {backfill['new']} (%)")
        ax.set_ylabel(f"{_LABELS.get(metric, metric)} (%)")
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Backfill {backfill['old']} → {backfill['new']}: queries of {backfill['new']} through the index service",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_neighbours(
    queries: Sequence[Mapping[str, Any]],
    searches: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """A grid of query images with their nearest neighbours under several searches, right or wrong marked.

    Each query takes one row per search: the query image, then its neighbours in rank order, each framed
    green when it shares the query's label and red when not; the row is named by the search (e.g. "old
    model, old gallery", "new model, old gallery", "new model, mixed gallery"), and a neighbour's
    caption says which stored version it came from.

    Args:
        queries: One mapping per query: ``image`` (``(H, W, 3)`` uint8), ``label`` (class name) and
            ``results``, a mapping from each name in ``searches`` to a list of neighbours, each a
            mapping with ``image``, ``label`` and ``version``.
        searches: Row names, in display order.
        path: The PNG to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    k = max((len(q["results"][s]) for q in queries for s in searches), default=0)
    rows = len(queries) * len(searches)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.35 * (k + 1) + 1.6, 1.45 * rows), squeeze=False)
    for qi, query in enumerate(queries):
        for si, search in enumerate(searches):
            r = qi * len(searches) + si
            ax = axes[r][0]
            ax.imshow(query["image"])
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_ylabel(search, rotation=0, ha="right", va="center", fontsize=7)
            ax.set_title(f"query: {query['label']}" if si == 0 else "", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("black"), spine.set_linewidth(1.5)
            for j in range(k):
                ax = axes[r][j + 1]
                ax.set_xticks([]), ax.set_yticks([])
                hits = query["results"][search]
                if j >= len(hits):
                    ax.axis("off")
                    continue
                hit = hits[j]
                ax.imshow(hit["image"])
                ok = hit["label"] == query["label"]
                for spine in ax.spines.values():
                    spine.set_edgecolor("#1a9850" if ok else "#d73027"), spine.set_linewidth(3)
                ax.set_title(f"{j + 1}. {hit['label']}", fontsize=6, color="#1a9850" if ok else "#d73027")
                ax.set_xlabel(str(hit["version"]), fontsize=5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _logger.info("wrote %s", path)
    return path
