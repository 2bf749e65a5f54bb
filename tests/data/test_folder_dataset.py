"""ImageFolderDir: order and labels against torchvision's ImageFolder, pixels, skipped files, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from compatembed.data import ImageFolderDir, Preprocessing, build_transform
from compatembed.errors import DataError

LAYOUT = {
    "zebra": ["b.png", "z.png", "nested/c.png", "nested/a.png", "nested-2/a.png", "nested/deeper/a.png"],
    "ant": ["10.png", "2.png", "1.png"],
    "moth": ["only.bmp"],
}


def test_order_and_labels_match_torchvision(tmp_path: Path, write_image_tree: Callable) -> None:
    pixels = write_image_tree(tmp_path, LAYOUT)
    ds, ref = ImageFolderDir(tmp_path), ImageFolder(str(tmp_path))
    assert ds.classes == ref.classes == ["ant", "moth", "zebra"]
    assert ds.samples == ref.samples
    assert ds.targets.tolist() == ref.targets
    assert ds.targets.dtype == np.int64 and np.array_equal(ds.ids, np.arange(len(ref)))
    for i, (path, label) in enumerate(ds.samples):
        img, y = ds[i]
        assert y == label and img.mode == "RGB"
        rel = Path(path).relative_to(tmp_path).as_posix()
        assert np.array_equal(np.asarray(img), pixels[rel])


def test_deterministic_across_instances(tmp_path: Path, write_image_tree: Callable) -> None:
    write_image_tree(tmp_path, LAYOUT)
    a, b = ImageFolderDir(tmp_path), ImageFolderDir(str(tmp_path))
    assert a.samples == b.samples and np.array_equal(a.targets, b.targets)


def test_skips_non_images_and_hidden_entries(tmp_path: Path, write_image_tree: Callable) -> None:
    write_image_tree(tmp_path, {"cat": ["a.png", ".hidden.png"], ".git": ["x.png"], "dog": [".cache/y.png", "b.PNG"]})
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "stray.png").write_bytes(b"")
    ds = ImageFolderDir(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p, _ in ds.samples] == ["cat/a.png", "dog/b.PNG"]


def test_transform_is_settable(tmp_path: Path, write_image_tree: Callable) -> None:
    write_image_tree(tmp_path, {"cat": ["a.png"]})
    ds = ImageFolderDir(tmp_path)
    pre = Preprocessing(input_size=(3, 8, 6), mean=(0.0,) * 3, std=(1.0,) * 3)
    ds.transform = build_transform(pre, train=False)
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 8, 6) and y == 0


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset path not found or not a directory: .*nowhere"):
        ImageFolderDir(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no class directories"):
        ImageFolderDir(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files under"):
        ImageFolderDir(tmp_path)
