"""``compatembed-train``: train a model version with a method and write its version directory.

Examples:
    compatembed-train experiment=cifar10_independent_old
    compatembed-train data=cifar10 data.classes=0-4 model=cifar_resnet20 trainer.epochs=5 version_id=old
    compatembed-train experiment=cifar10_independent_new trainer.device=cuda logger=wandb
    torchrun --nproc_per_node 4 -m compatembed.train experiment=imagenet_bct_paper   # DDP, one process per GPU

The work is :func:`compatembed.training.run.train_and_validate` (tests call
:func:`compatembed.training.run.train` with a composed config); this module adds Hydra.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from compatembed.cli import CONF_DIR, run_cli
from compatembed.distributed import launched_rank, quiet_other_ranks
from compatembed.training.run import train_and_validate


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_other_ranks()  # under torchrun rank 0 alone logs to the run's log file
    out, metric = run_cli(lambda: train_and_validate(cfg))
    if launched_rank()[0] != 0:
        return None
    print(f"model version written to {out}")
    if metric is not None:
        print(f"validation {cfg.validation.metric}: {100 * metric:.2f}% (written to {out / 'validation' / 'report.md'})")
    return metric  # what a Hydra sweeper optimises


def main() -> None:
    """Console entry point (``compatembed-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
