"""SyntheticImages: determinism, shapes, splits, and class structure a trivial classifier finds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatembed.data import Preprocessing, SyntheticImages, build_transform
from compatembed.errors import DataError


def _pixels(ds: SyntheticImages) -> np.ndarray:
    return np.stack([np.asarray(ds[i][0], dtype=np.float64).ravel() for i in range(len(ds))])  # (N, S*S*3)


def test_shapes_and_labels() -> None:
    ds = SyntheticImages(num_classes=12, per_class=3, image_size=16)
    assert len(ds) == 36 and ds.data.shape == (36, 16, 16, 3) and ds.data.dtype == np.uint8
    assert ds.classes == [f"class{c:02d}" for c in range(12)] and ds.classes == sorted(ds.classes)
    assert ds.targets.dtype == np.int64 and ds.targets.tolist() == [c for c in range(12) for _ in range(3)]
    assert ds.ids.dtype == np.int64 and np.array_equal(ds.ids, np.arange(36))
    img, label = ds[7]
    assert img.mode == "RGB" and img.size == (16, 16) and label == 2


def test_deterministic() -> None:
    a, b = SyntheticImages(seed=3), SyntheticImages(seed=3)
    assert np.array_equal(a.data, b.data)
    assert not np.array_equal(a.data, SyntheticImages(seed=4).data)
    test = SyntheticImages(seed=3, split="test")
    assert not np.array_equal(a.data, test.data)
    assert np.array_equal(test.data, SyntheticImages(seed=3, split="test").data)


def test_images_vary_within_a_class() -> None:
    ds = SyntheticImages(per_class=5)
    first_class = ds.data[:5].reshape(5, -1).astype(int)
    assert all(np.abs(first_class[0] - first_class[j]).mean() > 5 for j in range(1, 5))


@pytest.mark.parametrize("seed", [0, 1])
def test_class_structure_shared_between_splits(seed: int) -> None:
    # Nearest class mean on raw pixels: means from train, accuracy on test (chance 10%).
    train = SyntheticImages(per_class=20, seed=seed)
    test = SyntheticImages(per_class=20, seed=seed, split="test")
    x_tr, x_te = _pixels(train), _pixels(test)
    means = np.stack([x_tr[train.targets == c].mean(axis=0) for c in range(10)])
    dist = ((x_te[:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = (dist.argmin(axis=1) == test.targets).mean()
    assert accuracy > 0.6
    # Against a different structure seed the same means are useless: the structure is the seed's.
    other = SyntheticImages(per_class=20, seed=seed + 10, split="test")
    dist_other = ((_pixels(other)[:, None, :] - means[None]) ** 2).sum(axis=-1)
    assert (dist_other.argmin(axis=1) == other.targets).mean() < accuracy - 0.3


def test_transform_applies() -> None:
    pre = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    ds = SyntheticImages(per_class=2, transform=build_transform(pre, train=False))
    x, y = ds[3]
    expected = (torch.from_numpy(ds.data[3]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert y == 1 and torch.allclose(x, expected, atol=1e-6)


def test_errors() -> None:
    with pytest.raises(DataError, match="unknown synthetic split 'val'"):
        SyntheticImages(split="val")
    with pytest.raises(DataError, match="num_classes >= 1"):
        SyntheticImages(num_classes=0)
    with pytest.raises(DataError, match="image_size >= 4"):
        SyntheticImages(image_size=2)
