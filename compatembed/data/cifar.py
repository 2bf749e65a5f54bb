"""CIFAR-10/100 in torchvision's pickled-batch format, for users who have it or may download it."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from compatembed.data._common import Transform, as_int64, pixel_item
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)

_NAMES = ("cifar10", "cifar100")


class TorchvisionCIFAR(Dataset):
    """torchvision's ``CIFAR10``/``CIFAR100`` with this package's dataset interface.

    torchvision owns reading (and, when allowed, downloading) the batches; this wrapper adds
    ``ids`` and a settable ``transform`` and turns torchvision's ``RuntimeError`` for a missing or
    corrupt copy into a :class:`DataError` that says how to fix it.

    Args:
        root: Directory holding (or receiving) ``cifar-10-batches-py``/``cifar-100-python``.
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        train: The 50k training split instead of the 10k test split.
        transform: Applied to each PIL RGB image; ``None`` returns the image itself.
        download: Let torchvision download the archive into ``root`` when it is missing.

    Attributes:
        targets: Labels, int64 ``(N,)``.
        ids: Item ids, int64 ``(N,)`` (``arange(N)``, the order of the original batches).
        classes: Class names in label order.

    Raises:
        DataError: ``name`` is unknown, the data is missing or corrupt, or the download failed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        name: str = "cifar10",
        train: bool,
        transform: Transform | None = None,
        download: bool = False,
    ) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        if name not in _NAMES:
            raise DataError(f"unknown CIFAR dataset {name!r}; known: {', '.join(_NAMES)}")
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        self.root = os.fspath(root)
        self.name = name
        self.train = train
        try:
            base = cls(self.root, train=train, download=download)
        except RuntimeError as e:
            raise DataError(
                f"{name} not found or corrupt under {self.root} ({e}); pass download=true or a root holding "
                f"the data ({cls.base_folder}/)"
            ) from None
        except OSError as e:  # a failed download (no network) surfaces as URLError/OSError
            raise DataError(f"{name} download into {self.root} failed: {e}") from None
        self.data: np.ndarray = np.ascontiguousarray(base.data)  # (N, 32, 32, 3) uint8
        self.targets: np.ndarray = as_int64(base.targets)
        self.ids: np.ndarray = np.arange(len(self.targets), dtype=np.int64)
        self.classes: list[str] = list(base.classes)
        self.transform = transform
        _logger.debug("%s %s: %d images", name, "train" if train else "test", len(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return pixel_item(self.data, self.targets, index, self.transform)

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"TorchvisionCIFAR(root={self.root!r}, name={self.name!r}, split={split}, n={len(self)})"
