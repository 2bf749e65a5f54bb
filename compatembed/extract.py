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
from compatembed.data import Preprocessing, build_dataset, build_transform
from compatembed.embeddings import EmbeddingSet, embed_dataset
from compatembed.hardware import resolve_num_workers
from compatembed.models.version import load_model_version
from compatembed.training import resolve_device

_logger = logging.getLogger(__name__)


def extract_split(
    version_dir: str | Path,
    data_cfg: DictConfig,
    split: str,
    *,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> EmbeddingSet:
    """Embed ``split`` of ``data_cfg`` with the model version in ``version_dir`` (its own preprocessing)."""
    loaded = load_model_version(version_dir)
    torch_device = resolve_device(device)
    preprocessing = Preprocessing.from_dict(loaded.manifest["preprocessing"])
    dataset = build_dataset(data_cfg, split, transform=build_transform(preprocessing, train=False))
    result = embed_dataset(
        loaded.model.to(torch_device),
        dataset,
        batch_size=batch_size,
        device=torch_device,
        num_workers=num_workers,
        desc=f"embed {loaded.version_id}/{split}",
        progress=progress,
    )
    result.meta = {
        "version_id": loaded.version_id,
        "version_dir": str(Path(version_dir).resolve()),
        "weights_sha256": loaded.manifest["files"]["model.safetensors"],
        "dataset": str(data_cfg.name),
        "split": split,
        "normalized": bool(loaded.manifest["embedding"]["normalized"]),
    }
    return result


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
