"""``compatembed-demo``: the problem, end to end, on real CIFAR-10 in a few minutes on a CPU.

1. trains a small "old" model on classes 0-4 (the deployed model),
2. trains a "new" model independently on classes 0-9,
3. extracts embeddings of the 10-class test split with both and evaluates old/old, new/new and
   new/old — the new model cannot search the old gallery (new/old near chance): the reason
   backward-compatible training exists.

It uses the same Hydra configs as ``compatembed-train`` (``experiment=cifar10_independent_*``) on a
per-class subset of the training split, so the numbers are lower than the full experiments'.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from compatembed.cli import run_cli

_logger = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run(args: argparse.Namespace) -> Path:
    from compatembed.evaluate import evaluate, render_report_md
    from compatembed.train import train

    out = Path(args.out)
    common = [f"trainer.epochs={args.epochs}", f"trainer.device={args.device}", f"data.train_per_class={args.per_class}"]
    if args.data_root:
        common.append(f"paths.data_root={args.data_root}")
    started = time.perf_counter()
    print(f"[1/3] training the old model on classes 0-4 ({args.per_class} images per class, {args.epochs} epochs)")
    old = train(_compose("train", ["experiment=cifar10_independent_old", "version_id=demo_old", f"output_dir={out / 'old'}", *common]))
    print(f"[2/3] training the new model independently on classes 0-9 (parent: {old.name})")
    new = train(
        _compose("train", ["experiment=cifar10_independent_new", "version_id=demo_new", f"output_dir={out / 'new'}",
                           f"method.old_version={old}", *common])
    )
    print("[3/3] embedding the 10-class test split with both models and evaluating")
    eval_overrides = [f"query={new}", f"gallery={old}", f"out={out / 'report'}", f"device={args.device}"]
    if args.data_root:
        eval_overrides.append(f"paths.data_root={args.data_root}")
    report = evaluate(_compose("eval", eval_overrides))
    print()
    print(render_report_md(report))
    minutes = (time.perf_counter() - started) / 60
    print(f"Done in {minutes:.1f} min. Model versions: {old}, {new}. Report: {out / 'report' / 'report.md'}")
    print("new/old is near chance: the new model cannot search the old gallery without backfilling.")
    return out / "report" / "report.md"


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``compatembed-demo``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the model versions and the report go (default: runs/demo)")
    parser.add_argument("--data-root", default=None, help="folder holding cifar10-jpeg/{train,test}.tar (default: ../shared/data or $COMPATEMBED_DATA_ROOT)")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class (default: 500)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model (default: 4)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_cli(lambda: run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
