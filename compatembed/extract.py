"""``compatembed-extract``: embed a dataset split with a model version.

Examples:
    compatembed-extract version=runs/cifar10_independent_new split=test out=emb/new-test
    compatembed-extract version=runs/v2 split=train out=emb/v2 shard=0 num_shards=4   # part 0 of 4 → emb/v2/shard-0-of-4
    torchrun --nproc_per_node 4 -m compatembed.extract version=runs/v2 split=train out=emb/v2   # one part per rank

Reading ``out`` (``EmbeddingSet.load``, ``compatembed-index add --embeddings``) merges the parts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from compatembed.cli import CONF_DIR, run_cli
from compatembed.distributed import launched_rank
from compatembed.embeddings import extract_split
from compatembed.errors import ConfigError
from compatembed.hardware import resolve_num_workers

_logger = logging.getLogger(__name__)


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int] | None:
    """``(i, n)`` of the part to embed, or None for the whole split.

    Unset, both come from torchrun's ``RANK`` and ``WORLD_SIZE`` when it started this process (one
    part per rank); one part of one is the whole split.

    Raises:
        ConfigError: only one of the two is set, or they are not ``0 <= shard < num_shards``.
    """
    if shard is None and num_shards is None:
        rank, _, world = launched_rank()
        shard, num_shards = rank, world
    elif shard is None or num_shards is None:
        raise ConfigError(f"set both shard and num_shards (got shard={shard}, num_shards={num_shards})")
    if int(num_shards) < 1 or not 0 <= int(shard) < int(num_shards):
        raise ConfigError(f"shard={shard} num_shards={num_shards}: need 0 <= shard < num_shards")
    return None if int(num_shards) == 1 else (int(shard), int(num_shards))


def extract(cfg: DictConfig) -> Path:
    """Embed ``cfg.split`` with ``cfg.version`` and write the result to ``cfg.out``.

    With ``shard``/``num_shards`` (or under torchrun), only that part, to ``<out>/shard-i-of-n``.
    """
    result = extract_split(
        cfg.version,
        cfg.data,
        str(cfg.split),
        device=str(cfg.device),
        batch_size=int(cfg.batch_size),
        num_workers=resolve_num_workers(cfg.num_workers),
        progress=bool(cfg.progress),
        shard=resolve_shard(cfg.shard, cfg.num_shards),
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
