"""``compatembed-eval``: compare a query (new) model version with a gallery (old) model version.

Reports the three numbers of the published code bases on one labelled split: gallery/gallery
(old/old, what users get today), query/query (new/new, after a full backfill) and query/gallery
(new/old, the new model searching the old index, no backfill). Cross-version vectors follow the
compatibility route that training wrote into the manifests (the index service's own routing code),
then the protocol's rule: truncate both sides to the smaller dimension and renormalise.

Example:
    compatembed-eval query=runs/cifar10_independent_new gallery=runs/cifar10_independent_old out=reports/indep
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from compatembed.cli import CONF_DIR, run_cli
from compatembed.embeddings import EmbeddingSet
from compatembed.errors import EvalError
from compatembed.eval import pair_table_markdown, retrieval_metrics
from compatembed.eval.compatibility import empirical_compatibility
from compatembed.hardware import resolve_num_workers

_logger = logging.getLogger(__name__)


def load_or_extract(
    path: str | Path, data_cfg: DictConfig, split: str, *, device: str = "auto", batch_size: int = 256,
    num_workers: int = 0, progress: bool = True,
) -> EmbeddingSet:
    """Embeddings of ``split`` from a version directory (extracted once, cached inside it) or an embeddings directory."""
    from compatembed.extract import extract_split
    from compatembed.models.version import MANIFEST, load_manifest

    path = Path(path)
    if (path / "meta.json").is_file() and not (path / MANIFEST).is_file():
        return EmbeddingSet.load(path)
    manifest = load_manifest(path)
    cache = path / "embeddings" / _cache_name(data_cfg, split)
    if (cache / "meta.json").is_file():
        cached = EmbeddingSet.load(cache)
        if cached.meta.get("weights_sha256") == manifest["files"]["model.safetensors"]:
            return cached
    result = extract_split(
        path, data_cfg, split, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    result.save(cache)
    return result


def _cache_name(data_cfg: DictConfig, split: str) -> str:
    """``<dataset>-<split>``, plus a tag of the item selection when one is set (classes, per-class cap, validation split)."""
    keys = {"train": ("classes", "train_per_class"), "val": ("eval_classes",)}.get(split, ("eval_classes",))
    selection = {k: OmegaConf.select(data_cfg, k, default=None) for k in keys}
    validation = OmegaConf.select(data_cfg, "validation", default=None)
    if split != "test" and validation is not None and float(validation.get("fraction") or 0) > 0:
        selection["validation"] = OmegaConf.to_container(validation, resolve=True)
    if all(v is None for v in selection.values()):
        return f"{data_cfg.name}-{split}"
    tag = hashlib.sha256(json.dumps(selection, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{data_cfg.name}-{split}-{tag}"


def route_pair(
    query: EmbeddingSet, gallery: EmbeddingSet, *, route: str = "auto"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Bring query and gallery vectors into one space along the registered routes, if any.

    A query route (prefix/affine edges, new → old) maps the queries; otherwise a forward route
    (old → new, FCT-style) upgrades the stored gallery vectors. Without a route the raw vectors are
    compared (the protocol then truncates to the smaller dimension): that is what an independent
    model gets.

    Returns:
        (query vectors, gallery vectors, description of the route: ``"same version"``,
        ``"query: prefix"``, ``"query: prefix+affine"``, ``"gallery: forward"``, or ``"none (raw)"``).
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
    return query.embeddings, gallery.embeddings, "none (raw)"


def version_registry(version_dirs: list[str]) -> Any:
    """The index service's registry holding these versions and every ancestor training recorded."""
    from compatembed.eval.mixed_gallery import ancestor_dirs
    from compatembed_index.registry import VersionRegistry, read_version_dir

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
) -> dict[str, Any]:
    """Metrics of ``query`` searching ``gallery`` (after routing), with the route taken."""
    q_vectors, g_vectors, taken = route_pair(query, gallery, route=route)
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate old/old, new/new and new/old; write ``report.json`` and ``report.md`` to ``cfg.out``."""
    kwargs = dict(device=str(cfg.device), batch_size=int(cfg.batch_size), num_workers=resolve_num_workers(cfg.num_workers), progress=bool(cfg.progress))
    new = load_or_extract(cfg.query, cfg.data, str(cfg.split), **kwargs)
    old = load_or_extract(cfg.gallery, cfg.data, str(cfg.split), **kwargs)
    if leave_one_out := bool(cfg.leave_one_out):
        if not np.array_equal(np.sort(new.ids), np.sort(old.ids)):
            raise EvalError("leave_one_out needs query and gallery embeddings of the same items (the same split)")
    topk = tuple(int(k) for k in cfg.topk)
    names = {"new": new.meta.get("version_id", str(cfg.query)), "old": old.meta.get("version_id", str(cfg.gallery))}
    rows = []
    for q_name, g_name, q, g in (("old", "old", old, old), ("new", "new", new, new), ("new", "old", new, old)):
        _logger.info("evaluating %s/%s", q_name, g_name)
        rows.append({"query": q_name, "gallery": g_name, **evaluate_pair(q, g, leave_one_out=leave_one_out, topk=topk, route=str(cfg.route), backend=str(cfg.backend))})
    cross, old_self = rows[2], rows[0]
    verdict = {
        metric: empirical_compatibility(cross[metric], old_self[metric]) for metric in ("top1", "mAP")
    }
    report = {
        "query_version": names["new"],
        "gallery_version": names["old"],
        "dataset": str(cfg.data.name),
        "split": str(cfg.split),
        "leave_one_out": leave_one_out,
        "pairs": rows,
        "compatible": verdict,
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_text(out / "report.md", render_report_md(report))
    return report


def render_report_md(report: dict[str, Any]) -> str:
    """The old/old, new/new, new/old table with the compatibility verdict."""
    lines = [
        f"# Compatibility of `{report['query_version']}` (new) with `{report['gallery_version']}` (old)",
        "",
        f"Dataset `{report['dataset']}`, split `{report['split']}`, query set = gallery set"
        + (" (leave-one-out)" if report["leave_one_out"] else "")
        + "; CMC top-k, mAP over the full ranking, mAP@R, in %.",
        "",
        pair_table_markdown(report["pairs"]),
        "",
        "Routes: " + ", ".join(f"{r['query']}/{r['gallery']}: {r['route']}" for r in report["pairs"]),
        "",
    ]
    for metric, ok in report["compatible"].items():
        word = "holds" if ok else "fails"
        lines.append(f"- Empirical compatibility criterion on {metric} (new/old > old/old): **{word}**")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    report = run_cli(lambda: evaluate(cfg))
    print(render_report_md(report))
    print(f"report written to {Path(cfg.out) / 'report.md'}")


def main() -> None:
    """Console entry point (``compatembed-eval``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
