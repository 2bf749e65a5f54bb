"""Evidence of the compatibility methods on the shared CIFAR-10 (old: classes 0-4, new: 0-9).

Trains every method's experiment with the CLIs (``cifar10_<method>``; with ``--scenario external``
the deployed old model is the third-party ResNet-20, ``cifar10_external_<method>``), evaluates each
new model against the old one on the 10-class test split, and writes
``docs/results/cifar10_methods.json`` / ``.md`` (or ``cifar10_external_methods.*``): per method
old/old, new/new, new/old top-1/top-5/mAP/mAP@R, the empirical compatibility criterion on top-1
and mAP, the update gain, and the training-step time relative to ``independent`` measured in the
same run.

    python -m tools.run_cifar10_methods                       # internal scenario
    python -m tools.run_cifar10_methods --scenario external   # third-party old model
    python -m tools.run_cifar10_methods --methods bct oca -- trainer.device=cuda
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools._runner import REPO, evaluate, machine, pct, train, write_json

METRICS = ("top1", "top5", "mAP", "mAP@R")
METHODS = ("bct", "oca", "bt2", "lambda_orth", "fct")
POST_HOC = ("lambda_orth", "fct")  # fit a map between the independent new model and the old space


def _row(pairs: list[dict[str, Any]], query: str, gallery: str) -> dict[str, Any]:
    return next(p for p in pairs if p["query"] == query and p["gallery"] == gallery)


def summarise(name: str, report: dict[str, Any], independent_self: dict[str, Any], step_ratio: float | None, wall_s: float | None) -> dict[str, Any]:
    """One method's line: its three pairs, the criterion, the update gain and the cost."""
    old_old, new_new, new_old = (_row(report["pairs"], q, g) for q, g in (("old", "old"), ("new", "new"), ("new", "old")))
    gain = {}
    for metric in ("top1", "mAP"):
        # undefined unless the independent new model beats the old one: there is no gain to share
        denominator = independent_self[metric] - old_old[metric]
        gain[metric] = None if denominator <= 0 else (new_old[metric] - old_old[metric]) / denominator
    return {
        "method": name,
        "version_id": report["query_version"],
        "old/old": {m: old_old[m] for m in METRICS},
        "new/new": {m: new_new[m] for m in METRICS},
        "new/old": {m: new_old[m] for m in METRICS},
        "route": new_old["route"],
        "compatible": report["compatible"],
        "update_gain": gain,
        "new_new_minus_independent": {m: new_new[m] - independent_self[m] for m in ("top1", "mAP")},
        "step_time_vs_independent": step_ratio,
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("internal", "external"), default="internal",
                        help="internal: old = our model on classes 0-4; external: old = the third-party ResNet-20")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--no-reuse", action="store_true", help="retrain even when a version directory exists")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("--retrain-post-hoc", action="store_true",
                        help="train the new model of lambda_orth/fct inside their run (default: reuse the independent "
                             "new model and only fit the map, as deployments do)")
    parser.add_argument("--variant", action="append", default=[], metavar="'METHOD KEY=VALUE ...'",
                        help="also train METHOD with these Hydra overrides, as its own row and version directory "
                             "(repeatable), e.g. --variant 'oca method.influence_scale=10'")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    variants = []
    for text in args.variant:
        method, *extra = shlex.split(text)
        if method not in METHODS or not extra or not all("=" in o for o in extra):
            parser.error(f"--variant {text!r}: want a method ({', '.join(METHODS)}) followed by KEY=VALUE overrides")
        variants.append((method, extra))
    reuse, runs, overrides = not args.no_reuse, args.runs, list(args.overrides)
    prefix = "cifar10_external_" if args.scenario == "external" else "cifar10_"
    old_name = "cifar10_external_old" if args.scenario == "external" else "cifar10_independent_old"
    indep_name = "cifar10_external_independent_new" if args.scenario == "external" else "cifar10_independent_new"
    eval_overrides = [f"backend={args.eval_backend}"] + [o for o in overrides if o.startswith(("data", "paths"))]

    old = train(old_name, runs=runs, overrides=overrides, reuse=reuse)
    linked = [f"method.old_version={old['version_dir']}"]
    indep = train(indep_name, runs=runs, overrides=overrides + linked, reuse=reuse)
    reports_dir = runs / "reports"
    indep_report = evaluate(indep["version_dir"], old["version_dir"], reports_dir / indep_name, overrides=eval_overrides)
    independent_self = _row(indep_report["pairs"], "new", "new")
    indep_step = indep["manifest"]["training"]["summary"].get("train/step_time_s")

    rows = [summarise("independent", indep_report, independent_self, 1.0, indep["wall_s"])]
    name = "cifar10_external_methods" if args.scenario == "external" else "cifar10_methods"
    failed: dict[str, str] = {}
    jobs = [(method, method, prefix + method, []) for method in args.methods]
    jobs += [(method, f"{method} ({' '.join(extra)})", prefix + method + "__" + _slug(extra), extra) for method, extra in variants]
    for method, label, run_name, variant in jobs:
        extra = linked + ([f"method.new_reference_version={indep['version_dir']}"] if method == "bt2" else [])
        if method in POST_HOC and not args.retrain_post_hoc:
            extra += [f"method.new_version={indep['version_dir']}", "trainer.epochs=0"]
        if variant:
            extra += [f"version_id={run_name}", *variant]
        try:
            run = train(prefix + method, runs=runs, overrides=overrides + extra, reuse=reuse, name=run_name)
            report = evaluate(run["version_dir"], old["version_dir"], reports_dir / run_name, overrides=eval_overrides)
        except subprocess.CalledProcessError as exc:  # report the others; say which failed
            failed[label] = f"exit status {exc.returncode} of: {' '.join(map(str, exc.cmd[2:]))}"
            print(f"[failed] {label}: {failed[label]}", flush=True)
            continue
        step = run["manifest"]["training"]["summary"].get("train/step_time_s")
        ratio = None if not (step and indep_step) else step / indep_step
        rows.append(summarise(label, report, independent_self, ratio, run["wall_s"]))
        _write(args, name, old, rows, failed, argv)  # after every method: a cut-short run keeps what it measured
    _write(args, name, old, rows, failed, argv)
    return 1 if failed else 0


def _slug(overrides: list[str]) -> str:
    """A directory-name-safe tag of a variant's overrides (``method.influence_scale=10`` → ``influence_scale-10``)."""
    parts = []
    for o in overrides:
        key, value = o.split("=", 1)
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{key.rsplit('.', 1)[-1]}-{value}"))
    return "__".join(parts)


def _write(args: argparse.Namespace, name: str, old: dict[str, Any], rows: list[dict[str, Any]], failed: dict[str, str], argv: list[str] | None) -> None:
    payload = {
        "scenario": args.scenario,
        "protocol": (
            "shared CIFAR-10 (JPEG copy); old: " + ("the third-party ResNet-20 (all 10 classes, 64-d)" if args.scenario == "external" else "classes 0-4")
            + "; new: classes 0-9; query set = gallery set = the 10-class test split, leave-one-out; new/old follows the "
            "manifest's compatibility route (prefix, affine map, or forward-upgraded gallery)"
        ),
        "command": "python -m tools.run_cifar10_methods " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "old_version": old["manifest"]["version_id"],
        "methods": rows,
        "failed": failed,
    }
    write_json(args.out / f"{name}.json", payload)
    md = render(payload)
    (args.out / f"{name}.md").write_text(md)
    print(md, flush=True)


def render(payload: dict[str, Any]) -> str:
    lines = [
        f"# Compatibility methods on the shared CIFAR-10 ({payload['scenario']} old model)",
        "",
        f"{payload['protocol']}. Values in %; made by `{payload['command'].strip()}`.",
        "",
        "| method | old/old top-1 / mAP | new/new top-1 / mAP | new/old top-1 / top-5 / mAP / mAP@R | ECC top-1 | ECC mAP | gain top-1 / mAP | Δ new/new vs indep. top-1 / mAP | step time × indep. | wall time (min) | route |",
        "|---|---|---|---|---|---|---|---|---:|---:|---|",
    ]
    for r in payload["methods"]:
        oo, nn, no = r["old/old"], r["new/new"], r["new/old"]
        gain = " / ".join("—" if r["update_gain"][m] is None else f"{r['update_gain'][m]:.2f}" for m in ("top1", "mAP"))
        delta = " / ".join(f"{100 * r['new_new_minus_independent'][m]:+.1f}" for m in ("top1", "mAP"))
        ratio = "—" if r["step_time_vs_independent"] is None else f"{r['step_time_vs_independent']:.2f}"
        wall = "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f}"
        lines.append(
            f"| {r['method']} | {pct(oo['top1'])} / {pct(oo['mAP'])} | {pct(nn['top1'])} / {pct(nn['mAP'])} | "
            f"{' / '.join(pct(no[m]) for m in METRICS)} | {'yes' if r['compatible']['top1'] else 'no'} | "
            f"{'yes' if r['compatible']['mAP'] else 'no'} | {gain} | {delta} | {ratio} | "
            f"{wall} | {r['route']} |"
        )
    for method, reason in payload.get("failed", {}).items():
        lines.append(f"| {method} | failed: {reason} |" + " |" * 9)
    m = payload["machine"]
    lines += [
        "",
        "ECC: the empirical compatibility criterion M(new, old) > M(old, old). Update gain: "
        "[M(new, old) − M(old, old)] / [M(indep. new, indep. new) − M(old, old)], — when the independent new model does "
        "not beat the old one (then no method can satisfy the criterion either). Step time: median seconds per "
        "training step (data loading excluded) of each training run relative to the independent model's run; runs "
        "reused from earlier invocations may have met other load, so the like-for-like ratio is "
        f"`docs/results/step_time_{payload['scenario']}.md` (`python -m tools.bench_step_time`, all methods back to back "
        "in one process). Post-hoc maps (lambda_orth, fct) reuse the independent new model unless run with "
        "--retrain-post-hoc, so they have no training steps: their cost is the map fit, in the wall-time column.",
        "",
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, CUDA device: {m['cuda'] or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
