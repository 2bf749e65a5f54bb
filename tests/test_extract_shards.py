"""``compatembed-extract shard=i num_shards=n``: parts of whole batches that merge into the unsharded set, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from compatembed.cli import compose_config
from compatembed.embeddings import EmbeddingSet, load_or_extract
from compatembed.errors import ConfigError, EvalError
from compatembed.extract import extract, resolve_shard
from compatembed.models.version import save_model_version


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained CIFAR ResNet-20 with an 8-d embedding, written as a version (nothing is trained)."""
    cfg = compose_config("train", ["model=cifar_resnet20", "model.embed_dim=8"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    return save_model_version(tmp_path_factory.mktemp("versions") / "v", version_id="v", model=model,
                              model_config=OmegaConf.to_container(cfg.model, resolve=True), embed_dim=8, normalized=True,
                              preprocessing=model.preprocessing.to_dict(), training={})


def _extract(version: Path, out: Path, *extra: str) -> Path:
    return extract(compose_config("extract", ["data=synthetic", f"version={version}", f"out={out}", "progress=false",
                                              "device=cpu", "batch_size=16", f"paths.cache_dir={out.parent / 'cache'}",
                                              *extra]))


@pytest.mark.parametrize("pipeline", ["array", "stream"])
def test_two_parts_merge_into_the_unsharded_set_bit_for_bit(version: Path, tmp_path: Path, pipeline: str) -> None:
    whole = EmbeddingSet.load(_extract(version, tmp_path / "whole", f"data.pipeline={pipeline}"))
    written = [_extract(version, tmp_path / "parts", f"data.pipeline={pipeline}", f"shard={i}", "num_shards=2") for i in (0, 1)]
    assert [p.name for p in written] == ["shard-0-of-2", "shard-1-of-2"]
    parts = [json.loads((p / "meta.json").read_text()) for p in written]
    # 100 test items in 7 batches of 16: 4 batches, then 3
    assert [(m["start"], m["stop"], m["total"]) for m in parts] == [(0, 64, 100), (64, 100, 100)]
    merged = EmbeddingSet.load(tmp_path / "parts")
    assert merged.embeddings.tobytes() == whole.embeddings.tobytes()
    assert np.array_equal(merged.ids, whole.ids) and np.array_equal(merged.labels, whole.labels)
    assert merged.meta == {**whole.meta, "shards": 2}
    assert load_or_extract(tmp_path / "parts", compose_config("extract", ["data=synthetic", "version=x"]).data,
                           "test").embeddings.tobytes() == whole.embeddings.tobytes()


def test_a_missing_part_names_the_items_it_should_hold(version: Path, tmp_path: Path) -> None:
    for i in range(3):
        _extract(version, tmp_path / "parts", f"shard={i}", "num_shards=3")
    shutil.rmtree(tmp_path / "parts" / "shard-2-of-3")
    with pytest.raises(EvalError, match=r"missing shard\(s\) shard-2-of-3 of 3: items 80-99 of 100"):
        EmbeddingSet.load(tmp_path / "parts")


def test_the_part_comes_from_torchrun_when_not_given(version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_shard(None, None) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard(None, None) == (1, 2)
    assert resolve_shard(0, 1) is None  # set explicitly: wins over the environment
    assert _extract(version, tmp_path / "out").name == "shard-1-of-2"


def test_bad_shard_settings_are_clear_errors(version: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set both shard and num_shards"):
        resolve_shard(1, None)
    with pytest.raises(ConfigError, match="need 0 <= shard < num_shards"):
        resolve_shard(2, 2)
    with pytest.raises(ConfigError, match=r"num_shards=8 but the split has only 7 batches of 16 .*: use at most 7 parts"):
        _extract(version, tmp_path / "out", "shard=0", "num_shards=8")
