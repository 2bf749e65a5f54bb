"""How training batches reach the loop: whole augmented batches from a decoded array, or a DataLoader.

:func:`training_loader` picks the road: datasets served from a decoded array
(:mod:`compatembed.data.array_cache`) get an :class:`ArrayBatchLoader`, others a ``DataLoader``
with worker processes that decode and transform one image at a time.

:class:`ArrayBatchLoader` replaces a ``DataLoader`` over per-image transforms for datasets served by
:class:`~compatembed.data.array_cache.ArrayImages`: each batch is one fancy-index into the uint8
array and one batched transform (:meth:`~compatembed.data.transforms.ImageTransform.batch`), on the
training device. On a CUDA device the selected pixels are copied to the device once, so a step never
waits for the host.

Shuffling and augmentation are drawn from generators seeded by ``(seed, epoch)``: an epoch gives the
same batches whether the run started at epoch 0 or resumed from a checkpoint, and
:meth:`ArrayBatchLoader.set_epoch` is the same hook a ``DistributedSampler`` has.

Under torchrun every rank gets a loader with its ``rank`` and the ``world_size``: all ranks draw the
same seeded permutation and each takes every ``world_size``-th item of it, padded as a
``DistributedSampler`` pads (so every rank has the same number of items and batches). Batch ``i`` of
all ranks together is then batch ``i`` of a single process with ``world_size`` times the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from compatembed.data.array_cache import ArrayImages, array_view
from compatembed.data.shards import ShardLoader, WebDatasetShards, shard_loader
from compatembed.data.transforms import ImageTransform
from compatembed.errors import ConfigError


def batch_source(dataset: Any) -> tuple[ArrayImages, np.ndarray, ImageTransform] | None:
    """``(array, positions, transform)`` when ``dataset`` can be served in whole batches, else ``None``.

    That needs a decoded array behind it (see :func:`~compatembed.data.array_cache.array_view`) and
    a transform that runs on batches (an RGB :class:`~compatembed.data.transforms.ImageTransform`).
    """
    view = array_view(dataset)
    if view is None:
        return None
    array, positions = view
    transform = array.transform
    if not isinstance(transform, ImageTransform) or not transform.batchable:
        return None
    return array, positions, transform


class ArrayBatchLoader:
    """Iterates ``(images, labels, positions)`` batches of a dataset served from a decoded array.

    ``positions`` index the items of ``dataset`` (as ``IndexedDataset`` does for a ``DataLoader``),
    so methods can look up cached per-item features.

    Args:
        dataset: A dataset for which :func:`batch_source` is not ``None`` (an :class:`ArrayImages`
            with an :class:`ImageTransform`, possibly inside a class subset or a split).
        batch_size: Items per batch.
        shuffle: Draw a new order every epoch.
        drop_last: Skip the last, smaller batch.
        seed: Seeds the order and the augmentation draws, together with the epoch.
        device: Where batches are produced.
        on_device: Copy the dataset's pixels to ``device`` once (``None``: only for CUDA devices).
        rank: This process's rank among ``world_size`` (see the module doc): it takes the items
            ``rank, rank + world_size, ...`` of the epoch's order, and its own augmentation draws.
        world_size: Processes sharing the dataset (1: this loader serves it all).

    Raises:
        ConfigError: ``dataset`` is not served from a decoded array, the batch size is not positive,
            or ``rank`` is not in ``[0, world_size)``.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: str | torch.device = "cpu",
        on_device: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        source = batch_source(dataset)
        if source is None:
            raise ConfigError(f"{dataset!r} is not served from a decoded array with a batched transform")
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.array, self.positions, self.transform = source
        self.batch_size, self.shuffle, self.drop_last, self.seed = int(batch_size), shuffle, drop_last, int(seed)
        self.device = torch.device(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(self.array.targets[self.positions]))
        self.epoch = 0
        self._pixels: torch.Tensor | None = None
        if on_device if on_device is not None else self.device.type == "cuda":
            self._pixels = torch.from_numpy(np.ascontiguousarray(self.array.pixels[self.positions])).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration draws."""
        self.epoch = int(epoch)

    def num_items(self) -> int:
        """Items this rank serves per epoch: all of them, or ``ceil(N / world_size)`` (padding included)."""
        return -(-len(self.positions) // self.world_size)

    def __len__(self) -> int:
        n = self.num_items()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """Positions (into ``dataset``) this rank serves this epoch, in order; batches are its consecutive runs.

        With several ranks: the common seeded order, padded with its own first items up to a multiple
        of ``world_size`` (as ``DistributedSampler`` pads), then every ``world_size``-th item from ``rank``.
        """
        n = len(self.positions)
        order_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=order_gen) if self.shuffle else torch.arange(n)
        if self.world_size == 1:
            return order
        total = self.num_items() * self.world_size
        if total > n:
            order = torch.cat([order] * -(-total // n))[:total]  # pads with the order's own first items
        return order[self.rank : total : self.world_size]

    def _pixels_of(self, order: torch.Tensor) -> torch.Tensor:
        if self._pixels is not None:
            return self._pixels[order.to(self.device)]
        rows = self.positions[order.numpy()]
        sort = np.argsort(rows, kind="stable")  # read the memory map forward, then restore the batch order
        gathered = np.empty((len(rows), *self.array.pixels.shape[1:]), dtype=np.uint8)
        gathered[sort] = self.array.pixels[rows[sort]]
        return torch.from_numpy(gathered).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # each rank draws its own augmentations (rank 0 draws those of a single process)
        augment_seed = ((self.seed * 1_000_003 + self.epoch) ^ 0x5DEECE66D) + 1_000_033 * self.rank
        augment_gen = torch.Generator().manual_seed(augment_seed)
        order = self.epoch_order()
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            pixels = self._pixels_of(batch)
            images = self.transform.batch(pixels, augment_gen if self.transform.random else None)
            yield images, self.labels[batch].to(self.device, non_blocking=True), batch.to(self.device, non_blocking=True)


class IndexedDataset(Dataset):
    """Yields ``(image, label, position)`` so methods can look up cached per-item features."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` over a ``DistributedSampler`` with the loaders' ``set_epoch`` hook (the loop calls it)."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the sampler draws next."""
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


def training_loader(
    dataset: Any, *, batch_size: int, seed: int, device: torch.device, num_workers: int = 0, rank: int = 0,
    world_size: int = 1,
) -> ArrayBatchLoader | ShardLoader | DataLoader:
    """Shuffled ``(images, labels, positions)`` batches of ``dataset`` for one training run.

    Decoded-array datasets are batched and augmented in this process on ``device``
    (:class:`ArrayBatchLoader`, no workers); WebDataset shards stream through
    :func:`~compatembed.data.shards.shard_loader`; others go through a ``DataLoader`` with ``num_workers``
    workers. The last batch is dropped when it is smaller (unless it is the only one).

    With ``world_size`` > 1 the loader serves rank ``rank``'s share and ``batch_size`` is the batch of
    one rank (the global batch is ``batch_size × world_size``): decoded arrays and other map-style
    datasets are split as a ``DistributedSampler`` splits them (the same seeded order, every rank an
    equal, disjoint part, padded), tar shards are dealt out whole (see
    :func:`~compatembed.data.shards.shard_loader`).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    drop_last = -(-len(dataset) // world_size) > batch_size
    if isinstance(dataset, WebDatasetShards):  # streamed from tar shards: no random access, workers read whole shards
        return shard_loader(dataset, batch_size=batch_size, num_workers=num_workers, seed=seed, device=device,
                            drop_last=drop_last, rank=rank, world_size=world_size)
    if batch_source(dataset) is not None:
        return ArrayBatchLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, seed=seed, device=device,
                                rank=rank, world_size=world_size)
    if world_size > 1:
        indexed = IndexedDataset(dataset)
        return EpochDataLoader(
            indexed,
            batch_size=batch_size,
            sampler=DistributedSampler(indexed, num_replicas=world_size, rank=rank, shuffle=True, seed=seed),
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed + 1_000_033 * rank),  # worker seeds: own augmentations
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
