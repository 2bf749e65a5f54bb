"""``compatembed-extract``: embed a dataset split with a model version.

Example:
    compatembed-extract version=runs/cifar10_independent_new split=test out=emb/new-test
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from compatembed.cli import CONF_DIR, run_cli
from compatembed.embeddings import extract_split
from compatembed.hardware import resolve_num_workers

_logger = logging.getLogger(__name__)


def extract(cfg: DictConfig) -> Path:
    """Embed ``cfg.split`` with ``cfg.version`` and write the result to ``cfg.out``."""
    result = extract_split(
        cfg.version,
        cfg.data,
        str(cfg.split),
        device=str(cfg.device),
        batch_size=int(cfg.batch_size),
        num_workers=resolve_num_workers(cfg.num_workers),
        progress=bool(cfg.progress),
        prefix_cache=bool(cfg.prefix_cache),
    )
    out = result.save(cfg.out)
    _logger.info("wrote %d embeddings of dim %d to %s", len(result), result.embeddings.shape[1], out)
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="extract")
def _hydra_main(cfg: DictConfig) -> None:
    out = run_cli(lambda: extract(cfg))
    print(f"embeddings written to {out}")


def main() -> None:
    """Console entry point (``compatembed-extract``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
