"""The offline evaluation that decides whether a new model version may be deployed (``compatembed-report``).

Over T model versions (oldest first) on one labelled split, :func:`build_report` writes to ``cfg.out``:

* the compatibility matrix ``C[t][j] = M(φ_t, φ_j)``, j ≤ t, for every metric (the eval CLI's function and
  routes), the empirical criterion per pair, AC, AM and the update gain per upgrade step;
* the mixed-version gallery and the backfill curves, measured through the index service's own search;
* ``report.md``, ``report.json``, ``matrix.csv``, ``backfill.csv`` and PNG plots; with ``logger=wandb`` a copy
  goes to wandb (offline by default);
* with ``gate.enabled=true`` the deployment verdict (``report["gate"]``); the CLI turns a failure into its exit status.

Needs torch (it extracts embeddings); ``import compatembed.eval`` does not import this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from compatembed.embeddings import EmbeddingSet, extract_split, load_or_extract
from compatembed.errors import ConfigError
from compatembed.eval import backfill
from compatembed.eval.matrix import CompatibilityMatrix, compute_matrix, gate, summarise_matrix
from compatembed.eval.mixed_gallery import MixedGallery, split_gallery
from compatembed.eval.pairs import evaluate_pair
from compatembed.eval.plots import plot_backfill, plot_matrix_heatmap
from compatembed.eval.report_render import log_to_wandb, render_markdown, write_csvs, write_json, write_text
from compatembed.hardware import resolve_num_workers
from compatembed.models.version import load_manifest

_logger = logging.getLogger(__name__)

ORDER_TEXT = {
    "random": "a seeded random order",
    "neighbour_margin": "least reliable old embedding first, judged without labels: the smallest margin between an "
    "item's top-1 and top-2 neighbour scores among the other old gallery vectors",
    "prototype_margin": "least reliable old embedding first: the smallest margin between the nearest and second-nearest "
    "class prototype of the old model, prototypes averaged on the TRAINING split",
}


def _classes_text(classes: Any) -> str:
    """``[0, 1, 2, 3]`` → ``"0-3"`` (runs of consecutive ids collapsed)."""
    if not isinstance(classes, list) or not classes:
        return "?"
    runs, start, prev = [], classes[0], classes[0]
    for c in classes[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(runs)


def describe_version(version_dir: str | Path) -> dict[str, Any]:
    """What the report says about a version: id, method, training classes, dim, parent, edges."""
    manifest = load_manifest(version_dir)
    edges = []
    for e in manifest.get("compatibility", []):
        other = e.get("target", e.get("source"))
        edges.append(f"{e.get('kind')} {'←' if e.get('kind') == 'forward' else '→'} {other}")
    training = manifest.get("training", {})
    return {
        "version_id": manifest["version_id"],
        "dir": str(version_dir),
        "method": training.get("method", "?"),
        "classes": _classes_text(training.get("classes")),
        "dim": manifest["embedding"]["dim"],
        "parent": manifest.get("parent"),
        "edges": edges,
    }


def _mixed_splits(cfg: DictConfig, t: int) -> list[list[float]]:
    if cfg.splits == "auto":
        splits = [list(row) for row in np.eye(t)] + ([[1.0 / t] * t] if t > 1 else [])
        return [[float(f) for f in s] for s in splits]
    splits = [[float(f) for f in s] for s in cfg.splits]
    for s in splits:
        if len(s) != t:
            raise ConfigError(f"mixed.splits entry {s} needs one fraction per version ({t})")
    return splits


def _run_mixed(gallery: MixedGallery, cfg: DictConfig, names: list[str], metrics: Sequence[str]) -> dict[str, Any]:
    query = names[-1]
    rows = []
    for fractions in _mixed_splits(cfg.mixed, len(names)):
        owner = split_gallery(gallery.ids, fractions, seed=int(cfg.mixed.seed))
        gallery.load({v: gallery.ids[owner == i] for i, v in enumerate(names)})
        result = gallery.evaluate(query)
        rows.append({"fractions": dict(zip(names, fractions)), **{m: result[m] for m in metrics},
                     "routes": result["routes"], "skipped": result["skipped"]})
        if bool(cfg.mixed.calibrate):
            fitted = gallery.calibrate(query)
            if fitted:  # nothing to fit when the query version stores (almost) nothing, or nothing else is reachable
                calibrated = gallery.evaluate(query)
                rows[-1]["calibrated"] = {m: calibrated[m] for m in metrics}
                rows[-1]["calibration"] = fitted
    note = ("Segments without a route from the query version are skipped by the service; their items never come "
            "back and are scored as ranked last." if any(r["skipped"] for r in rows) else "")
    return {"query": query, "seed": int(cfg.mixed.seed), "rows": rows, "note": note,
            "num_queries": int(len(gallery.query_rows))}


def _prototype_train_set(cfg: DictConfig, old_dir: str, kwargs: dict[str, Any]) -> EmbeddingSet:
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    with open_dict(data):
        data.train_per_class = cfg.backfill.prototype_per_class
    return extract_split(old_dir, data, "train", **kwargs)


def _run_backfill(
    gallery: MixedGallery, cfg: DictConfig, names: list[str], dirs: list[str], metrics: Sequence[str], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bcfg = cfg.backfill
    old = str(bcfg.old) if bcfg.old else names[0]
    new = str(bcfg.new) if bcfg.new else names[-1]
    for v in (old, new):
        if v not in names:
            raise ConfigError(f"backfill version {v!r} is not one of the report's versions {names}")
    if names.index(old) >= names.index(new):
        raise ConfigError(f"backfill.old ({old}) must be older than backfill.new ({new})")
    fractions = backfill.fraction_grid(int(bcfg.points))
    orders: dict[str, np.ndarray | list[np.ndarray]] = {}
    for name in bcfg.orders:
        if name not in backfill.ORDERS:
            raise ConfigError(f"unknown backfill order {name!r}; known: {', '.join(backfill.ORDERS)}")
        if name == "random":
            orders[name] = [backfill.random_order(gallery.ids, int(seed)) for seed in bcfg.seeds]
        elif name == "neighbour_margin":
            orders[name] = backfill.neighbour_margin_order(gallery.ids, gallery.vectors(old))
        else:
            train = _prototype_train_set(cfg, dirs[names.index(old)], kwargs)
            orders[name] = backfill.prototype_margin_order(gallery.ids, gallery.vectors(old), train.embeddings, train.labels)
    with_forward = gallery.service.registry.forward_route(old, new) is not None
    if str(bcfg.forward) == "auto":
        forward_modes = [False, True] if with_forward else [False]
    elif bool(bcfg.forward):
        if not with_forward:
            raise ConfigError(f"backfill.forward=true but there is no forward route {old} → {new}")
        forward_modes = [False, True]
    else:
        forward_modes = [False]
    jobs = [(name, fwd, False, o) for fwd in forward_modes for name, o in orders.items()]
    if bool(bcfg.calibrate):  # the same upgrades, merged with per-route calibration refitted at every point
        jobs += [(name, False, True, o) for name, o in orders.items()]
    curves: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=sum(len(o) if isinstance(o, list) else 1 for *_, o in jobs) * len(fractions),
               desc="backfill curves", disable=not bool(cfg.progress), leave=False)
    for name, fwd, cal, o in jobs:
        runs = o if isinstance(o, list) else [o]
        measured = []
        for order in runs:
            measured.append(backfill.backfill_curve(gallery, old_version=old, new_version=new, order=order,
                                                    fractions=fractions, forward=fwd, metrics=metrics, calibrate=cal))
            bar.update(len(fractions))
        label = f"{name} + forward map" if fwd else f"{name}, calibrated" if cal else name
        if name == "random":
            label += f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""
            curves[label] = backfill.average_curves(measured, metrics)
        else:
            curves[label] = measured[0]
    bar.close()
    notes = []
    if with_forward and True in forward_modes:
        notes.append(f"`+ forward map`: the stored `{old}` vectors are first upgraded into `{new}`'s space by the forward "
                     "map (`IndexService.materialise`, no images needed); re-embedded items then replace their mapped copies.")
    elif not with_forward:
        notes.append(f"No forward route {old} → {new}: there is no \"upgrade without images\" curve.")
    if bool(bcfg.calibrate):
        notes.append(f"`, calibrated`: at every point the service's per-route score calibration is refitted from "
                     f"`{new}` items already upgraded (held out from the evaluation queries, their own match left out; "
                     "`IndexService.calibrate`), so cross-version scores merge on one scale.")
    skipped = sorted({v for pts in curves.values() for p in pts for v in p["skipped"]})
    if skipped:
        notes.append(f"`{new}` has no route to segment(s) {', '.join(skipped)}: the service skips them, so their items are "
                     "ranked last until they are upgraded.")
    return {"old": old, "new": new, "fractions": fractions, "curves": curves, "num_queries": int(len(gallery.query_rows)),
            "orders": {n: ORDER_TEXT[n] for n in orders}, "notes": notes, "table_metric": str(bcfg.table_metric)}


def _independent_self(cfg: DictConfig, names: list[str], matrix: CompatibilityMatrix, metrics: Sequence[str],
                      kwargs: dict[str, Any]) -> tuple[dict[str, list[float | None]] | None, list[dict[str, Any]]]:
    indep = list(cfg.independent or [])
    if not indep:
        return None, []
    if len(indep) != len(names) - 1:
        raise ConfigError(
            f"independent needs one entry (a version dir or null) per upgrade step: {len(names) - 1}, got {len(indep)}"
        )
    values: dict[str, list[float | None]] = {m: [None] * len(names) for m in metrics}
    described = []
    for step, directory in enumerate(indep, start=1):
        if directory is None:
            continue
        s = load_or_extract(directory, cfg.data, str(cfg.split), **kwargs)
        result = evaluate_pair(s, s, leave_one_out=bool(cfg.leave_one_out), topk=tuple(cfg.topk), backend=str(cfg.backend))
        for m in metrics:
            values[m][step] = result[m]
        described.append({"step": f"{names[step - 1]} → {names[step]}", "version_id": s.meta.get("version_id", str(directory)),
                          "dir": str(directory), **{m: result[m] for m in metrics}})
    return values, described


def build_report(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the versions of ``cfg.versions`` and write the report files to ``cfg.out``; returns the report."""
    dirs = [str(d) for d in (cfg.versions or [])]
    if not dirs:
        raise ConfigError(
            "versions is empty: give the model version directories, oldest first, e.g. 'versions=[runs/v1,runs/v2]'"
        )
    metrics = [str(m) for m in cfg.metrics]
    kwargs = dict(device=str(cfg.device), batch_size=int(cfg.batch_size), num_workers=resolve_num_workers(cfg.num_workers),
                  progress=bool(cfg.progress))
    described = [describe_version(d) for d in dirs]
    names = [v["version_id"] for v in described]
    if len(set(names)) != len(names):
        raise ConfigError(f"versions must be distinct model versions, got ids {names}")
    sets = [load_or_extract(d, cfg.data, str(cfg.split), **kwargs) for d in dirs]
    _logger.info("evaluating the %dx%d compatibility matrix", len(names), len(names))
    matrix = compute_matrix(sets, names=names, leave_one_out=bool(cfg.leave_one_out), topk=tuple(int(k) for k in cfg.topk),
                            route=str(cfg.route), backend=str(cfg.backend), metrics=metrics)
    independent_self, independent = _independent_self(cfg, names, matrix, metrics, kwargs)
    report: dict[str, Any] = {
        "title": cfg.title,
        "dataset": str(cfg.data.name),
        "split": str(cfg.split),
        "leave_one_out": bool(cfg.leave_one_out),
        "metrics": metrics,
        "versions": described,
        "independent": independent,
        "matrix": matrix.to_dict(),
        "summary": summarise_matrix(matrix, independent_self=independent_self),
        "gate": None,
        "mixed": {"reason": "mixed.enabled=false"},
        "backfill": {"reason": "backfill.enabled=false"},
        "plots": {},
        "files": {},
    }
    if bool(cfg.gate.enabled) or cfg.gate.deployed or cfg.gate.candidate:
        if len(names) < 2:
            raise ConfigError("the gate needs at least two versions (deployed and candidate)")
        deployed = _version_name(cfg.gate.deployed, dirs, names) or names[-2]
        candidate = _version_name(cfg.gate.candidate, dirs, names) or names[-1]
        verdict = gate(matrix, deployed=deployed, candidate=candidate, metric=str(cfg.gate.metric))
        report["gate"] = {"deployed": deployed, "candidate": candidate, **verdict.to_dict()}

    want_mixed, want_backfill = bool(cfg.mixed.enabled), bool(cfg.backfill.enabled) and len(names) > 1
    if bool(cfg.backfill.enabled) and len(names) == 1:
        report["backfill"] = {"reason": "one version only: nothing to upgrade to"}
    if want_mixed or want_backfill:
        with MixedGallery(dirs, dict(zip(names, sets)), topk=tuple(int(k) for k in cfg.topk),
                          leave_one_out=bool(cfg.leave_one_out), batch_size=int(cfg.mixed.batch_size),
                          allow_partial=bool(cfg.mixed.allow_partial), max_queries=cfg.mixed.max_queries,
                          seed=int(cfg.mixed.seed)) as gallery:
            if want_mixed:
                _logger.info("mixed-version gallery through the index service")
                report["mixed"] = _run_mixed(gallery, cfg, names, metrics)
            if want_backfill:
                _logger.info("backfill curves through the index service")
                report["backfill"] = _run_backfill(gallery, cfg, names, dirs, metrics, kwargs)

    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    if bool(cfg.plots):
        plot_matrix_heatmap(matrix, out / "matrix_heatmap.png")
        report["plots"]["heatmap"] = "matrix_heatmap.png"
        if report["backfill"].get("curves"):
            refs = {m: {f"{report['backfill']['old']}/{report['backfill']['old']}":
                        matrix.values[m][matrix.index(report["backfill"]["old"]), matrix.index(report["backfill"]["old"])],
                        f"{report['backfill']['new']}/{report['backfill']['new']}":
                        matrix.values[m][matrix.index(report["backfill"]["new"]), matrix.index(report["backfill"]["new"])]}
                    for m in metrics}
            plot_backfill(report["backfill"], out / "backfill.png", metrics=[str(m) for m in cfg.backfill.metrics],
                          references=refs)
            report["plots"]["backfill"] = "backfill.png"
    report["files"] = {"this report": "report.md", "everything as JSON": "report.json", **write_csvs(report, out),
                       **{f"plot: {k}": v for k, v in report["plots"].items()}}
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    target = str(OmegaConf.select(cfg, "logger._target_", default="") or "")
    if target.endswith("WandbLogger"):
        log_to_wandb(report, out, project=str(cfg.logger.get("project", "compatembed")),
                     mode=str(cfg.logger.get("mode", "offline")), name=cfg.logger.get("name"))
    return report


def _version_name(value: Any, dirs: list[str], names: list[str]) -> str | None:
    """A gate version given as an id or as one of the version directories → its id."""
    if value is None:
        return None
    value = str(value)
    if value in names:
        return value
    for d, n in zip(dirs, names):
        if Path(d).resolve() == Path(value).resolve():
            return n
    raise ConfigError(f"gate version {value!r} is not one of the report's versions ({', '.join(names)})")
