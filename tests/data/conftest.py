"""Fixtures for the data tests: the shared CIFAR-10 tar archives (skipped when absent) and image trees."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatembed.data import ImageFolderTar


def shared_data_root() -> Path:
    """``$COMPATEMBED_DATA_ROOT`` or ``<repo>/../shared/data``."""
    env = os.environ.get("COMPATEMBED_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def cifar_tar_dir() -> Path:
    d = shared_data_root() / "cifar10-jpeg"
    if not (d / "train.tar").is_file() or not (d / "test.tar").is_file():
        pytest.skip(f"shared CIFAR-10 tar archives not found under {d}")
    return d


@pytest.fixture(scope="session")
def cifar_train_indexed(cifar_tar_dir: Path) -> tuple[ImageFolderTar, float]:
    start = time.perf_counter()
    ds = ImageFolderTar(cifar_tar_dir / "train.tar")
    return ds, time.perf_counter() - start


@pytest.fixture(scope="session")
def cifar_train(cifar_train_indexed: tuple[ImageFolderTar, float]) -> ImageFolderTar:
    return cifar_train_indexed[0]


@pytest.fixture(scope="session")
def cifar_test(cifar_tar_dir: Path) -> ImageFolderTar:
    return ImageFolderTar(cifar_tar_dir / "test.tar")


def _write_image_tree(root: Path, layout: dict[str, list[str]], seed: int = 0) -> dict[str, np.ndarray]:
    """Write random 8x6 RGB PNGs at ``root/<class>/<relative file>``; return the pixels by ``<class>/<file>``."""
    rng = np.random.default_rng(seed)
    pixels: dict[str, np.ndarray] = {}
    for cls, files in layout.items():
        for rel in files:
            path = root / cls / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
            pixels[f"{cls}/{rel}"] = arr
    return pixels


@pytest.fixture
def write_image_tree() -> Callable[..., dict[str, np.ndarray]]:
    """The tree writer: ``write_image_tree(root, {"cat": ["a.png", "sub/b.png"]}) -> {"cat/a.png": pixels}``."""
    return _write_image_tree
