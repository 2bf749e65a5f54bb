"""An ImageFolder directory (``root/<class>/<file>``) read in a deterministic order."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from compatembed.data._common import Transform, as_int64, is_image_name, open_rgb
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)


class ImageFolderDir(Dataset):
    """Images in ``root/<class>/...``: classes are the sorted sub-directory names, files sorted within each.

    The order (class by class; within a class, directory by directory, files sorted) is fixed by the
    directory contents alone and equals torchvision's ``ImageFolder``, so item ids stay the same
    across machines and runs. Files in nested folders below a class directory belong to that class;
    non-image files and hidden files or folders are skipped.

    Args:
        root: The directory holding one sub-directory per class.
        transform: Applied to each PIL RGB image; ``None`` returns the image itself.

    Attributes:
        samples: ``(path, label)`` per item, in item order.
        targets: Labels, int64 ``(N,)``.
        ids: Item ids, int64 ``(N,)`` (``arange(N)``).
        classes: Class names; ``classes[label]`` names a label.

    Raises:
        DataError: ``root`` is not a directory, has no class directories, or holds no image.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Transform | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset path not found or not a directory: {self.root}")
        self.root = Path(os.path.abspath(self.root))  # sample paths stay valid after a chdir
        self.classes: list[str] = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"no class directories in {self.root} (expected root/<class>/<image>)")
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            # Directory by directory (sorted by path string), files sorted within each: the order
            # torchvision's ImageFolder uses, so item ids agree with it.
            walk = []
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                walk.append((dirpath, sorted(f for f in filenames if is_image_name(f))))
            samples += [(os.path.join(d, f), label) for d, files in sorted(walk) for f in files]
        if not samples:
            raise DataError(f"no image files under {self.root}")
        self.samples = samples
        self.targets: np.ndarray = as_int64([label for _, label in samples])
        self.ids: np.ndarray = np.arange(len(samples), dtype=np.int64)
        self.transform = transform
        _logger.debug("ImageFolderDir %s: %d images, %d classes", self.root, len(samples), len(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = open_rgb(path)
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"ImageFolderDir(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"
