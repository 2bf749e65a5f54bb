"""Evidence of the compatibility methods on the shared CIFAR-10 (old: classes 0-4, new: 0-9), over seeds.

Trains every method's experiment with the CLIs (``cifar10_<method>``; with ``--scenario external``
the deployed old model is the third-party ResNet-20, ``cifar10_external_<method>``) once per seed
(the old model is fixed), evaluates each new model against the old one on the 10-class test split,
and writes ``docs/results/cifar10_methods.json`` / ``.md`` (or ``cifar10_external_methods.*``):
per method and seed old/old, new/new, new/old top-1/top-5/mAP/mAP@R, the empirical compatibility
criterion on top-1 and mAP, the update gain, the training-step time relative to the like-for-like
independent model of the same seed, and the run's wall time; the table gives mean and spread over seeds.

Two independent baselines are trained per seed, because the methods classify different things:
``independent`` classifies the raw projection (BCT in the paper's form, and the post-hoc maps, which
reuse it); ``independent (normalized)`` classifies the L2-normalised feature, as OCA, BT² and the
prototype form of BCT do (and BT² distils from it). Each row names the baseline it is measured against.

    python -m tools.run_cifar10_methods                               # internal scenario, seeds 1 2
    python -m tools.run_cifar10_methods --scenario external
    python -m tools.run_cifar10_methods --methods bct oca --seeds 1 -- trainer.device=cuda
    python -m tools.run_cifar10_methods --variant 'oca method.influence_scale=10'

Runs whose version directory exists are reused (``--no-reuse`` retrains); a run cut short resumes
from its checkpoint. The results files are rewritten after every run, so a long invocation that is
stopped keeps what it measured. ``--merge`` keeps the rows (method and seed) of the existing results
file that this invocation does not produce, so one method or seed can be added without retraining the
others; the file then lists every command that contributed.

    python -m tools.run_cifar10_methods --methods bct_prototypes --seeds 1 --merge
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compatembed.methods import list_methods, method_class
from compatembed.methods.post_hoc import PostHocMapMethod
from tools._runner import (
    METRICS,
    REPO,
    StaleVersionError,
    compatibility_pairs,
    defined_gain,
    describe_machine,
    evaluate,
    machine,
    pair,
    stale_settings,
    train,
    write_json,
)

DEFAULT_ROWS = ("bct", "bct_prototypes", "oca", "bt2", "lambda_orth", "fct")
"""The rows trained without ``--methods``, in table order (any row of :func:`entries` may be asked for)."""
NORMALIZED = "classifier_input=normalized"


@dataclass(frozen=True)
class Entry:
    """One row of the table: what to train, and which independent model it is measured against."""

    label: str
    experiment: str  # without the scenario prefix
    overrides: tuple[str, ...] = ()
    baseline: str = "raw"  # raw | normalized
    run_name: str = ""

    def name(self, prefix: str) -> str:
        return prefix + (self.run_name or self.experiment)


BASELINES = {
    "raw": Entry("independent", "independent_new"),
    "normalized": Entry("independent (normalized)", "independent_new", (f"method.{NORMALIZED}",), "normalized",
                        "independent_new_normalized"),
}
ROWS = {  # where a method's row is more than its name against the raw baseline, and the named variants
    "bct": Entry("bct (paper: old classifier on the raw feature)", "bct"),
    "bct_prototypes": Entry("bct (prototypes: P on the normalised feature, weight 10)", "bct",
                            ("method.variant=prototypes", f"method.{NORMALIZED}"), "normalized", "bct_prototypes"),
    "oca": Entry("oca", "oca", baseline="normalized"),
    "bt2": Entry("bt2", "bt2", baseline="normalized"),
}


def entries() -> dict[str, Entry]:
    """A row per registered method (``cifar10_<name>``; ``independent`` is the baseline, not a row), then the variants."""
    return {**{name: Entry(name, name) for name in list_methods() if name != "independent"}, **ROWS}


def post_hoc(experiment: str) -> bool:
    """The row's method fits a map between the independent new model and the old space (it can adopt the baseline)."""
    return experiment in list_methods() and issubclass(method_class(experiment), PostHocMapMethod)


@dataclass
class Rows:
    """Per-seed results of every entry, in table order."""

    seeds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    baseline_of: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, baseline: str, row: dict[str, Any]) -> None:
        self.seeds.setdefault(label, []).append(row)
        self.baseline_of[label] = baseline


def summarise(seed: int, report: dict[str, Any], baseline_self: dict[str, Any], step_ratio: float | None,
              wall_s: float | None, images_per_s: float | None) -> dict[str, Any]:
    """One seed of one method: its three pairs, the criterion, the update gain and the cost."""
    pairs = compatibility_pairs(report)
    old_old, new_new, new_old = pairs["old/old"], pairs["new/new"], pairs["new/old"]
    return {
        "seed": seed,
        "version_id": report["query_version"],
        **pairs,
        "update_gain": {m: defined_gain(new_old[m], old_old[m], baseline_self[m]) for m in ("top1", "mAP")},
        "new_new_minus_baseline": {m: new_new[m] - baseline_self[m] for m in ("top1", "mAP")},
        "step_time_vs_baseline": step_ratio,
        "wall_s": wall_s,
        "images_per_s": images_per_s,
    }


def _stats(values: list[float | None]) -> dict[str, float | None]:
    """Mean, min and max of the defined values (None when none is defined)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(defined)), "min": float(min(defined)), "max": float(max(defined))}


def aggregate(label: str, baseline: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the numbers the table shows."""
    out: dict[str, Any] = {"method": label, "baseline": baseline, "seeds": [r["seed"] for r in seeds],
                           "route": seeds[0]["route"]}
    for name in ("old/old", "new/new", "new/old"):
        out[name] = {m: _stats([r[name][m] for r in seeds]) for m in METRICS}
    out["compatible"] = {m: sum(bool(r["compatible"][m]) for r in seeds) for m in ("top1", "mAP")}
    out["update_gain"] = {m: _stats([r["update_gain"][m] for r in seeds]) for m in ("top1", "mAP")}
    out["new_new_minus_baseline"] = {m: _stats([r["new_new_minus_baseline"][m] for r in seeds]) for m in ("top1", "mAP")}
    for key in ("step_time_vs_baseline", "wall_s", "images_per_s"):
        out[key] = _stats([r[key] for r in seeds])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("internal", "external"), default="internal",
                        help="internal: old = our model on classes 0-4; external: old = the third-party ResNet-20")
    known = entries()
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_ROWS), choices=list(known),
                        help=f"rows to train (default: {' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2],
                        help="seeds of the new models (the old model is fixed); not the old model's seed 0, since a "
                             "shared initialisation makes independently trained models partly compatible by accident")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--no-reuse", action="store_true", help="retrain even when a version directory exists")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("--retrain-post-hoc", action="store_true",
                        help="train the new model of lambda_orth/fct inside their run (default: reuse the independent "
                             "new model and only fit the map, as deployments do)")
    parser.add_argument("--variant", action="append", default=[], metavar="'METHOD KEY=VALUE ...'",
                        help="also train METHOD with these Hydra overrides, as its own row and version directories "
                             "(repeatable), e.g. --variant 'oca method.influence_scale=10'")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows (method, seed) of the existing results file that this invocation does not "
                             "produce; without it the file holds only this invocation's rows")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    chosen = [known[m] for m in args.methods]
    for text in args.variant:
        method, *extra = shlex.split(text)
        if method not in known or not extra or not all("=" in o for o in extra):
            parser.error(f"--variant {text!r}: want a method ({', '.join(known)}) followed by KEY=VALUE overrides")
        base = known[method]
        overrides = (*base.overrides, *extra)
        baseline = "normalized" if any(o.endswith(NORMALIZED) for o in overrides) else base.baseline
        chosen.append(Entry(f"{base.label} ({' '.join(extra)})", base.experiment, overrides, baseline,
                             (base.run_name or base.experiment) + "__" + _slug(extra)))
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")

    runs, overrides = args.runs, list(args.overrides)
    prefix = "cifar10_external_" if args.scenario == "external" else "cifar10_"
    old_name = "cifar10_external_old" if args.scenario == "external" else "cifar10_independent_old"
    eval_overrides = [f"backend={args.eval_backend}"] + [o for o in overrides if o.startswith(("data", "paths"))]
    reports_dir = runs / "reports"
    name = "cifar10_external_methods" if args.scenario == "external" else "cifar10_methods"
    reuse = not args.no_reuse

    kept = _earlier(args.out / f"{name}.json", args.scenario) if args.merge else None  # before any training
    linked = [f"method.old_version={runs / old_name}"]
    rows, failed = Rows(), {}
    needed = {e.baseline for e in chosen} | ({"normalized"} if any(e.experiment == "bt2" for e in chosen) else set())

    def planned(entry: Entry, seed: int) -> tuple[str, list[str]]:
        """The run directory name and the training overrides of ``entry`` at ``seed``."""
        run_name = f"{entry.name(prefix)}_s{seed}"
        extra = []
        if entry not in BASELINES.values():
            if entry.experiment == "bt2":  # distils from the like-for-like independent model of the same seed
                extra.append(f"method.new_reference_version={runs / (BASELINES['normalized'].name(prefix) + f'_s{seed}')}")
            if post_hoc(entry.experiment) and not args.retrain_post_hoc:
                extra += [f"method.new_version={runs / (BASELINES[entry.baseline].name(prefix) + f'_s{seed}')}",
                          "trainer.epochs=0"]
        return run_name, overrides + linked + [f"seed={seed}", f"version_id={run_name}", *entry.overrides, *extra]

    if reuse:  # every version trained with other settings than asked now, named before any training
        stale = []
        for seed in args.seeds:
            for entry in [BASELINES[k] for k in ("raw", "normalized") if k in needed] + chosen:
                run_name, asked = planned(entry, seed)
                stale += stale_settings(runs / run_name, prefix + entry.experiment, asked)
        if stale:
            raise StaleVersionError(stale)

    old = train(old_name, runs=runs, overrides=overrides, reuse=reuse)
    if kept is not None:  # before any new model trains: rows against another old model do not mix
        _same_old_model(kept, old["manifest"], args.out / f"{name}.json")

    def run(entry: Entry, seed: int, baseline: dict[str, Any] | None) -> dict[str, Any] | None:
        run_name, asked = planned(entry, seed)
        try:
            trained = train(prefix + entry.experiment, runs=runs, name=run_name, reuse=reuse, overrides=asked)
            report = evaluate(trained["version_dir"], old["version_dir"], reports_dir / run_name, overrides=eval_overrides)
        except subprocess.CalledProcessError as exc:  # report the others; say which failed
            failed[f"{entry.label} seed {seed}"] = f"exit status {exc.returncode} of: {' '.join(map(str, exc.cmd[2:]))}"
            print(f"[failed] {entry.label} seed {seed}", flush=True)
            return None
        summary = trained["manifest"]["training"]["summary"]
        base_self = pair((baseline or {"report": report})["report"], "new", "new")
        base_step = (baseline or trained)["manifest"]["training"]["summary"].get("train/step_time_s")
        step = summary.get("train/step_time_s")
        ratio = None if not (step and base_step) or post_hoc(entry.experiment) else step / base_step
        row = summarise(seed, report, base_self, ratio, trained["wall_s"], summary.get("train/images_per_s"))
        if baseline is None:  # a baseline measured against itself: it has no update gain
            row["update_gain"] = {m: None for m in row["update_gain"]}
        rows.add(entry.label, entry.baseline, row)
        _write(args, name, old, rows, failed, argv, kept)  # after every run: a cut-short invocation keeps what it measured
        return {**trained, "report": report}

    for seed in args.seeds:
        baselines: dict[str, dict[str, Any]] = {}
        for key in ("raw", "normalized"):
            if key in needed:
                result = run(BASELINES[key], seed, None)
                if result is not None:
                    baselines[key] = result
        for entry in chosen:
            if entry.baseline not in baselines or (entry.experiment == "bt2" and "normalized" not in baselines):
                failed[f"{entry.label} seed {seed}"] = "its independent baseline failed"
                continue
            run(entry, seed, baselines[entry.baseline])
    _write(args, name, old, rows, failed, argv, kept)
    return 1 if failed else 0


def _earlier(path: Path, scenario: str) -> dict[str, Any] | None:
    """The results file a ``--merge`` adds to (None when there is none yet); refused when it is of another scenario."""
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        ok = isinstance(payload, dict) and isinstance(payload.get("per_seed"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--merge: {path} is not a results file of this tool; move it away or run without --merge")
    if payload.get("scenario") != scenario:
        raise SystemExit(f"--merge: {path} holds the {payload.get('scenario')!r} scenario, not {scenario!r}")
    return payload


def _same_old_model(earlier: dict[str, Any], old_manifest: dict[str, Any], path: Path) -> None:
    """Refuse a ``--merge`` whose earlier rows were measured against other old weights (or unrecorded ones)."""
    theirs, ours = earlier.get("old_weights_sha256"), old_manifest["files"]["model.safetensors"]
    if theirs != ours:
        raise SystemExit(
            f"--merge: the rows of {path} were measured against "
            + (f"other old-model weights ({str(theirs)[:12]}…)" if theirs else "an old model whose weights it does not record")
            + f", not {old_manifest['version_id']} ({ours[:12]}…): their old/old, gains and baselines would not "
            "compare; run every row again without --merge")


def merged(earlier: dict[str, Any] | None, rows: Rows, failed: dict[str, str]) -> tuple[Rows, dict[str, str], list[str]]:
    """This invocation's rows over an earlier results file's: a (method, seed) measured now replaces the earlier one.

    Returns the rows in the earlier file's order (new methods after), the failures still standing (an earlier
    failure of a row that succeeded now is dropped), and the earlier commands.
    """
    if earlier is None:
        return rows, failed, []
    out = Rows()
    baseline_of = {m["method"]: m["baseline"] for m in earlier.get("methods", [])}
    for label in [*earlier["per_seed"], *(x for x in rows.seeds if x not in earlier["per_seed"])]:
        now = {r["seed"]: r for r in rows.seeds.get(label, [])}
        before = {r["seed"]: r for r in earlier["per_seed"].get(label, []) if r["seed"] not in now}
        for seed in sorted({**before, **now}):
            out.add(label, rows.baseline_of.get(label, baseline_of.get(label, "raw")), {**before, **now}[seed])
    measured = {f"{label} seed {r['seed']}" for label, seeds in rows.seeds.items() for r in seeds}
    standing = {k: v for k, v in earlier.get("failed", {}).items() if k not in measured}
    commands = earlier.get("commands") or [earlier["command"]]
    return out, {**standing, **failed}, list(commands)


def _slug(overrides: list[str]) -> str:
    """A directory-name-safe tag of a variant's overrides (``method.influence_scale=10`` → ``influence_scale-10``)."""
    parts = []
    for o in overrides:
        key, value = o.split("=", 1)
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{key.rsplit('.', 1)[-1]}-{value}"))
    return "__".join(parts)


def _write(args: argparse.Namespace, name: str, old: dict[str, Any], rows: Rows, failed: dict[str, str],
           argv: list[str] | None, earlier: dict[str, Any] | None = None) -> None:
    rows, failed, commands = merged(earlier, rows, failed)
    command = "python -m tools.run_cifar10_methods " + shlex.join(sys.argv[1:] if argv is None else argv)  # quoted: --variant
    payload = {
        "scenario": args.scenario,
        "protocol": (
            "shared CIFAR-10 (JPEG copy); old: "
            + ("the third-party ResNet-20 (all 10 classes, 64-d)" if args.scenario == "external" else "classes 0-4")
            + "; new: classes 0-9; query set = gallery set = the 10-class test split, leave-one-out; new/old follows the "
            "manifest's compatibility route (prefix, affine map, or forward-upgraded gallery)"
        ),
        "command": command,
        "commands": [*commands, command],
        "machine": machine(),
        "old_version": old["manifest"]["version_id"],
        "old_weights_sha256": old["manifest"]["files"]["model.safetensors"],
        "old_wall_s": old["wall_s"],
        "methods": [aggregate(label, rows.baseline_of[label], seeds) for label, seeds in rows.seeds.items()],
        "per_seed": rows.seeds,
        "failed": failed,
    }
    payload = _relative(payload)
    write_json(args.out / f"{name}.json", payload)
    md = render(payload)
    (args.out / f"{name}.md").write_text(md)
    print(md, flush=True)


def _relative(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with this checkout's absolute prefix removed from every path (commands, version dirs)."""
    return json.loads(json.dumps(payload).replace(json.dumps(str(REPO) + "/")[1:-1], ""))


def _mean_spread(s: dict[str, float | None], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    if s["mean"] is None:
        return "—"
    text = fmt.format(scale * s["mean"])
    if s["max"] != s["min"]:
        text += " ±" + fmt.replace("+", "").format(abs(scale) * (s["max"] - s["min"]) / 2)
    return text


_COLUMNS = {  # the summary table's columns (header → markdown alignment), in the order render() fills them
    "method": "---", "baseline": "---", "seeds": "---", "old/old top-1 / mAP": "---", "new/new top-1 / mAP": "---",
    "new/old top-1 / mAP": "---", "ECC top-1": "---", "ECC mAP": "---", "gain top-1 / mAP": "---",
    "Δ new/new vs baseline top-1 / mAP": "---", "step time × baseline": "---:", "min per run": "---:", "route": "---",
}


def render(payload: dict[str, Any]) -> str:
    """The markdown summary: one row per method (mean ± half the range over the seeds), then how to read it."""
    header = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(_COLUMNS.values()) + "|"]
    lines = [
        f"# Compatibility methods on the shared CIFAR-10 ({payload['scenario']} old model)",
        "",
        f"{payload['protocol']}. Values in %, mean ± half the range over the seeds; made by "
        + ", then ".join(f"`{c.strip()}`" for c in payload.get("commands") or [payload["command"]]) + ".",
        "",
        *header,
    ]
    for r in payload["methods"]:
        n = len(r["seeds"])
        oo, nn, no = r["old/old"], r["new/new"], r["new/old"]
        gain = " / ".join(_mean_spread(r["update_gain"][m], 1.0, "{:.2f}") for m in ("top1", "mAP"))
        delta = " / ".join(_mean_spread(r["new_new_minus_baseline"][m], 100.0, "{:+.1f}") for m in ("top1", "mAP"))
        ratio = _mean_spread(r["step_time_vs_baseline"], 1.0, "{:.2f}")
        wall = _mean_spread(r["wall_s"], 1 / 60, "{:.1f}")
        lines.append(
            f"| {r['method']} | {r['baseline']} | {', '.join(map(str, r['seeds']))} | "
            f"{_mean_spread(oo['top1'])} / {_mean_spread(oo['mAP'])} | {_mean_spread(nn['top1'])} / {_mean_spread(nn['mAP'])} | "
            f"{_mean_spread(no['top1'])} / {_mean_spread(no['mAP'])} | {r['compatible']['top1']}/{n} | "
            f"{r['compatible']['mAP']}/{n} | {gain} | {delta} | {ratio} | {wall} | {r['route']} |"
        )
    for method, reason in payload.get("failed", {}).items():
        lines.append(f"| {method} | failed: {reason} |" + " |" * (len(_COLUMNS) - 2))
    m = payload["machine"]
    old_wall = payload.get("old_wall_s")
    lines += [
        "",
        "Baseline: the independent new model of the same seed the row is measured against — `raw` classifies the "
        "projection, `normalized` the L2-normalised feature (as OCA, BT² and BCT's prototype form classify theirs). "
        "ECC: seeds satisfying the empirical compatibility criterion M(new, old) > M(old, old). Update gain: "
        "[M(new, old) − M(old, old)] / [M(baseline, baseline) − M(old, old)], — when the baseline does "
        "not beat the old model (then no method can satisfy the criterion either). Step time: median seconds per "
        "training step (data loading excluded) relative to the baseline's run of the same seed; runs "
        "reused from earlier invocations may have met other load. Post-hoc maps (lambda_orth, fct) reuse the "
        "independent new model unless run with --retrain-post-hoc, so they have no training steps: their cost is the "
        "map fit, in the minutes column. New/old for the independent baselines is the raw cross-test (no route).",
        "",
        f"The old model ({payload['old_version']}) is fixed across seeds"
        + (f"; its run took {old_wall / 60:.1f} min" if old_wall else "") + ".",
        f"Machine: {describe_machine(m)}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
