"""The compatibility report's files: ``report.md``, ``report.json``, CSVs, and (optionally) wandb.

:func:`render_markdown` turns the report dict that :func:`compatembed.eval.report.build_report` assembles into a document
that reads on its own: what was compared and how, the matrix per metric, the criterion per pair, AC/AM,
the update gain per step, the mixed-gallery and backfill results, the deployment verdict and the plots.
Every section is always present; a section that was not run says so and why.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from compatembed.eval.tables import matrix_markdown

_logger = logging.getLogger(__name__)

SECTIONS = (
    "What was compared",
    "Verdict",
    "Compatibility matrix",
    "Empirical compatibility criterion",
    "AC and AM",
    "Update gain",
    "Mixed-version gallery",
    "Backfill curves",
    "Files",
)
_LABELS = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "mAP@R": "mAP@R"}
_DEFINITIONS = {
    "Empirical compatibility criterion": "M(new, old) > M(old, old), strict (a tie is not compatible): the newer model's "
    "queries must retrieve from the older gallery better than the older model does itself.",
    "AC and AM": "AC: fraction of pairs t > j that meet the criterion. AM: mean of C[t][j] over j ≤ t, diagonal included; "
    "a cross test that retrieves nothing counts as a genuine zero (it is not dropped).",
    "Update gain": "Per upgrade step: [M(new, old) − M(old, old)] / [M(new*, new*) − M(old, old)], new* an independently "
    "trained model of the same step (1 = as good as a full backfill with new*, 0 = no gain).",
}
"""What the sections that report a fixed measure define it as, said under their heading by :func:`_opening`."""


def _pct(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _opening(title: str) -> list[str]:
    """A section's heading and the paragraph that defines what it measures (:data:`_DEFINITIONS`)."""
    return [f"## {title}", "", _DEFINITIONS[title], ""]


def _by_metric(report: Mapping[str, Any], metrics: Sequence[str], key: str) -> list[tuple[Any, list[tuple[str, Any]]]]:
    """Each entry of ``summary[metric][key]`` (the pairs or the upgrade steps, listed alike for every metric) with
    its value under each metric, as ``(entry, [(metric, value), ...])``: one table row per entry, one cell per metric."""
    entries = report["summary"][metrics[0]][key]
    return [(entry, [(m, report["summary"][m][key][k]) for m in metrics]) for k, entry in enumerate(entries)]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole report as GitHub-flavoured markdown (plots linked by relative path)."""
    metrics: list[str] = list(report["metrics"])
    names: list[str] = list(report["matrix"]["versions"])
    out: list[str] = [f"# Compatibility report: {' → '.join(f'`{n}`' for n in names)}", ""]
    if report.get("title"):
        out += [str(report["title"]), ""]

    out += ["## What was compared", ""]
    out.append(
        f"{len(names)} model versions, oldest first, evaluated on the `{report['split']}` split of `{report['dataset']}` "
        f"({report['matrix']['num_queries']} items; query set = gallery set"
        + (", each query's own item left out" if report.get("leave_one_out") else "")
        + "). Metrics: CMC top-k, mAP over the full ranking, mAP@R, in %, computed by the same function as "
        "`compatembed-eval` (cosine after truncating to the smaller dimension; cross-version pairs follow the "
        "compatibility routes written by training). Matrix entry C[t][j] = M(queries of version t, gallery of version j), j ≤ t."
    )
    out.append("")
    rows = []
    for v in report["versions"]:
        edges = ", ".join(v.get("edges", [])) or "none"
        rows.append([f"`{v['version_id']}`", v.get("method", "?"), v.get("classes", "?"), v.get("dim", "?"),
                     f"`{v['parent']}`" if v.get("parent") else "—", edges])
    out.append(_table(["version", "method", "training classes", "dim", "parent", "compatibility edges"], rows,
                      ["---", "---", "---", "---:", "---", "---"]))
    if report.get("independent"):
        out.append("Independently trained references (for the update gain): "
                   + ", ".join(f"`{i['version_id']}` for step `{i['step']}`" for i in report["independent"]) + ".")
        out.append("")

    out += ["## Verdict", ""]
    g = report.get("gate")
    if g:
        word = "PASS" if g["passed"] else "FAIL"
        out.append(f"**Deployment gate: {word}.** {g['reason']}.")
    else:
        out.append("No deployment gate was requested (set `gate.enabled=true`, or `gate.deployed` / `gate.candidate`).")
    out.append("")
    for metric in metrics:
        s = report["summary"][metric]
        held = [p for p in s["criterion"] if p["holds"]]
        ac = "n/a (one version)" if s["AC"] is None else f"{100 * s['AC']:.0f}%"
        out.append(f"- {_LABELS.get(metric, metric)}: the criterion holds for {len(held)} of {len(s['criterion'])} "
                   f"pairs (AC = {ac}), AM = {_pct(s['AM'])}%.")
    out.append("")

    out += ["## Compatibility matrix", ""]
    for metric in metrics:
        values = np.array([[np.nan if v is None else v for v in row] for row in report["matrix"]["values"][metric]], dtype=float)
        out.append(matrix_markdown(values, names, _LABELS.get(metric, metric)))
    route_rows = [[f"`{names[t]}`", f"`{names[j]}`", report["matrix"]["routes"][t][j]]
                  for t in range(len(names)) for j in range(t)]
    if route_rows:
        out.append("Routes of the cross-version pairs:")
        out.append("")
        out.append(_table(["query", "gallery", "route"], route_rows, ["---", "---", "---"]))
    if report.get("plots", {}).get("heatmap"):
        out.append(f"![compatibility matrix]({report['plots']['heatmap']})")
        out.append("")

    out += _opening("Empirical compatibility criterion")
    pairs = _by_metric(report, metrics, "criterion")
    if pairs:
        rows = [[f"`{p['query']}` / `{p['gallery']}`",
                 *(f"{_pct(q['cross'])} vs {_pct(q['old_self'])}: {'holds' if q['holds'] else '**fails**'}" for _, q in per)]
                for p, per in pairs]
        out.append(_table(["new / old", *(f"{_LABELS.get(m, m)} new/old vs old/old" for m in metrics)], rows,
                          ["---"] * (1 + len(metrics))))
    else:
        out.append("One version only: no pair to judge.")
        out.append("")

    out += _opening("AC and AM")
    summary = report["summary"]
    out.append(_table(["metric", "AC (%)", "AM (%)"],
                      [[_LABELS.get(m, m), _pct(summary[m]["AC"], 0), _pct(summary[m]["AM"])] for m in metrics]))

    out += _opening("Update gain")
    steps = _by_metric(report, metrics, "update_gain")
    if steps:
        rows = [[step["step"], *(f"{g_['value']:.3f}" if g_["value"] is not None else "n/a" for _, g_ in per)]
                for step, per in steps]
        notes = [f"{step['step']}, {_LABELS.get(m, m)}: {g_['note']}"
                 for step, per in steps for m, g_ in per if g_["value"] is None]
        out.append(_table(["step", *(_LABELS.get(m, m) for m in metrics)], rows))
        out += [f"- {n}" for n in dict.fromkeys(n.split(", ", 1)[0] + ": " + n.split(": ", 1)[1] for n in notes)]
        if notes:
            out.append("")
    else:
        out.append("One version only: no upgrade step.")
        out.append("")

    for title, key, measured, section in (("Mixed-version gallery", "mixed", "rows", _mixed_section),
                                          ("Backfill curves", "backfill", "curves", _backfill_section)):
        out += [f"## {title}", ""]
        part = report.get(key)
        if part and part.get(measured):
            out += section(part, report, metrics)
        else:  # a stage that was not run says why
            out += [f"Not run ({(part or {}).get('reason', f'{key}.enabled=false')}).", ""]

    out += ["## Files", ""]
    for name, rel in report.get("files", {}).items():
        out.append(f"- {name}: [`{rel}`]({rel})")
    out.append("")
    return "\n".join(out)


def _mixed_section(mixed: Mapping[str, Any], report: Mapping[str, Any], metrics: Sequence[str]) -> list[str]:
    """The body of "Mixed-version gallery": the protocol, then one row per split of the gallery."""
    out = [f"The gallery split across versions in the given fractions (items drawn at random, seed {mixed['seed']}), "
           f"stored in the index service and searched by `{mixed['query']}` queries through the service's own "
           f"search path (full ranking, k = gallery size; {mixed.get('num_queries', '?')} queries). "
           f"{mixed.get('note', '')}".rstrip(), ""]
    calibrated = any("calibrated" in r for r in mixed["rows"])
    if calibrated:
        out.append("`calibrated`: the same gallery searched again after the service fitted each cross-version "
                   "route's score calibration (`IndexService.calibrate`: moment matching of top-k scores) from "
                   f"`{mixed['query']}` items stored in the gallery that are not evaluation queries (their own match "
                   "left out); — where the query version stores too few items to fit it.")
        out.append("")
    rows = []
    for r in mixed["rows"]:
        split = ", ".join(f"{100 * f:.0f}% `{v}`" for v, f in r["fractions"].items() if f > 0)
        parts = [f"{v}: {how}" for v, how in r["routes"].items()]
        if r.get("skipped"):
            parts.append("skipped (no route, ranked last): " + ", ".join(r["skipped"]))
        routes = "; ".join(parts)
        cal = [_pct(r["calibrated"][m]) if "calibrated" in r else "—" for m in metrics] if calibrated else []
        rows.append([split, *(_pct(r[m]) for m in metrics), *cal, routes])
    labels = [_LABELS.get(m, m) for m in metrics]
    out.append(_table(["gallery", *labels, *(f"{label} calibrated" for label in labels if calibrated), "routes"], rows,
                      ["---"] + ["---:"] * (len(metrics) * (2 if calibrated else 1)) + ["---"]))
    return out


def _backfill_section(bf: Mapping[str, Any], report: Mapping[str, Any], metrics: Sequence[str]) -> list[str]:
    """The body of "Backfill curves": the protocol, the orders, then the table metric by fraction upgraded."""
    out = [f"Every item starts as its `{bf['old']}` vector; items are re-embedded with `{bf['new']}` "
           f"(`IndexService.upgrade`) in the order named, and `{bf['new']}` queries search the mixed gallery "
           f"through the service at each fraction ({bf.get('num_queries', '?')} queries, full ranking).", ""]
    for name, text in bf.get("orders", {}).items():
        out.append(f"- `{name}`: {text}")
    for note in bf.get("notes", []):
        out.append(f"- {note}")
    out.append("")
    metric = bf.get("table_metric", "mAP")
    curves = bf["curves"]
    fractions = [p["fraction"] for p in next(iter(curves.values()))]
    rows = []
    for k, f in enumerate(fractions):
        rows.append([f"{100 * f:.0f}%", *(_pct(points[k][metric]) for points in curves.values())])
    out.append(f"{_LABELS.get(metric, metric)} (%) by fraction upgraded:")
    out.append("")
    out.append(_table(["upgraded", *curves.keys()], rows))
    if report.get("plots", {}).get("backfill"):
        out.append(f"![backfill curves]({report['plots']['backfill']})")
        out.append("")
    return out


def write_csvs(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """``matrix.csv`` (long: metric, query, gallery, value, route, criterion) and ``backfill.csv``."""
    out_dir = Path(out_dir)
    names = report["matrix"]["versions"]
    written = {}
    rows = []
    for metric, c in report["matrix"]["values"].items():
        crit = {(p["query"], p["gallery"]): p["holds"] for p in report["summary"][metric]["criterion"]}
        for t, q in enumerate(names):
            for j in range(t + 1):
                rows.append({"metric": metric, "query": q, "gallery": names[j], "value": c[t][j],
                             "route": report["matrix"]["routes"][t][j], "criterion_holds": crit.get((q, names[j]), "")})
    _write_csv(out_dir / "matrix.csv", rows, ["metric", "query", "gallery", "value", "route", "criterion_holds"])
    written["matrix CSV (long format)"] = "matrix.csv"
    bf = report.get("backfill")
    if bf and bf.get("curves"):
        rows = []
        for curve, points in bf["curves"].items():
            for p in points:
                rows.append({"curve": curve, "fraction": p["fraction"], "upgraded": p["upgraded"],
                             **{m: p[m] for m in report["metrics"]}})
        _write_csv(out_dir / "backfill.csv", rows, ["curve", "fraction", "upgraded", *report["metrics"]])
        written["backfill CSV"] = "backfill.csv"
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """Write atomically (a reader never sees half a report)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """JSON with NaN written as null (strict JSON readers refuse NaN)."""
    write_text(path, json.dumps(_nan_to_none(payload), indent=2) + "\n")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        return _nan_to_none(x.item())
    return x


def log_to_wandb(report: Mapping[str, Any], out_dir: str | Path, *, project: str = "compatembed",
                 mode: str = "offline", name: str | None = None, **init_kwargs: Any) -> None:
    """Send the matrix, the summary, the backfill curves and the plots to a wandb run (offline by default).

    Raises:
        ConfigError: wandb is not installed.
    """
    try:
        import wandb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from compatembed.errors import ConfigError

        raise ConfigError("logger=wandb needs wandb: pip install 'compatembed[wandb]'") from exc
    out_dir = Path(out_dir)
    run = wandb.init(project=project, mode=mode, name=name, dir=str(out_dir), job_type="report",
                     config={"versions": report["matrix"]["versions"], "dataset": report["dataset"]}, **init_kwargs)
    try:
        names = report["matrix"]["versions"]
        matrix_rows = [[m, names[t], names[j], report["matrix"]["values"][m][t][j]]
                       for m in report["metrics"] for t in range(len(names)) for j in range(t + 1)]
        matrix_table = wandb.Table(columns=["metric", "query", "gallery", "value"], data=matrix_rows)
        payload: dict[str, Any] = {"compatibility_matrix": matrix_table}
        bf = report.get("backfill")
        if bf and bf.get("curves"):
            rows = [[curve, p["fraction"], *(p[m] for m in report["metrics"])]
                    for curve, pts in bf["curves"].items() for p in pts]
            payload["backfill"] = wandb.Table(columns=["curve", "fraction", *report["metrics"]], data=rows)
        for key, rel in report.get("plots", {}).items():
            if rel and (out_dir / rel).is_file():
                payload[f"plots/{key}"] = wandb.Image(str(out_dir / rel))
        run.log(payload)
        for metric in report["metrics"]:
            s = report["summary"][metric]
            run.summary[f"AM/{metric}"] = s["AM"]
            if s["AC"] is not None:
                run.summary[f"AC/{metric}"] = s["AC"]
        if report.get("gate"):
            run.summary["gate/passed"] = report["gate"]["passed"]
    finally:
        run.finish()
