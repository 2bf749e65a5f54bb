"""``compatembed-eval``: compare a query (new) model version with a gallery (old) model version.

Reports old/old, new/new and new/old on one labelled split, cross-version vectors following the
compatibility routes training wrote (:mod:`compatembed.eval.pair_report` does the work).

Example:
    compatembed-eval query=runs/cifar10_independent_new gallery=runs/cifar10_independent_old out=reports/indep
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from compatembed.cli import CONF_DIR, run_cli
from compatembed.eval.pair_report import evaluate, render_report_md


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    report = run_cli(lambda: evaluate(cfg))
    print(render_report_md(report))
    print(f"report written to {Path(cfg.out) / 'report.md'}")


def main() -> None:
    """Console entry point (``compatembed-eval``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
