"""``compatembed-report``: the offline evaluation that decides whether a new model version may be deployed.

Over T model versions (oldest first) on one labelled split it writes, to ``out``:

* the compatibility matrix ``C[t][j] = M(φ_t, φ_j)``, j ≤ t, for every metric (the eval CLI's function and
  routes), the empirical criterion per pair, AC, AM and the update gain per upgrade step;
* the mixed-version gallery and the backfill curves, measured through the index service's own search;
* ``report.md``, ``report.json``, ``matrix.csv``, ``backfill.csv`` and PNG plots; with ``logger=wandb`` a copy
  goes to wandb (offline by default);
* with ``gate.enabled=true`` the deployment verdict: exit status 3 (``gate.exit_code``) when the candidate
  fails the criterion against the deployed version, so a pipeline can refuse to move an alias.

The report is :func:`compatembed.eval.report.build_report`; this module is its command line.

Examples:
    compatembed-report 'versions=[runs/v1,runs/v2,runs/v3]' out=reports/chain
    compatembed-report 'versions=[runs/v1,runs/v2]' gate.enabled=true gate.metric=top1
    compatembed-gate 'versions=[runs/deployed,runs/candidate]'      # the matrix and the gate only
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from compatembed.cli import CONF_DIR, run_cli
from compatembed.eval.report import build_report


def finish(cfg: DictConfig, report: dict[str, Any]) -> int:
    """Print the closing lines; the process exit status (the gate's code when the candidate fails)."""
    out = Path(str(cfg.out))
    for metric in report["metrics"]:
        s = report["summary"][metric]
        ac = "n/a" if s["AC"] is None else f"{100 * s['AC']:.0f}%"
        print(f"{metric}: AC {ac}, AM {100 * s['AM']:.1f}%")
    print(f"report written to {out / 'report.md'}")
    g = report.get("gate")
    if g is None:
        return 0
    if g["passed"]:
        print(f"gate: PASS: {g['reason']}")
        return 0
    print(f"gate: FAIL: {g['reason']}", file=sys.stderr)
    return int(cfg.gate.exit_code)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def _hydra_main(cfg: DictConfig) -> None:
    report = run_cli(lambda: build_report(cfg))
    code = finish(cfg, report)
    if code:
        raise SystemExit(code)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def _hydra_gate(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.gate.enabled = True
        cfg.mixed.enabled = False
        cfg.backfill.enabled = False
    report = run_cli(lambda: build_report(cfg))
    code = finish(cfg, report)
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console entry point (``compatembed-report``)."""
    _hydra_main()


def gate_main() -> None:
    """Console entry point (``compatembed-gate``): the matrix and the deployment gate, no mixed gallery or backfill."""
    _hydra_gate()


if __name__ == "__main__":
    main()
