"""TorchvisionCIFAR on a small copy in torchvision's batch format written here (integrity check stubbed)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar

from compatembed.data import TorchvisionCIFAR
from compatembed.errors import DataError


def _write_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py with random images; return the expected HWC arrays and labels per split."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        flat = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)  # CHW-flattened rows
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels}, f)
        split = "test" if name == "test_batch" else "train"
        out[f"{split}_x"].append(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        out[f"{split}_y"] += labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"name{i}" for i in range(10)]}, f)
    return {k: np.concatenate(v) if k.endswith("_x") else np.asarray(v) for k, v in out.items()}


def test_reads_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _write_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # our files have other md5s
    for train, key in ((True, "train"), (False, "test")):
        ds = TorchvisionCIFAR(tmp_path, name="cifar10", train=train)
        assert len(ds) == len(expected[f"{key}_y"]) == (20 if train else 4)
        assert ds.classes == [f"name{i}" for i in range(10)]
        assert ds.targets.dtype == np.int64 and ds.targets.tolist() == expected[f"{key}_y"].tolist()
        assert np.array_equal(ds.ids, np.arange(len(ds)))
        for i in (0, len(ds) - 1):
            img, label = ds[i]
            assert img.mode == "RGB" and img.size == (32, 32) and label == expected[f"{key}_y"][i]
            assert np.array_equal(np.asarray(img), expected[f"{key}_x"][i])
        ds.transform = np.asarray
        assert isinstance(ds[0][0], np.ndarray)


def test_missing_data_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar100 not found or corrupt under .*pass download=true or a root holding"):
        TorchvisionCIFAR(tmp_path, name="cifar100", train=True)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown CIFAR dataset 'cifar11'"):
        TorchvisionCIFAR(tmp_path, name="cifar11", train=True)
