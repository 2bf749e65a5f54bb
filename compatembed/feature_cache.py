"""The frozen prefix's output for a dataset, computed once, stored memory-mapped, and served as training batches.

With :class:`~compatembed.models.frozen_prefix.FrozenPrefixBackbone` only the last stage(s) of a
pretrained backbone train, so the prefix output of an image is the same in every epoch, for every
method and every model that shares the prefix (the independent new model, BCT, OCA and BT² of one
upgrade). Running the prefix is most of the compute of a forward pass (about nine tenths for
EfficientNet-Lite2 split before its last stage); doing it once turns a CPU run of hours into minutes.

A cache is one folder ``<cache_dir>/prefix_features/<architecture>-<key>/`` holding ``features.npy``
(``(N, C, H', W')`` float16 or float32, opened memory-mapped), ``ids.npy``, ``targets.npy`` and
``meta.json``. The key hashes everything the cached values depend on:

- the architecture name and the split point (first trainable stage);
- a hash of the prefix's own parameters and buffers: the weights, whichever file they came from (a
  change confined to the trainable suffix leaves the cache valid, any change of the prefix does not);
- the preprocessing (input size, mean/std, interpolation, crop) of the un-augmented eval view;
- the data: item ids and labels, and the decoded pixels of the items (or, for streamed data, the
  size and modification time of every source file);
- the storage dtype, the torch version (kernel numerics) and this module's format version.

Any change gives another key, so a stale cache is never read; the cache it replaces (same
architecture, split point and data) is deleted. Caches are built in a private temporary folder and
renamed into place, so concurrent runs never see a partial one.

Training on cached features has no data augmentation: the cache holds each image's un-augmented
prefix output, exactly what the eval view gives. That is the price of the speed, and the run says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from compatembed.data.array_cache import array_view, publish_cache_dir, source_fingerprint
from compatembed.data.loaders import ArrayBatchLoader, batch_source
from compatembed.data.transforms import ImageTransform
from compatembed.errors import ConfigError, DataError
from compatembed.models.frozen_prefix import FrozenPrefixBackbone

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the layout or the key changes, so older caches are rebuilt instead of misread."""

SUBDIR = "prefix_features"
_HASH_CHUNK = 4096  # items whose pixels are hashed per read


@dataclass
class PrefixFeatures:
    """The cached prefix output of every item of a dataset, in item order.

    Attributes:
        features: ``(N, C, H', W')`` float16/float32, memory-mapped read-only.
        ids: ``(N,)`` item ids (as the dataset's ``ids``).
        targets: ``(N,)`` labels.
        directory: Where the cache lives.
        meta: The key's parts, the key, the shape and how long the build took.
    """

    features: np.ndarray
    ids: np.ndarray
    targets: np.ndarray
    directory: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _items(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(getattr(dataset, "ids", np.arange(len(dataset))), dtype=np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__} has no 'targets'; cached features need per-item labels")
    return ids, np.asarray(targets, dtype=np.int64)


def _innermost(dataset: Any) -> Any:
    while getattr(dataset, "dataset", None) is not None:
        dataset = dataset.dataset
    return dataset


def dataset_fingerprint(dataset: Dataset) -> dict[str, Any] | None:
    """What identifies a dataset's items and their images, or None when it cannot be told (then nothing is cached).

    Items served from a decoded array are identified by a hash of their pixels in item order (exact:
    any changed pixel changes it); streamed file-backed items by the source's file sizes and
    modification times (:func:`~compatembed.data.array_cache.source_fingerprint`). Both add a hash
    of the item ids and labels.

    Returns:
        A JSON-ready dict, or None for datasets that are neither (e.g. WebDataset shards, which
        cannot be read by position).
    """
    if isinstance(dataset, IterableDataset):
        return None
    ids, targets = _items(dataset)
    items = hashlib.sha256(ids.tobytes() + b"\0" + targets.tobytes()).hexdigest()
    view = array_view(dataset)
    if view is not None:
        array, positions = view
        digest = hashlib.sha256()
        for start in range(0, len(positions), _HASH_CHUNK):
            rows = positions[start : start + _HASH_CHUNK]
            digest.update(np.ascontiguousarray(array.pixels[rows]).tobytes())
        h, w = array.image_size
        return {"count": len(ids), "items": items, "pixels_sha256": digest.hexdigest(), "image_size": [h, w]}
    source = source_fingerprint(_innermost(dataset))
    if source is None:
        return None
    return {"count": len(ids), "items": items, "source": source}


def _check_eval_view(backbone: FrozenPrefixBackbone, dataset: Any) -> ImageTransform:
    """The dataset must yield the un-augmented inputs of the backbone's own preprocessing (what is cached)."""
    transform = getattr(dataset, "transform", None)
    if not isinstance(transform, ImageTransform) or transform.random or transform.preprocessing != backbone.preprocessing:
        raise ConfigError(
            f"the {backbone.model_name} prefix cache is built from the un-augmented eval view with the backbone's "
            f"preprocessing {backbone.preprocessing.to_dict()}; got a dataset with transform {transform!r}"
        )
    return transform


def prefix_cache_key(backbone: FrozenPrefixBackbone, dataset: Dataset) -> dict[str, Any] | None:
    """The parts of the cache key (see the module docstring), or None when the data cannot be fingerprinted."""
    data = dataset_fingerprint(dataset)
    if data is None:
        return None
    return {
        "format": FORMAT_VERSION,
        "architecture": backbone.model_name,
        "split": {"first_trainable_stage": backbone.split, "stages": backbone.split + backbone.trainable_stages},
        "prefix_sha256": backbone.prefix_state_sha256(),
        "preprocessing": backbone.preprocessing.to_dict(),
        "view": "eval (no augmentation)",
        "dtype": backbone.cache_dtype,
        "torch": torch.__version__,
        "data": data,
    }


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _batches(dataset: Any, batch_size: int, device: torch.device, num_workers: int) -> Iterator[torch.Tensor]:
    """Images of ``dataset`` in item order, batched (whole-batch transforms for decoded arrays)."""
    if batch_source(dataset) is not None:
        loader: Any = ArrayBatchLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, device=device)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        yield batch[0]


@torch.no_grad()
def _build(backbone: FrozenPrefixBackbone, dataset: Any, directory: Path, meta: dict[str, Any], *, batch_size: int,
           num_workers: int, progress: bool) -> None:
    device = next(backbone.parameters()).device
    dtype = np.dtype(backbone.cache_dtype)
    ids, targets = _items(dataset)
    n = len(ids)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        features: np.ndarray | None = None
        written = 0
        started = time.perf_counter()
        bar = tqdm(total=n, desc=f"prefix cache {backbone.model_name}", disable=not progress, leave=False, mininterval=1.0)
        for images in _batches(dataset, batch_size, device, num_workers):
            out = backbone.forward_prefix(images.to(device, non_blocking=True)).float().contiguous().cpu().numpy()
            if features is None:
                features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=dtype, shape=(n, *out.shape[1:]))
            features[written : written + len(out)] = out.astype(dtype)
            written += len(out)
            bar.update(len(out))
        bar.close()
        if features is None or written != n:
            raise DataError(f"the prefix cache pass saw {written} of {n} items")
        features.flush()
        shape = list(features.shape)
        del features
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "targets.npy", targets)
        seconds = time.perf_counter() - started
        full = {**meta, "shape": shape, "build_s": round(seconds, 3), "images_per_s": round(n / max(seconds, 1e-9), 2)}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1) + "\n")
        if publish_cache_dir(tmp, directory, ("features.npy", "ids.npy", "targets.npy", "meta.json")):
            _logger.info("cached the %s prefix output of %d items %s in %.1f s (%.1f images/s) at %s",
                         backbone.model_name, n, shape[1:], seconds, n / max(seconds, 1e-9), directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path, key: str, ids: np.ndarray, targets: np.ndarray) -> PrefixFeatures | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        features = np.load(directory / "features.npy", mmap_mode="r")
        cached_ids = np.load(directory / "ids.npy", allow_pickle=False)
        cached_targets = np.load(directory / "targets.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        _logger.warning("prefix cache %s is unreadable (%s); rebuilding it", directory, exc)
        return None
    if (meta.get("key") != key or len(features) != len(ids) or not np.array_equal(cached_ids, ids)
            or not np.array_equal(cached_targets, targets)):
        _logger.warning("prefix cache %s does not match its key or items; rebuilding it", directory)
        return None
    return PrefixFeatures(features=features, ids=cached_ids, targets=cached_targets, directory=directory, meta=meta)


def _remove_replaced(root: Path, directory: Path, parts: dict[str, Any]) -> None:
    """Delete caches this one replaces: same architecture, split point and data, other weights/preprocessing/dtype."""
    for other in root.glob(f"{parts['architecture']}-*"):
        if other == directory or not other.is_dir() or other.name.startswith("."):
            continue
        try:
            theirs = json.loads((other / "meta.json").read_text()).get("parts", {})
        except (OSError, ValueError):
            continue
        if all(theirs.get(k) == parts[k] for k in ("architecture", "split", "data")):
            _logger.info("removing the replaced prefix cache %s", other)
            shutil.rmtree(other, ignore_errors=True)  # open memory maps of it stay valid (POSIX)


def load_or_build_prefix_features(
    backbone: FrozenPrefixBackbone,
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> PrefixFeatures | None:
    """The prefix output of every item of ``dataset``: read from the cache, or computed once and cached.

    The prefix runs where the backbone's parameters are (CPU or GPU), in eval mode, without gradients.

    Args:
        backbone: The frozen-prefix backbone (its weights, split point and preprocessing key the cache).
        dataset: The items under the backbone's un-augmented eval transform
            (``build_transform(backbone.preprocessing, train=False)``), e.g. ``MethodContext.eval_view``.
        cache_dir: The cache root (``paths.cache_dir``); caches go to ``<cache_dir>/prefix_features/``.
        batch_size: Images per prefix pass.
        num_workers: Loader workers for streamed (not array-backed) data.
        progress: Show a progress bar while building.

    Returns:
        The cached features, or None when the dataset cannot be fingerprinted (streamed WebDataset
        shards): then nothing is cached and the caller runs the prefix itself.

    Raises:
        ConfigError: The dataset is not the backbone's un-augmented eval view.
        DataError: The dataset has no labels, or an image cannot be read.
    """
    _check_eval_view(backbone, dataset)
    parts = prefix_cache_key(backbone, dataset)
    if parts is None:
        _logger.warning("%s cannot be fingerprinted; the %s prefix runs on every pass (no cache)",
                        type(dataset).__name__, backbone.model_name)
        return None
    key = _digest(parts)
    ids, targets = _items(dataset)
    root = Path(cache_dir) / SUBDIR
    directory = root / f"{backbone.model_name}-{key}"
    if (directory / "meta.json").is_file():
        loaded = _load(directory, key, ids, targets)
        if loaded is not None:
            _logger.info("prefix features of %d items from %s", len(loaded), directory)
            return loaded
        shutil.rmtree(directory, ignore_errors=True)
    _build(backbone, dataset, directory, {"key": key, "parts": parts}, batch_size=batch_size, num_workers=num_workers,
           progress=progress)
    _remove_replaced(root, directory, parts)
    loaded = _load(directory, key, ids, targets)
    if loaded is None:
        raise DataError(f"prefix cache {directory} is unreadable right after it was built")
    return loaded


class CachedFeatureLoader:
    """Shuffled ``(prefix features, labels, positions)`` training batches read from a :class:`PrefixFeatures` cache.

    The same contract as :class:`~compatembed.data.loaders.ArrayBatchLoader`: ``positions`` index
    the items of the training set (methods look up per-item teacher features with them), the order is
    drawn from ``(seed, epoch)`` so a resumed run sees the batches an uninterrupted one would, and
    :meth:`set_epoch` selects the epoch. There is no augmentation: every epoch reads the same values.

    Args:
        cached: The training items' prefix features, in training-set order.
        batch_size: Items per batch.
        shuffle: Draw a new order every epoch.
        drop_last: Skip the last, smaller batch.
        seed: Seeds the order, together with the epoch.
        device: Where batches are produced (float32).

    Raises:
        ConfigError: The batch size is not positive.
    """

    def __init__(self, cached: PrefixFeatures, *, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        self.cached = cached
        self.batch_size, self.shuffle, self.drop_last, self.seed = int(batch_size), shuffle, drop_last, int(seed)
        self.device = torch.device(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(cached.targets))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.cached)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.cached)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            rows = batch.numpy()
            sort = np.argsort(rows, kind="stable")  # read the memory map forward, then restore the batch order
            gathered = np.empty((len(rows), *self.cached.features.shape[1:]), dtype=np.float32)
            gathered[sort] = self.cached.features[rows[sort]]
            features = torch.from_numpy(gathered).to(self.device, non_blocking=True)
            yield features, self.labels[batch].to(self.device, non_blocking=True), batch.to(self.device, non_blocking=True)


def cached_prefix_loader(
    backbone: FrozenPrefixBackbone,
    eval_view: Dataset,
    train_set: Dataset,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int,
    seed: int,
    device: str | torch.device,
    eval_batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> CachedFeatureLoader | None:
    """Training batches of the frozen prefix's cached output for the items of ``train_set``.

    The prefix runs where the backbone is (move it to the training device first to build on a GPU).

    Args:
        backbone: The new model's frozen-prefix backbone.
        eval_view: ``train_set``'s items, in the same order, under the backbone's un-augmented eval
            transform (``MethodContext.eval_view(backbone.preprocessing)``).
        train_set: The training set the positions of the batches index.
        cache_dir: The cache root.
        batch_size: Training batch size (the last, smaller batch is dropped unless it is the only one,
            as :func:`~compatembed.data.loaders.training_loader` does).
        seed: Seeds the per-epoch order.
        device: Where batches are produced.
        eval_batch_size: Images per prefix pass when the cache is built.
        num_workers: Loader workers for streamed data while building.
        progress: Progress bar while building.

    Returns:
        The loader, or None when the data cannot be cached (train on images instead).

    Raises:
        DataError: ``eval_view`` lists other items than ``train_set``.
    """
    cached = load_or_build_prefix_features(backbone, eval_view, cache_dir, batch_size=eval_batch_size,
                                           num_workers=num_workers, progress=progress)
    if cached is None:
        return None
    ids, targets = _items(train_set)
    if not (np.array_equal(cached.ids, ids) and np.array_equal(cached.targets, targets)):
        raise DataError("the eval view of the training split lists other items than the training set; cannot use cached features")
    return CachedFeatureLoader(cached, batch_size=batch_size, shuffle=True, drop_last=len(cached) > batch_size, seed=seed,
                               device=device)
