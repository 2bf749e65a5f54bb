"""Evidence of compatibility over three model versions on the shared CIFAR-10: classes 0-3 → 0-6 → 0-9.

Trains with the CLIs (as every evidence tool does):

* v1: ``experiment=cifar10_independent_old`` on classes 0-3 (the first deployed model);
* the compatible chain: v2 on 0-6 and v3 on 0-9 with ``experiment=cifar10_<method>``, each trained against
  the previous version (``method.old_version``), so v3 → v1 composes through v2;
* the independent chain for contrast: i2 on 0-6 and i3 on 0-9 with ``experiment=cifar10_independent_new``.

Then runs ``compatembed-report`` on both chains (matrix, criterion, AC/AM, update gain against the
independent models, mixed gallery and backfill curves through the index service, plots, and the gate of
v3 against v2) and writes ``docs/results/chain/`` (the compatible chain's report.md, report.json, CSVs,
PNGs; the independent chain's under ``independent/``; ``run.json`` with the machine and wall times).

    python -m tools.run_cifar10_chain                                # OCA at each step
    python -m tools.run_cifar10_chain --method bct -- trainer.device=cuda data=cifar10_folder
    python -m tools.run_cifar10_chain --eval-backend torch -- trainer.device=cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools._runner import REPO, machine, write_json

STEPS = (("v1", "0-3"), ("v2", "0-6"), ("v3", "null"))


def _train(name: str, experiment: str, classes: str, runs: Path, overrides: list[str], *, reuse: bool) -> dict[str, Any]:
    """``compatembed-train`` in a subprocess; an existing complete version directory is reused."""
    version_dir = runs / name
    if reuse and (version_dir / "manifest.json").is_file():
        print(f"[reuse] {name}: {version_dir}", flush=True)
        return {"name": name, "version_dir": str(version_dir), "wall_s": None}
    cmd = [sys.executable, "-m", "compatembed.train", f"experiment={experiment}", f"version_id={name}",
           f"output_dir={version_dir}", f"data.classes={classes}", *overrides]
    print("[train] " + " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return {"name": name, "version_dir": str(version_dir), "wall_s": time.perf_counter() - started}


def _dim(version_dir: str) -> int:
    return int(json.loads((Path(version_dir) / "manifest.json").read_text())["embedding"]["dim"])


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
    parser.add_argument("--method", choices=("oca", "bct", "bt2", "lambda_orth"), default="oca",
                        help="compatible method at each step (default: oca)")
    parser.add_argument("--extra-dims", type=int, default=32, help="OCA/BT²: dims added at each step (default: 32)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "chain")  # relative: reports name portable paths
    parser.add_argument("--out", type=Path, default=Path("docs") / "results" / "chain")
    parser.add_argument("--no-reuse", action="store_true", help="retrain even when a version directory exists")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("--report-arg", action="append", default=[], help="extra compatembed-report override (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)
    reuse, runs, overrides = not args.no_reuse, args.runs, list(args.overrides)
    started = time.perf_counter()

    trained: dict[str, dict[str, Any]] = {}
    trained["v1"] = _train("chain_v1", "cifar10_independent_old", "0-3", runs, overrides, reuse=reuse)
    previous = trained["v1"]["version_dir"]
    for name, classes in STEPS[1:]:
        extra = [f"method.old_version={previous}"]
        if args.method in ("oca", "bt2"):  # the embedding grows by extra_dims at each step
            extra += [f"method.extra_dims={args.extra_dims}", f"model.embed_dim={_dim(previous) + args.extra_dims}"]
        trained[name] = _train(f"chain_{args.method}_{name}", f"cifar10_{args.method}", classes, runs, overrides + extra, reuse=reuse)
        previous = trained[name]["version_dir"]
    previous = trained["v1"]["version_dir"]
    for name, classes in STEPS[1:]:
        key = "i" + name[1:]
        trained[key] = _train(f"chain_independent_{name}", "cifar10_independent_new", classes, runs,
                              overrides + [f"method.old_version={previous}"], reuse=reuse)
        previous = trained[key]["version_dir"]

    report_overrides = [f"backend={args.eval_backend}"] + [o for o in overrides if o.startswith(("data", "paths", "trainer.device"))]
    report_overrides = [o.replace("trainer.device", "device") for o in report_overrides] + list(args.report_arg)
    independent = [trained["i2"]["version_dir"], trained["i3"]["version_dir"]]
    compatible = _report([trained[v]["version_dir"] for v in ("v1", "v2", "v3")], independent, args.out,
                         report_overrides + [f"title='Compatible chain ({args.method} at each step), classes 0-3 → 0-6 → 0-9'"])
    indep = _report([trained["v1"]["version_dir"], *independent], independent, args.out / "independent",
                    report_overrides + ["title='Independent chain (contrast), classes 0-3 → 0-6 → 0-9'"])
    summary = {
        "method": args.method,
        "versions": {k: v["version_dir"] for k, v in trained.items()},
        "train_wall_s": {k: v["wall_s"] for k, v in trained.items()},
        "total_wall_s": time.perf_counter() - started,
        "machine": machine(),
        "overrides": overrides,
        "compatible": {m: {"AC": compatible["summary"][m]["AC"], "AM": compatible["summary"][m]["AM"]} for m in compatible["metrics"]},
        "independent": {m: {"AC": indep["summary"][m]["AC"], "AM": indep["summary"][m]["AM"]} for m in indep["metrics"]},
        "gate": {"compatible": compatible["gate"], "independent": indep["gate"]},
    }
    write_json(args.out / "run.json", summary)
    for chain, rep in (("compatible", compatible), ("independent", indep)):
        parts = []
        for metric, s in rep["summary"].items():
            ac = "n/a" if s["AC"] is None else f"{100 * s['AC']:.0f}%"
            parts.append(f"{metric} AC {ac} AM {100 * s['AM']:.1f}%")
        print(f"{chain}: {', '.join(parts)}; gate {'PASS' if rep['gate']['passed'] else 'FAIL'}")
    print(f"wrote {args.out / 'report.md'}, {args.out / 'independent' / 'report.md'}, {args.out / 'run.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
