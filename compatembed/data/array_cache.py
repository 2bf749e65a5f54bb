"""Small-image datasets decoded once into a uint8 array, so training never decodes a JPEG twice.

CIFAR-sized data (tens of thousands of images of a few KB) costs more to decode and transform one PIL
image at a time than to train on, and worker processes that would hide that cost compete with
training for the same few cores. This module decodes such a dataset once into an ``(N, H, W, 3)``
uint8 array: a memory-mapped file under the cache directory, keyed by the source's fingerprint
(path, size and modification time of every file it reads), built with a progress bar, and rebuilt
when the source changes. Datasets that already hold their pixels in memory (torchvision CIFAR,
generated data) are used as they are.

:class:`ArrayImages` is the resulting dataset; it behaves like any other (``(image, label)`` items,
``targets``, ``ids``, ``classes``, a settable ``transform``), so the per-image path still works, and
:mod:`compatembed.data.batch_loader` draws whole augmented batches from its array.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from compatembed.data._common import LabeledImageDataset, Transform, pixel_item
from compatembed.data.folder import ImageFolderDir
from compatembed.data.tar import ImageFolderTar
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the cache layout changes, so old caches are rebuilt instead of misread."""


class ArrayImages(Dataset):
    """A dataset whose decoded RGB pixels are one ``(N, H, W, 3)`` uint8 array.

    Item ``i`` is the same image the source dataset gives for ``i`` (pixel for pixel), with the
    same label and id. ``transform`` is applied to a PIL image built from the array, exactly as
    for the source; batch consumers read :attr:`pixels` directly.

    Args:
        pixels: ``(N, H, W, 3)`` uint8 array (a memory map or an in-memory array).
        targets: ``(N,)`` labels.
        ids: ``(N,)`` item ids.
        classes: Class names of the full dataset.
        transform: Applied to each PIL image by ``__getitem__``.
        source: A description of where the pixels came from (for ``repr`` and logs).
    """

    def __init__(
        self,
        pixels: np.ndarray,
        targets: np.ndarray,
        ids: np.ndarray,
        classes: list[str],
        transform: Transform | None = None,
        source: str = "",
    ) -> None:
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise DataError(f"decoded pixels must be a (N, H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
        if not len(pixels) == len(targets) == len(ids):
            raise DataError(f"pixels, targets and ids differ in length: {len(pixels)}, {len(targets)}, {len(ids)}")
        self.pixels = pixels
        self.targets = np.asarray(targets, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.source = source

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return pixel_item(self.pixels, self.targets, index, self.transform)

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"ArrayImages({self.source or 'in memory'}, n={len(self)}, {h}x{w})"


def array_view(dataset: Any) -> tuple[ArrayImages, np.ndarray] | None:
    """The decoded array behind ``dataset`` and the positions of its items in it, or ``None``.

    Sees through :class:`~compatembed.data.subset.ClassSubset` (and any wrapper with ``dataset``
    and ``indices`` attributes), so a class selection or a validation split keeps the fast path.
    """
    positions: np.ndarray | None = None
    while not isinstance(dataset, ArrayImages):
        inner, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
        if inner is None or indices is None:
            return None
        indices = np.asarray(indices, dtype=np.int64)
        positions = indices if positions is None else indices[positions]
        dataset = inner
    return dataset, (np.arange(len(dataset), dtype=np.int64) if positions is None else positions)


def source_fingerprint(dataset: LabeledImageDataset) -> dict[str, Any] | None:
    """What identifies the bytes a file-backed dataset reads, or ``None`` if it is not file-backed.

    A tar archive: its absolute path, size and modification time (one file). A folder: the path,
    size and modification time of every image it lists, hashed. A change to any of them (a file
    replaced, added, removed or touched) changes the fingerprint and so the cache key.
    """
    if isinstance(dataset, ImageFolderTar):
        st = dataset.path.stat()
        return {"kind": "tar", "path": str(dataset.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if isinstance(dataset, ImageFolderDir):
        digest = hashlib.sha256()
        for path, label in dataset.samples:
            st = os.stat(path)
            digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return {"kind": "folder", "path": str(dataset.root), "files": len(dataset.samples), "sha256": digest.hexdigest()}
    return None


def _in_memory_pixels(dataset: Any) -> np.ndarray | None:
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3:
        if len(data) == len(dataset):
            return data
    return None


def _name_of(dataset: Any, index: int) -> str:
    if isinstance(dataset, ImageFolderTar):
        return f"{dataset.path}:{dataset.members[index]}"
    if isinstance(dataset, ImageFolderDir):
        return str(dataset.samples[index][0])
    return f"item {index}"


def _decode_item(dataset: Any, index: int) -> np.ndarray:
    saved, dataset.transform = dataset.transform, None
    try:
        image, _ = dataset[index]
    finally:
        dataset.transform = saved
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _build(dataset: Any, directory: Path, fingerprint: dict[str, Any], progress: bool) -> None:
    """Decode every item of ``dataset`` into ``directory`` (written in a sibling temp dir, then renamed)."""
    first = _decode_item(dataset, 0)
    h, w, _ = first.shape
    n = len(dataset)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        pixels = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        started = time.perf_counter()
        for i in tqdm(range(n), desc=f"decoding {directory.name}", disable=not progress, leave=False, mininterval=1.0):
            image = first if i == 0 else _decode_item(dataset, i)
            if image.shape != first.shape:
                raise DataError(
                    f"{_name_of(dataset, i)} is {image.shape[1]}x{image.shape[0]} but the first image is {w}x{h}: "
                    "the array cache needs images of one size (set data.pipeline=stream for mixed sizes)"
                )
            pixels[i] = image
        pixels.flush()
        del pixels
        np.save(tmp / "targets.npy", np.asarray(dataset.targets, dtype=np.int64))
        np.save(tmp / "ids.npy", np.asarray(dataset.ids, dtype=np.int64))
        meta = {"format": FORMAT_VERSION, "count": n, "height": h, "width": w, "classes": list(dataset.classes),
                "source": fingerprint, "decode_s": round(time.perf_counter() - started, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if publish_cache_dir(tmp, directory, ("pixels.npy", "targets.npy", "ids.npy", "meta.json")):
            _logger.info("decoded %d images (%dx%d) into %s in %.1f s", n, w, h, directory, meta["decode_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path, dataset: Any) -> ArrayImages | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        pixels = np.load(directory / "pixels.npy", mmap_mode="r")
        targets = np.load(directory / "targets.npy", allow_pickle=False)
        ids = np.load(directory / "ids.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        _logger.warning("array cache %s is unreadable (%s); rebuilding it", directory, e)
        return None
    if (meta.get("format") != FORMAT_VERSION or len(pixels) != len(dataset)
            or not np.array_equal(targets, np.asarray(dataset.targets)) or not np.array_equal(ids, np.asarray(dataset.ids))):
        _logger.warning("array cache %s does not match its source; rebuilding it", directory)
        return None
    return ArrayImages(pixels, targets, ids, list(dataset.classes), transform=dataset.transform, source=str(directory))


def publish_cache_dir(tmp: Path, directory: Path, names: tuple[str, ...]) -> bool:
    """Fsync ``names`` in the finished ``tmp`` directory and rename it to ``directory`` (atomic: readers see no
    cache or a complete one). Returns False when another process published ``directory`` first (its
    ``meta.json`` is there): the caller then uses that one and drops ``tmp``."""
    for name in names:
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    try:
        os.rename(tmp, directory)
    except OSError:
        if not (directory / "meta.json").is_file():
            raise
        _logger.info("%s was built by another process meanwhile; using it", directory)
        return False
    return True


def decode_to_array(dataset: LabeledImageDataset, cache_dir: str | os.PathLike[str] | None, *,
                    progress: bool = True) -> ArrayImages | None:
    """The decoded-array version of ``dataset`` (a whole split, before any class selection).

    In-memory sources are wrapped without a copy. File-backed ones (tar archive, ImageFolder
    folder) are decoded once into ``<cache_dir>/arrays/<source>-<key>/`` and memory-mapped on every
    later call; the key changes when the source does, so an edited dataset is decoded again (the
    stale cache of the same source is removed). Several processes may build or read the same cache
    at once: each build writes a private temporary folder and renames it into place.

    Args:
        dataset: A dataset as :func:`~compatembed.data.build_dataset` instantiates it.
        cache_dir: Where decoded arrays live (``paths.cache_dir``); ``None`` only serves in-memory sources.
        progress: Show a progress bar while decoding.

    Returns:
        An :class:`ArrayImages` with the dataset's transform, or ``None`` when the dataset can be
        neither wrapped nor cached (the caller streams it instead).

    Raises:
        DataError: An image cannot be decoded (the message names its file) or images differ in size.
    """
    pixels = _in_memory_pixels(dataset)
    if pixels is not None:
        return ArrayImages(pixels, dataset.targets, dataset.ids, dataset.classes, dataset.transform, source=repr(dataset))
    fingerprint = source_fingerprint(dataset)
    if fingerprint is None or cache_dir is None or len(dataset) == 0:
        return None
    key = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **fingerprint}, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(fingerprint["path"]).name.replace(".", "_") or "data"
    root = Path(cache_dir) / "arrays"
    directory = root / f"{stem}-{key}"
    if (directory / "meta.json").is_file():
        loaded = _load(directory, dataset)
        if loaded is not None:
            return loaded
        shutil.rmtree(directory, ignore_errors=True)
    _build(dataset, directory, fingerprint, progress)
    for stale in root.glob(f"{stem}-*"):  # earlier versions of this source (open maps stay valid on POSIX)
        if stale != directory and stale.is_dir() and not stale.name.startswith("."):
            try:
                stale_source = json.loads((stale / "meta.json").read_text()).get("source", {})
            except (OSError, ValueError):
                continue
            if stale_source.get("path") == fingerprint["path"]:
                shutil.rmtree(stale, ignore_errors=True)
    loaded = _load(directory, dataset)
    if loaded is None:
        raise DataError(f"array cache {directory} is unreadable right after it was built")
    return loaded
