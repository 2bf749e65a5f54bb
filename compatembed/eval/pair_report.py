"""The report of ``compatembed-eval``: a query (new) model version against a gallery (old) model version.

Reports the three numbers of the published code bases on one labelled split: gallery/gallery
(old/old, what users get today), query/query (new/new, after a full backfill) and query/gallery
(new/old, the new model searching the old index, no backfill), each computed by
:func:`compatembed.eval.pairs.evaluate_pair` along the routes training wrote. The validation after
training (:func:`compatembed.training.run.validate`) writes the same report on the ``val`` split.

Needs torch (it extracts embeddings); ``import compatembed.eval`` does not import this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from compatembed.embeddings import load_or_extract
from compatembed.errors import EvalError
from compatembed.eval.compatibility import empirical_compatibility
from compatembed.eval.pairs import evaluate_pair
from compatembed.eval.report_render import write_text
from compatembed.eval.tables import pair_table_markdown
from compatembed.hardware import resolve_num_workers
from compatembed.models.version import side_info_dir

_logger = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate old/old, new/new and new/old; write ``report.json`` and ``report.md`` to ``cfg.out``.

    Args:
        cfg: a ``conf/eval.yaml`` config (``query``, ``gallery``, ``data``, ``split``, ``out``, ...).

    Returns:
        The report: the versions, the three pairs' metrics and routes, the criterion on top-1 and mAP.
    """
    kwargs = dict(device=str(cfg.device), batch_size=int(cfg.batch_size), num_workers=resolve_num_workers(cfg.num_workers),
                  progress=bool(cfg.progress), prefix_cache=bool(cfg.prefix_cache))
    side_dir = cfg.get("side") or side_info_dir(cfg.query)  # FCT with side information: the gallery needs ψ too
    new = load_or_extract(cfg.query, cfg.data, str(cfg.split), **kwargs)
    old = load_or_extract(cfg.gallery, cfg.data, str(cfg.split), **kwargs)
    side = load_or_extract(side_dir, cfg.data, str(cfg.split), **kwargs) if side_dir else None
    if leave_one_out := bool(cfg.leave_one_out):
        if not np.array_equal(np.sort(new.ids), np.sort(old.ids)):
            raise EvalError("leave_one_out needs query and gallery embeddings of the same items (the same split)")
    topk = tuple(int(k) for k in cfg.topk)
    names = {"new": new.meta.get("version_id", str(cfg.query)), "old": old.meta.get("version_id", str(cfg.gallery))}
    rows = []
    for q_name, g_name, q, g in (("old", "old", old, old), ("new", "new", new, new), ("new", "old", new, old)):
        _logger.info("evaluating %s/%s", q_name, g_name)
        result = evaluate_pair(q, g, leave_one_out=leave_one_out, topk=topk, route=str(cfg.route), backend=str(cfg.backend),
                               side=side if (q_name, g_name) == ("new", "old") else None)
        rows.append({"query": q_name, "gallery": g_name, **result})
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
    if side is not None and cross["route"] == "gallery: forward+side":  # side= given where no edge reads it: unused
        report["side_information"] = side.meta.get("version_id", str(side_dir))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", render_report_md(report))
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
