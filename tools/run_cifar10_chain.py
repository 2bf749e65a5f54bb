"""Evidence of compatibility over three model versions on the shared CIFAR-10: classes 0-3 → 0-6 → 0-9.

Trains with the CLIs (as every evidence tool does):

* v1: ``experiment=cifar10_independent_old`` on classes 0-3 (the first deployed model);
* the compatible chain: v2 on 0-6 and v3 on 0-9 with ``experiment=cifar10_<method>``, each trained against
  the previous version (``method.old_version``), so v3 → v1 composes through v2;
* the independent chain for contrast: i2 on 0-6 and i3 on 0-9 with ``experiment=cifar10_independent_new``.

Then runs ``compatembed-report`` on both chains (matrix, criterion, AC/AM, update gain against the
independent models, mixed gallery and backfill curves through the index service, plots, and the gate of
v3 against v2). v1 is fixed; v2, v3 and the independent chain are trained once per seed (``--seeds``).
Writes ``docs/results/chain/s<seed>/`` per seed (the compatible chain's report.md, report.json, CSVs,
PNGs; the independent chain's under ``docs/results/chain/s<seed>/independent/``, written once and shared by
every method's chain, as its versions are) and ``docs/results/chain/summary.{json,md}``:
AC and AM per metric, per seed and their mean and range, with the machine and wall times.

    python -m tools.run_cifar10_chain                                # OCA at each step, seeds 1 2
    python -m tools.run_cifar10_chain --method bct -- trainer.device=cuda data=cifar10_folder
    python -m tools.run_cifar10_chain --eval-backend torch -- trainer.device=cuda
    python -m tools.run_cifar10_chain --method bct --tag bct_prototypes \
        --method-arg method.variant=prototypes --method-arg method.classifier_input=normalized
        # → docs/results/chain_bct_prototypes/
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compatembed.methods import list_methods
from tools._runner import REPO, describe_machine, machine, train, write_json

STEPS = (("v1", "0-3"), ("v2", "0-6"), ("v3", "null"))


def _train(name: str, experiment: str, classes: str, runs: Path, overrides: list[str], *, reuse: bool) -> dict[str, Any]:
    """One version of the chain through :func:`tools._runner.train` (an existing complete version is reused,
    with the training time recorded when it was made)."""
    return {"name": name, **train(experiment, runs=runs, name=name, reuse=reuse,
                                  overrides=[f"version_id={name}", f"data.classes={classes}", *overrides])}


def _dim(version_dir: str) -> int:
    return int(json.loads((Path(version_dir) / "manifest.json").read_text())["embedding"]["dim"])


def _current_report(versions: list[str], out: Path) -> dict[str, Any] | None:
    """The report already in ``out`` when it is of exactly ``versions`` and newer than each of their manifests."""
    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    made = path.stat().st_mtime
    same = [v["dir"] for v in report.get("versions", [])] == versions
    return report if same and all((Path(v) / "manifest.json").stat().st_mtime < made for v in versions) else None


def _report(versions: list[str], independent: list[str], out: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "compatembed.report", f"versions=[{','.join(versions)}]",
           f"independent=[{','.join(independent)}]", f"out={out}", "gate.enabled=true", *overrides]
    print("[report] " + " ".join(cmd[2:]), flush=True)
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode not in (0, 3):  # 3: the gate refused the candidate, which the report records
        raise SystemExit(f"compatembed-report failed with exit status {result.returncode}")
    return json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=[m for m in list_methods() if m != "independent"], default="oca",
                        help="compatible method at each step (default: oca; the independent chain is always trained)")
    parser.add_argument("--extra-dims", type=int, default=32, help="OCA/BT²: dims added at each step (default: 32)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "chain")  # relative: reports name portable paths
    parser.add_argument("--method-arg", action="append", default=[],
                        help="Hydra override for the compatible chain's trainings only, e.g. method.variant=prototypes "
                             "(repeatable; the independent chain never gets it)")
    parser.add_argument("--tag", help="names the compatible chain's versions and the output folder "
                                      "(default: the method; give one whenever --method-arg changes the method)")
    parser.add_argument("--out", type=Path,
                        help="default: docs/results/chain for the default OCA chain, else docs/results/chain_<tag>")
    parser.add_argument("--independent-out", type=Path, default=Path("docs") / "results" / "chain",
                        help="the independent chain's reports go to <this>/s<seed>/independent/, shared by every "
                             "method's chain (a report is reused while its versions are unchanged)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="retrain even when a version directory exists, and rewrite reports that are current")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("--report-arg", action="append", default=[], help="extra compatembed-report override (repeatable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2],
                        help="seeds of v2, v3 and the independent chain (v1 is fixed)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    bad = [a for a in args.method_arg if "=" not in a or not a.split("=", 1)[0].lstrip("+~").startswith("method.")]
    if bad:
        parser.error(f"--method-arg takes method.<key>=<value> overrides, got {bad}")
    if args.method_arg and not args.tag:
        parser.error("--method-arg changes the method: give --tag too, so its versions do not reuse the plain method's")
    args.tag = args.tag or args.method
    args.command = "python -m tools.run_cifar10_chain " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.out is None:
        args.out = Path("docs") / "results" / ("chain" if args.tag == "oca" else f"chain_{args.tag}")
    reuse, runs, overrides = not args.no_reuse, args.runs, list(args.overrides)
    started = time.perf_counter()
    v1 = _train("chain_v1", "cifar10_independent_old", "0-3", runs, overrides, reuse=reuse)
    shared = [o for o in overrides if o.startswith(("data", "paths", "trainer.device"))]
    report_overrides = [f"backend={args.eval_backend}"] + shared
    report_overrides = [o.replace("trainer.device", "device") for o in report_overrides] + list(args.report_arg)
    per_seed = {}
    for seed in args.seeds:  # a stale version stops the run (StaleVersionError); those trained stay, for reuse
        per_seed[seed] = _chain(args, seed, v1, runs / f"s{seed}", overrides + [f"seed={seed}"], report_overrides, reuse=reuse)
        _write_summary(args, v1, per_seed, time.perf_counter() - started, overrides)
    return 0


def _chain(args: argparse.Namespace, seed: int, v1: dict[str, Any], runs: Path, overrides: list[str],
           report_overrides: list[str], *, reuse: bool) -> dict[str, Any]:
    """Train v2, v3 and the independent chain of one seed and report both chains; returns the summary of the seed."""
    trained: dict[str, dict[str, Any]] = {"v1": v1}
    previous = v1["version_dir"]
    for name, classes in STEPS[1:]:
        extra = [f"method.old_version={previous}"]
        if args.method in ("oca", "bt2"):  # the embedding grows by extra_dims at each step
            extra += [f"method.extra_dims={args.extra_dims}", f"model.embed_dim={_dim(previous) + args.extra_dims}"]
        trained[name] = _train(f"chain_{args.tag}_{name}", f"cifar10_{args.method}", classes, runs,
                               overrides + extra + list(args.method_arg), reuse=reuse)
        previous = trained[name]["version_dir"]
    previous = v1["version_dir"]
    for name, classes in STEPS[1:]:
        key = "i" + name[1:]
        trained[key] = _train(f"chain_independent_{name}", "cifar10_independent_new", classes, runs,
                              overrides + [f"method.old_version={previous}"], reuse=reuse)
        previous = trained[key]["version_dir"]
    out = args.out / f"s{seed}"
    independent = [trained["i2"]["version_dir"], trained["i3"]["version_dir"]]
    versions = [trained[v]["version_dir"] for v in ("v1", "v2", "v3")]
    compatible = (_current_report(versions, out) if reuse else None) or _report(
        versions, independent, out,
        report_overrides + [f"title='Compatible chain ({args.tag} at each step, seed {seed}), classes 0-3 → 0-6 → 0-9'"])
    indep_versions, indep_out = [v1["version_dir"], *independent], args.independent_out / f"s{seed}" / "independent"
    indep = (_current_report(indep_versions, indep_out) if reuse else None) or _report(
        indep_versions, independent, indep_out,
        report_overrides + [f"title='Independent chain (contrast, seed {seed}), classes 0-3 → 0-6 → 0-9'"])
    for chain, rep in (("compatible", compatible), ("independent", indep)):
        parts = []
        for metric, s in rep["summary"].items():
            ac = "n/a" if s["AC"] is None else f"{100 * s['AC']:.0f}%"
            parts.append(f"{metric} AC {ac} AM {100 * s['AM']:.1f}%")
        print(f"seed {seed} {chain}: {', '.join(parts)}; gate {'PASS' if rep['gate']['passed'] else 'FAIL'}")
    return {
        "versions": {k: v["version_dir"] for k, v in trained.items()},
        "train_wall_s": {k: v["wall_s"] for k, v in trained.items()},
        "compatible": {m: {"AC": compatible["summary"][m]["AC"], "AM": compatible["summary"][m]["AM"]}
                       for m in compatible["metrics"]},
        "independent": {m: {"AC": indep["summary"][m]["AC"], "AM": indep["summary"][m]["AM"]} for m in indep["metrics"]},
        "gate": {"compatible": compatible["gate"]["passed"], "independent": indep["gate"]["passed"]},
        "report": str(out / "report.md"),
        "independent_report": str(indep_out / "report.md"),
    }


def _write_summary(args: argparse.Namespace, v1: dict[str, Any], per_seed: dict[int, dict[str, Any]], wall_s: float,
                   overrides: list[str]) -> None:
    metrics = list(next(iter(per_seed.values()))["compatible"])
    summary: dict[str, Any] = {"method": args.method, "tag": args.tag, "method_args": list(args.method_arg),
                               "seeds": list(per_seed), "v1_wall_s": v1["wall_s"],
                               "total_wall_s": wall_s, "machine": machine(), "command": args.command, "overrides": overrides,
                               "per_seed": per_seed}
    lines = [f"# Three-version chain on CIFAR-10 ({args.tag} at each step): classes 0-3 → 0-6 → 0-9", "",
             f"v1 fixed; v2, v3 and the independent chain trained per seed ({', '.join(map(str, per_seed))}). AC: share of "
             "pairs (t > j) meeting the empirical criterion C[t][j] > C[j][j]; AM: mean of the lower triangle with the "
             "diagonal, in %. Per-seed reports: " + ", ".join(f"[seed {s}](s{s}/report.md)" for s in per_seed)
             + "; of the independent chain: " + ", ".join(
                 f"[seed {s}]({os.path.relpath(r['independent_report'], args.out)})" for s, r in per_seed.items()) + ".", "",
             "| chain | metric | AC per seed | AM per seed | AM mean |", "|---|---|---|---|---:|"]
    for chain in ("compatible", "independent"):
        summary[chain] = {}
        for m in metrics:
            acs = [per_seed[s][chain][m]["AC"] for s in per_seed]
            ams = [per_seed[s][chain][m]["AM"] for s in per_seed]
            summary[chain][m] = {"AC": acs, "AM": ams}
            ac_text = ", ".join("n/a" if a is None else f"{100 * a:.0f}%" for a in acs)
            am_text = ", ".join(f"{100 * a:.1f}" for a in ams)
            lines.append(f"| {chain} | {m} | {ac_text} | {am_text} | {100 * sum(ams) / len(ams):.1f} |")
    m = summary["machine"]

    def minutes(x: float | None) -> str:
        return "?" if x is None else f"{x / 60:.1f}"

    costs = [f"v1 {minutes(v1['wall_s'])}"] + [
        f"seed {s}: {args.tag} v2 {minutes(r['train_wall_s']['v2'])}, v3 {minutes(r['train_wall_s']['v3'])}, "
        f"independent v2 {minutes(r['train_wall_s']['i2'])}, v3 {minutes(r['train_wall_s']['i3'])}"
        for s, r in per_seed.items()]
    lines += ["", "Training time per model in minutes, as recorded when each was trained (models reused from an "
              "earlier invocation keep theirs; ? where none was recorded): " + "; ".join(costs) + "."]
    pending = [s for s in args.seeds if s not in per_seed]
    lines += ["", f"Machine: {describe_machine(m)}; this invocation {wall_s / 60:.0f} min. Made by `{args.command}`"
              + (f" (seed {', '.join(map(str, pending))} not done yet)." if pending else "."), ""]
    write_json(args.out / "summary.json", summary)
    (args.out / "summary.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'summary.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
