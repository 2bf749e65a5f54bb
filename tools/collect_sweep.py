"""Collect a validation-split sweep (``conf/hparams_search/<name>.yaml``) into a results table.

A sweep runs as a Hydra multirun of ``compatembed-train`` with ``validation.enabled=true``: every run
trains on the training split minus a seeded per-class validation split and evaluates itself on that
split (``<run>/validation/report.json``). This reads the sweep's parameters from its config, the
value of each parameter from every run's ``config.yaml``, and the validation numbers, and writes
``docs/results/sweeps/<name>.{json,md}`` ranked by the sweep's metric. The test split plays no part.

    compatembed-train -m experiment=cifar10_oca hparams_search=oca_influence
    python -m tools.collect_sweep oca_influence
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from compatembed.training.run import passes_criterion, sweep_pair
from tools._runner import REPO, pct, write_json


def collect(name: str, sweep_dir: Path | None = None) -> dict[str, Any]:
    """The sweep's runs with their parameter values and validation metrics, best first."""
    config_path = REPO / "conf" / "hparams_search" / f"{name}.yaml"
    if not config_path.is_file():
        known = sorted(p.stem for p in config_path.parent.glob("*.yaml"))
        raise SystemExit(f"error: no sweep config {config_path} (known: {', '.join(known)})")
    sweep = OmegaConf.load(config_path)
    params = list(sweep.hydra.sweeper.params.keys())
    metric = str(sweep.validation.metric)
    pair = str(OmegaConf.select(sweep, "validation.pair", default="auto"))
    require_compatible = bool(OmegaConf.select(sweep, "validation.require_compatible", default=False))
    ranked: tuple[str, str] = ("new", "new")  # the pair of the runs read (the same for every run of a sweep)
    directory = sweep_dir or REPO / str(sweep.hydra.sweep.dir)
    rows = []
    for report_path in sorted(directory.glob("*/validation/report.json")):
        run = report_path.parent.parent
        cfg = OmegaConf.load(run / "config.yaml")
        report = json.loads(report_path.read_text())
        pairs = {(r["query"], r["gallery"]): r for r in report["pairs"]}
        ranked = sweep_pair(report, pair)
        cross = ("new", "old") if report["query_version"] != report["gallery_version"] else ("new", "new")
        rows.append({
            "run": run.name,
            "params": {p: _plain(OmegaConf.select(cfg, p)) for p in params},
            "metric": pairs[ranked][metric],
            "new/new": {m: pairs[("new", "new")][m] for m in ("top1", "mAP")},
            "new/old": {m: pairs[cross][m] for m in ("top1", "mAP")},
            "old/old": {m: pairs[("old", "old")][m] for m in ("top1", "mAP")},
            "compatible": report["compatible"],
            "passes": passes_criterion(report) if require_compatible else None,
            "validation": OmegaConf.to_container(cfg.data.validation),
            "epochs": int(cfg.trainer.epochs),
        })
    if not rows:
        raise SystemExit(f"error: no finished run of sweep {name!r} under {directory} (no */validation/report.json)")
    # With require_compatible the criterion is a constraint: every run that passes it (top-1 and mAP) ranks first.
    rows.sort(key=lambda r: (bool(r["passes"]) if require_compatible else True, r["metric"]), reverse=True)
    return {"sweep": name, "config": str(config_path.relative_to(REPO)), "params": params,
            "metric": f"{metric} of {'/'.join(ranked)} on the validation split", "require_compatible": require_compatible,
            "runs": rows}


def _plain(value: Any) -> Any:
    """A swept value as plain Python: a list such as FCT's hidden widths is a ListConfig in the run's config,
    and a swept config group (``optim: adam,adam_one_cycle``) is its option's ``name``."""
    if OmegaConf.is_dict(value):
        if "name" not in value:
            raise SystemExit("error: a swept config group needs a 'name' key in its options to be shown in the table")
        return str(value.name)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def render(payload: dict[str, Any]) -> str:
    params = payload["params"]
    lines = [
        f"# Sweep `{payload['sweep']}` on the validation split",
        "",
        f"Config `{payload['config']}`; ranked by {payload['metric']} (best first"
        + ("; runs that miss the compatibility criterion there, on top-1 or mAP, rank last" if payload.get("require_compatible")
           else "") + "). Every run trains on the training "
        "split minus the validation split and is evaluated on the validation split only; the test split is not used. "
        "Values in %.",
        "",
        "| " + " | ".join(params)
        + " | metric | new/new top-1 / mAP | new/old top-1 / mAP | old/old top-1 / mAP | ECC top-1 / mAP | epochs |",
        "|" + "---|" * (len(params) + 6),
    ]
    for r in payload["runs"]:
        ecc = " / ".join("yes" if r["compatible"][m] else "no" for m in ("top1", "mAP"))
        lines.append(
            "| " + " | ".join(str(r["params"][p]) for p in params) + f" | {pct(r['metric'])} | "
            f"{pct(r['new/new']['top1'])} / {pct(r['new/new']['mAP'])} | "
            f"{pct(r['new/old']['top1'])} / {pct(r['new/old']['mAP'])} | "
            f"{pct(r['old/old']['top1'])} / {pct(r['old/old']['mAP'])} | {ecc} | {r['epochs']} |"
        )
    v = payload["runs"][0]["validation"]
    lines += ["", f"Validation split: {100 * float(v['fraction']):.0f}% of each class of the training split, seed {v['seed']}.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="name of a conf/hparams_search/<name>.yaml sweep")
    parser.add_argument("--dir", type=Path, default=None, help="where its runs are (default: the config's hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "sweeps")
    args = parser.parse_args(argv)
    payload = collect(args.sweep, args.dir)
    payload["command"] = "python -m tools.collect_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out / f"{args.sweep}.json", payload)
    md = render(payload)
    (args.out / f"{args.sweep}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
