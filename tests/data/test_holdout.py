"""The validation split carved out of the training split: seeded, per class, disjoint from training."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from compatembed.data import SyntheticImages, build_dataset
from compatembed.data.holdout import HoldoutSplit, holdout_mask
from compatembed.errors import ConfigError, DataError


def _data(per_class: int = 20) -> SyntheticImages:
    return SyntheticImages(num_classes=4, per_class=per_class, image_size=8)


def test_parts_partition_the_split_per_class_and_never_overlap() -> None:
    data = _data()
    train = HoldoutSplit(data, fraction=0.25, seed=3, part="train")
    val = HoldoutSplit(data, fraction=0.25, seed=3, part="val")
    assert not set(train.ids.tolist()) & set(val.ids.tolist())
    assert sorted(train.ids.tolist() + val.ids.tolist()) == data.ids.tolist()
    assert np.bincount(val.targets).tolist() == [5, 5, 5, 5] and np.bincount(train.targets).tolist() == [15] * 4
    for i in range(len(val)):  # items and labels are the base dataset's
        assert np.array_equal(np.asarray(val[i][0]), np.asarray(data[int(val.indices[i])][0]))
        assert val[i][1] == data.targets[val.indices[i]]


def test_draw_depends_on_the_seed_not_on_the_order() -> None:
    data = _data()
    a = holdout_mask(data.targets, data.ids, fraction=0.3, seed=0)
    assert np.array_equal(a, holdout_mask(data.targets, data.ids, fraction=0.3, seed=0))
    assert not np.array_equal(a, holdout_mask(data.targets, data.ids, fraction=0.3, seed=1))
    order = np.random.default_rng(0).permutation(len(data))
    shuffled = holdout_mask(data.targets[order], data.ids[order], fraction=0.3, seed=0)
    assert set(data.ids[order][shuffled].tolist()) == set(data.ids[a].tolist())


def test_every_class_keeps_a_training_item_and_bad_fractions_are_refused() -> None:
    data = _data(per_class=2)
    assert np.bincount(HoldoutSplit(data, fraction=0.9, part="train").targets).tolist() == [1, 1, 1, 1]
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="fraction"):
            HoldoutSplit(data, fraction=bad)
    with pytest.raises(DataError, match="part"):
        HoldoutSplit(data, fraction=0.5, part="test")


def _cfg(**validation) -> OmegaConf:
    return OmegaConf.create({
        "name": "synthetic", "num_classes": 4, "classes": "0-1", "eval_classes": None, "train_per_class": None,
        "pipeline": "auto", "validation": {"fraction": 0.0, "seed": 0, **validation},
        "train": {"_target_": "compatembed.data.SyntheticImages", "num_classes": 4, "per_class": 10, "image_size": 8},
        "test": {"_target_": "compatembed.data.SyntheticImages", "num_classes": 4, "per_class": 5, "image_size": 8,
                 "split": "test"},
    })


def test_build_dataset_val_split_holds_all_eval_classes_and_train_leaves_it_out() -> None:
    cfg = _cfg(fraction=0.2, seed=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert set(val.targets.tolist()) == {0, 1, 2, 3} and len(val) == 8  # evaluated like test: every class
    assert set(train.targets.tolist()) == {0, 1} and len(train) == 16  # the training classes, minus val
    assert not set(train.ids.tolist()) & set(val.ids.tolist())
    with pytest.raises(ConfigError, match="validation.fraction"):
        build_dataset(_cfg(), "val")
    assert len(build_dataset(_cfg(), "train")) == 20  # no validation: the whole training split
