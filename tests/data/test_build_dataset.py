"""build_dataset on dict configs and on the conf/data/*.yaml files; its error messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from compatembed.data import AUGMENTATIONS, ClassSubset, ImageFolderDir, ImageFolderTar, SyntheticImages, build_dataset
from compatembed.data.array_cache import ArrayImages
from compatembed.data.build import PIPELINES
from compatembed.errors import ConfigError, DataError

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


def _synthetic_cfg(**top: object) -> dict:
    node = {"_target_": "compatembed.data.SyntheticImages", "num_classes": 6, "per_class": 3, "image_size": 8}
    return {
        "name": "synthetic",
        "num_classes": 6,
        "classes": None,
        "eval_classes": None,
        "train": {**node, "split": "train"},
        "test": {**node, "split": "test"},
        **top,
    }


def _with_root(data_yaml: str, data_root: Path | str, **overrides: object) -> OmegaConf:
    """Compose like train.yaml does: ``paths.data_root`` plus the group file under ``data``."""
    cfg = OmegaConf.create({"paths": {"data_root": str(data_root)}, "data": OmegaConf.load(CONF_DATA / data_yaml)})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value)
    return cfg


def test_dict_config_with_class_selection() -> None:
    train = build_dataset(_synthetic_cfg(classes="0-2", eval_classes=[4, 5]), "train")
    test = build_dataset(_synthetic_cfg(classes="0-2", eval_classes=[4, 5]), "test")
    assert isinstance(train, ClassSubset) and train.selected_classes == [0, 1, 2]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and train.ids.tolist() == list(range(9))
    assert isinstance(test, ClassSubset) and test.targets.tolist() == [4] * 3 + [5] * 3
    assert test.ids.tolist() == list(range(12, 18)) and test.dataset.split == "test"


def test_no_selection_returns_the_dataset_itself() -> None:
    transform = np.asarray
    ds = build_dataset(_synthetic_cfg(classes="all"), "train", transform=transform)
    assert isinstance(ds, SyntheticImages) and len(ds) == 18 and ds.transform is transform
    assert isinstance(ds[0][0], np.ndarray)


def test_unknown_split() -> None:
    with pytest.raises(ConfigError, match="unknown data split 'valid'; known: train, val, test"):
        build_dataset(_synthetic_cfg(), "valid")


def test_missing_path_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train.tar"
    cfg = {"train": {"_target_": "compatembed.data.ImageFolderTar", "path": str(missing)}}
    with pytest.raises(DataError) as info:
        build_dataset(cfg, "train")
    assert str(info.value) == (f"dataset path not found: {missing} (set data.train.path=... or COMPATEMBED_DATA_ROOT)")


def test_missing_path_from_yaml_names_the_key(tmp_path: Path) -> None:
    cfg = _with_root("cifar10.yaml", tmp_path)
    with pytest.raises(DataError, match=r"dataset path not found: .*cifar10-jpeg/test.tar \(set data.test.path="):
        build_dataset(cfg.data, "test")
    cfg = _with_root("cifar100.yaml", tmp_path)
    with pytest.raises(DataError, match=r"dataset path not found: .*cifar100 \(set data.train.root="):
        build_dataset(cfg.data, "train")


def test_mandatory_and_unknown_keys(tmp_path: Path) -> None:
    cfg = _with_root("imagefolder.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"missing mandatory value data.train.root \(set data.train.root=...\)"):
        build_dataset(cfg.data, "train")
    typo = _synthetic_cfg()
    typo["train"]["per_clas"] = 3
    with pytest.raises(ConfigError, match=r"cannot build data.train .*per_clas"):
        build_dataset(typo, "train")
    bad_target = _synthetic_cfg()
    bad_target["test"]["_target_"] = "compatembed.data.NoSuchDataset"
    with pytest.raises(ConfigError, match=r"cannot build data.test \(compatembed.data.NoSuchDataset\)"):
        build_dataset(bad_target, "test")
    with pytest.raises(ConfigError, match="data config has no 'test' dataset"):
        build_dataset({"train": _synthetic_cfg()["train"]}, "test")


def test_errors_of_the_dataset_surface_unwrapped() -> None:
    cfg = _synthetic_cfg()
    cfg["train"]["split"] = "validation"
    with pytest.raises(DataError, match="unknown synthetic split 'validation'"):
        build_dataset(cfg, "train")
    with pytest.raises(DataError, match=r"class id 6 out of range"):
        build_dataset(_synthetic_cfg(classes=[6]), "train")
    with pytest.raises(DataError, match=r"data.num_classes=10 but data.train has 6 classes"):
        build_dataset(_synthetic_cfg(num_classes=10), "train")


def test_synthetic_yaml() -> None:
    cfg = _with_root("synthetic.yaml", "unused", classes="0-4")
    train, test = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    assert isinstance(train, ClassSubset) and len(train) == 5 * 20 and set(train.targets.tolist()) == set(range(5))
    # generated pixels live in memory: served as an array without a copy
    assert isinstance(test, ArrayImages) and len(test) == 10 * 10 and "split='test'" in test.source


def test_imagefolder_yaml(tmp_path: Path, write_image_tree: Callable) -> None:
    write_image_tree(tmp_path / "train", {"cat": ["a.png", "b.png"], "dog": ["c.png"]})
    write_image_tree(tmp_path / "test", {"cat": ["d.png"], "dog": ["e.png"]})
    cfg = _with_root(
        "imagefolder.yaml",
        "unused",
        num_classes=2,
        eval_classes=["dog"],
        **{"train.root": str(tmp_path / "train"), "test.root": str(tmp_path / "test")},
    )
    train, test = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    assert isinstance(train, ImageFolderDir) and train.targets.tolist() == [0, 0, 1]
    assert isinstance(test, ClassSubset) and test.targets.tolist() == [1] and test.ids.tolist() == [1]


def test_cifar10_yaml_on_shared_data(cifar_tar_dir: Path) -> None:
    cfg = _with_root("cifar10.yaml", cifar_tar_dir.parent, classes=[0, 1, 2, 3, 4])
    train = build_dataset(cfg.data, "train")
    assert isinstance(train, ClassSubset) and isinstance(train.dataset, ImageFolderTar)
    assert len(train) == 25_000 and train.targets.max() == 4 and len(train.classes) == 10
    test = build_dataset(cfg.data, "test")
    assert isinstance(test, ImageFolderTar) and len(test) == 10_000
    assert cfg.data.loader.batch_size == 128


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder", "synthetic"])
def test_group_files_compose_with_hydra(name: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DATA.parent), version_base="1.3"):
        cfg = compose(overrides=[f"+data={name}", "+paths.data_root=/data"])
    data = cfg.data
    assert set(data) == {"name", "num_classes", "classes", "eval_classes", "train_per_class", "augment", "pipeline",
                         "array_cache_max_gb", "cache_dir", "validation", "train", "test", "loader"}
    assert data.augment in AUGMENTATIONS and data.pipeline in PIPELINES
    assert data.name == name and data.classes is None and data.eval_classes is None
    assert set(data.loader) == {"batch_size", "eval_batch_size", "num_workers"}
    for split in ("train", "test"):
        assert data[split]._target_.startswith("compatembed.data.")
    if name == "cifar10":
        assert data.train.path == "/data/cifar10-jpeg/train.tar" and data.test.path == "/data/cifar10-jpeg/test.tar"
    if name == "cifar100":
        assert data.train.root == "/data/cifar100" and data.train.download is False and data.test.train is False
