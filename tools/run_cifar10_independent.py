"""Evidence of the foundation: independent old (classes 0-4) and new (0-9) models on the shared CIFAR-10.

Trains ``experiment=cifar10_independent_old`` and ``experiment=cifar10_independent_new`` with the
CLIs, evaluates every query/gallery pair on the full 10-class test split (leave-one-out) and writes
``docs/results/cifar10_independent.json`` and ``.md``. Expect new/old near chance: that is the
problem compatible training solves.

    python -m tools.run_cifar10_independent            # about 30-50 minutes on 2 CPU cores
    python -m tools.run_cifar10_independent --smoke    # 2 steps per epoch: checks the wiring only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools._runner import REPO, evaluate, machine, pct, train, write_json

METRICS = ("top1", "top5", "mAP", "mAP@R")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="where model versions are written (default: runs/)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where the results go")
    parser.add_argument("--smoke", action="store_true", help="2 steps per epoch, results to <runs>/smoke (wiring check)")
    parser.add_argument("--no-reuse", action="store_true", help="retrain even when a version directory exists")
    parser.add_argument("--eval-backend", default="faiss", choices=("faiss", "numpy", "torch"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both trainings (e.g. trainer.device=cuda)")
    args = parser.parse_args(argv)

    runs, out, overrides = args.runs, args.out, list(args.overrides)
    if args.smoke:
        runs, out = runs / "smoke", runs / "smoke" / "results"
        overrides += ["trainer.max_steps_per_epoch=2", "trainer.epochs=1"]
    old = train("cifar10_independent_old", runs=runs, overrides=overrides, reuse=not args.no_reuse)
    new = train(
        "cifar10_independent_new", runs=runs, overrides=overrides + [f"method.old_version={old['version_dir']}"],
        reuse=not args.no_reuse,
    )
    eval_overrides = [f"backend={args.eval_backend}"] + [o for o in overrides if o.startswith(("data", "paths"))]
    report = evaluate(new["version_dir"], old["version_dir"], runs / "reports" / "cifar10_independent", overrides=eval_overrides)
    payload = {
        "protocol": "shared CIFAR-10 (JPEG copy); old: classes 0-4, new: classes 0-9; query set = gallery set = "
        "the 10-class test split, leave-one-out; cosine after truncation to the smaller dimension",
        "command": "python -m tools.run_cifar10_independent " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "training": {
            name: {"version_id": run["manifest"]["version_id"], "wall_s": run["wall_s"],
                   "epochs": run["manifest"]["training"]["epochs"],
                   "step_time_s": run["manifest"]["training"]["summary"].get("train/step_time_s")}
            for name, run in (("old", old), ("new", new))
        },
        "pairs": [{k: row[k] for k in ("query", "gallery", *METRICS, "route")} for row in report["pairs"]],
        "compatible": report["compatible"],
    }
    write_json(out / "cifar10_independent.json", payload)
    lines = [
        "# Independent old and new models on the shared CIFAR-10",
        "",
        f"Made by `{payload['command'].strip()}`. {payload['protocol']}. Values in %.",
        "",
        "| query/gallery | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for row in payload["pairs"]:
        lines.append(f"| {row['query']}/{row['gallery']} | " + " | ".join(pct(row[m]) for m in METRICS) + " |")
    lines += ["", "| model | epochs | wall time (min) | median step (s) |", "|---|---:|---:|---:|"]
    for name, t in payload["training"].items():
        wall = "—" if t["wall_s"] is None else f"{t['wall_s'] / 60:.1f}"
        step = "—" if t["step_time_s"] is None else f"{t['step_time_s']:.3f}"
        lines.append(f"| {name} (`{t['version_id']}`) | {t['epochs']} | {wall} | {step} |")
    m = payload["machine"]
    lines += ["", f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, CUDA device: {m['cuda'] or 'none'}.",
              "new/old without a compatibility method is expected near chance (10% top-1 for 10 classes)."]
    (out / "cifar10_independent.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
