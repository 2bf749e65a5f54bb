"""Large image datasets streamed from WebDataset tar shards, decoded in DataLoader worker processes.

Small datasets are decoded once into a uint8 array (:mod:`compatembed.data.array_cache`); a dataset
of a million full-size images is not, and random reads of single files from a network share are
slow. Such a dataset is written as a few hundred plain tar files ("shards", e.g.
``train-000000.tar``; see ``tools/make_shards.py``), each holding samples ``<key>.jpg`` (or another
image suffix) with ``<key>.cls``, the integer label as text. Reading a shard is one sequential pass,
so whole shards go to DataLoader workers and are read with the ``webdataset`` package.

:class:`WebDatasetShards` keeps the project's dataset contract as far as a stream allows:
``classes``, a settable ``transform``, ``len``, and ``targets``/``ids`` in the fixed, unshuffled
shard order, all from one pass over the tar headers at construction (no image is decoded and
nothing is written to disk). Iterating yields ``(image, label, position)``, where ``position`` is
the item's id, so methods can look up cached per-item features as with the other loaders. There
is no random access: class subsets, per-class caps and validation hold-outs, which index items,
do not apply.

:func:`shard_loader` wraps it in a DataLoader yielding ``(images, labels, positions)`` batches,
the triple :class:`~compatembed.data.loaders.ArrayBatchLoader` yields; shard order, the
per-worker shuffle buffer and augmentation draws are seeded by ``(seed, epoch)`` through
``set_epoch``, so an epoch draws the same batches after a resume. Under torchrun each rank reads
every ``world_size``-th shard of the epoch's order (``rank``/``world_size``), so ranks read disjoint
shards; shards differ in size, so the training loop runs the steps of the rank with the fewest.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from compatembed.data._common import IMG_EXTENSIONS, Transform, as_int64, decode_rgb
from compatembed.data.tar import _scan_tarfile, _scan_ustar
from compatembed.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = ("jpg", "jpeg", "png", "webp") + tuple(
    sorted(ext[1:] for ext in IMG_EXTENSIONS if ext[1:] not in ("jpg", "jpeg", "png", "webp"))
)
"""Sample file suffixes read as the image, in order of preference when a sample has several."""

LABEL_SUFFIX = "cls"
"""Suffix of the file holding a sample's integer label as text."""

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members too
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Absolute paths of the shard files a pattern names, in a fixed order.

    Accepts a brace pattern (``/data/train-{000000..000099}.tar``), a glob (``/data/train-*.tar``),
    a directory (every ``*.tar`` in it) or a list of any of these; brace expansion keeps its order,
    globs and directories are sorted, so the item order (and with it ``ids``) does not depend on
    the file system. Paths are made absolute because workers may run from another directory.

    Raises:
        DataError: A named shard does not exist, a pattern matches nothing, or a shard is listed twice.
    """
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not patterns:
        raise DataError("no shard pattern given (expected e.g. /data/train-{000000..000099}.tar)")
    paths: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for part in braceexpand.braceexpand(os.fspath(pattern)):
            part = os.path.expanduser(part)
            if os.path.isdir(part):
                found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
                if not found:
                    raise DataError(f"no *.tar shards in directory {part}")
                paths += found
            elif _GLOB_CHARS.search(part):
                found = sorted(glob.glob(part))
                if not found:
                    raise DataError(f"shard pattern {part} matches no file")
                paths += found
            elif os.path.isfile(part):
                paths.append(part)
            else:
                missing.append(part)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} shard file(s) not found: {shown}")
    paths = [os.path.abspath(p) for p in paths]
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise DataError(f"shard {p} is listed twice in {shards!r} (its samples would be read twice per epoch)")
        seen.add(p)
    return paths


def read_classes(classes: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names from a list or a text file with one name per line (blank lines ignored).

    Raises:
        DataError: The file is missing, or the list is empty or names a class twice.
    """
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise DataError(f"class list file not found: {path} (one class name per line, e.g. classes.txt)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        where = str(path)
    else:
        names = [str(n) for n in classes]
        where = "the class list"
    if not names:
        raise DataError(f"no class names in {where}")
    duplicates = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if duplicates:
        raise DataError(f"class names repeated in {where}: {', '.join(duplicates[:5])}")
    return names


def _parse_label(data: bytes, shard: str, key: str, num_classes: int) -> int:
    try:
        label = int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"sample {key!r} in shard {shard}: {key}.{LABEL_SUFFIX} is not an integer label: {data[:32]!r}") from None
    if not 0 <= label < num_classes:
        raise DataError(f"sample {key!r} in shard {shard}: label {label} is out of range for {num_classes} classes")
    return label


def _image_suffix(suffixes: Iterable[str]) -> str | None:
    present = set(suffixes)
    return next((s for s in IMAGE_SUFFIXES if s in present), None)


def _index_shard(path: str, num_classes: int) -> list[int]:
    """Labels of the samples of one shard, in the order webdataset yields them; reads headers and ``.cls`` files only.

    Members are grouped into samples exactly as ``webdataset`` groups them (consecutive members with
    the same key, meta members and names without a suffix skipped), so position ``i`` of this list is
    the ``i``-th sample a reader of the shard meets.
    """
    members = _scan_ustar(Path(path))
    if members is None:  # headers the fast scan does not handle: let tarfile read them
        members = _scan_tarfile(Path(path))
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, size in members:
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        if _SKIP_META.match(name):
            continue
        key, suffix = base_plus_ext(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        files = samples[-1][1]
        if suffix in files:
            raise DataError(f"sample {key!r} in shard {path} has two {suffix!r} files")
        files[suffix] = (offset, size)
    labels: list[int] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        for key, files in samples:
            if LABEL_SUFFIX not in files:
                raise DataError(f"sample {key!r} in shard {path} has no label ({key}.{LABEL_SUFFIX}); it holds {sorted(files)}")
            if _image_suffix(files) is None:
                raise DataError(f"sample {key!r} in shard {path} has no image ({key}.jpg/.png/...); it holds {sorted(files)}")
            offset, size = files[LABEL_SUFFIX]
            labels.append(_parse_label(os.pread(fd, size, offset), path, key, num_classes))
    return labels


def _raise_data_error(exn: Exception) -> bool:
    """webdataset error handler: a shard that cannot be read is a :class:`DataError` naming it.

    webdataset appends its context (the stream, the url) to the arguments of an exception on its
    way out, so a :class:`DataError` raised here once is raised afresh with its message alone.
    """
    if isinstance(exn, DataError):
        raise DataError(str(exn.args[0]) if exn.args else "cannot read shard") from exn.__cause__
    where = "; ".join(str(a) for a in exn.args if isinstance(a, str))
    raise DataError(f"cannot read shard ({type(exn).__name__}): {where}") from exn


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, worker), stable across processes and runs."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v)) % (1 << 63)
    return out


class WebDatasetShards(IterableDataset):
    """Samples of WebDataset tar shards: ``<key>.<image suffix>`` with ``<key>.cls`` (label as text).

    Construction lists the members of every shard (tar headers only, see
    :func:`~compatembed.data.tar._scan_ustar`) and reads the small ``.cls`` files, which gives
    ``len``, ``targets`` and ``ids`` without decoding an image or writing a cache. Iteration streams
    the shards with ``webdataset``: whole shards are split across DataLoader workers
    (``split_by_worker``), so every sample is read exactly once per epoch; with :attr:`shuffle`
    the shard order and a per-worker buffer of :attr:`shuffle_buffer` encoded samples are
    shuffled, seeded by ``(seed, epoch, worker)``. Images are decoded in the process that iterates.

    The item order without shuffling (shards in the given order, samples in archive order) fixes
    ``targets`` and ``ids`` (``ids[i] == i``); each yielded ``position`` indexes them. A consumer
    iterating with several workers gets batches interleaved by worker, not in ``ids`` order, and must
    use the positions.

    Args:
        shards: Shard files: a brace pattern, a glob, a directory or a list (see :func:`expand_shards`).
            Plain (uncompressed) tar files.
        classes: Class names, or a text file with one name per line (``classes.txt`` from
            ``tools/make_shards.py``); labels in the shards index this list.
        transform: Applied to each PIL RGB image; ``None`` yields the image itself.
        shuffle_buffer: Encoded samples each worker holds to shuffle from (memory: this many
            encoded images per worker).

    Attributes:
        shard_paths: Absolute shard paths, in order.
        shard_counts: Samples per shard, int64 ``(S,)``.
        shard_starts: Position of each shard's first sample, int64 ``(S,)``.
        targets: Labels, int64 ``(N,)``, in the unshuffled order.
        ids: Item ids, int64 ``(N,)`` (``arange(N)``).
        classes: Class names; ``classes[label]`` names a label.
        shuffle: Shuffle when iterated (set by :func:`shard_loader`; ``False`` by default).
        seed: Seeds the shuffle, together with the epoch.
        epoch: The epoch whose order the next iteration draws (:meth:`set_epoch`).
        rank / world_size: This process's share when several read the shards (set by
            :func:`shard_loader`; ``0`` and ``1`` by default): the shards :meth:`rank_shards` lists.

    Raises:
        DataError: A shard is missing or no plain tar file, a sample lacks its image or label, a
            label is not an integer in range, or the shards hold no sample.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        classes: str | os.PathLike[str] | Sequence[str],
        transform: Transform | None = None,
        *,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        if int(shuffle_buffer) < 1:
            raise ConfigError(f"shuffle_buffer must be a positive number of samples, got {shuffle_buffer}")
        self.pattern = shards if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
        self.classes: list[str] = read_classes(classes)
        self.shard_paths: list[str] = expand_shards(shards)
        start = time.perf_counter()
        # Threads overlap the header reads of several shards (the latency of a network share); order is kept.
        with ThreadPoolExecutor(max_workers=min(8, len(self.shard_paths))) as pool:
            per_shard = list(pool.map(lambda p: _index_shard(p, len(self.classes)), self.shard_paths))
        self.shard_counts: np.ndarray = as_int64([len(labels) for labels in per_shard])
        self.shard_starts: np.ndarray = as_int64(np.concatenate([[0], np.cumsum(self.shard_counts)[:-1]]))
        self.targets: np.ndarray = as_int64([y for labels in per_shard for y in labels])
        if len(self.targets) == 0:
            raise DataError(
                f"no samples (<key>.<image> + <key>.{LABEL_SUFFIX}) in the {len(self.shard_paths)} shard(s) of {shards!r}"
            )
        self.ids: np.ndarray = np.arange(len(self.targets), dtype=np.int64)
        self.transform = transform
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle = False
        self.seed = 0
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        _logger.info(
            "indexed %d shard(s) of %s: %d samples, %d classes in %.2f s",
            len(self.shard_paths),
            self.pattern,
            len(self.targets),
            len(self.classes),
            time.perf_counter() - start,
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        raise ConfigError(
            "WebDatasetShards streams its shards and has no random access: set data.pipeline=stream and leave "
            "data.classes, data.train_per_class and data.validation.fraction unset (they select items by index)"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle the next iteration draws."""
        self.epoch = int(epoch)

    def select_shards(self, first: int, stop: int) -> "WebDatasetShards":
        """The samples of shards ``[first, stop)`` only, keeping their ids: one part of a sharded extraction.

        Raises:
            ConfigError: the range is empty or outside the shard list.
        """
        if not 0 <= first < stop <= len(self.shard_paths):
            raise ConfigError(f"shards [{first}, {stop}) are not a non-empty range of the {len(self.shard_paths)} shards")
        part = copy.copy(self)
        begin = int(self.shard_starts[first])
        end = begin + int(self.shard_counts[first:stop].sum())
        part.shard_paths = self.shard_paths[first:stop]
        part.shard_counts = self.shard_counts[first:stop]
        part.shard_starts = self.shard_starts[first:stop] - begin  # positions index this part's targets
        part.targets, part.ids = self.targets[begin:end], self.ids[begin:end]
        return part

    def epoch_shards(self) -> list[int]:
        """Shard indices in the order this epoch reads them (shuffled by ``(seed, epoch)`` when :attr:`shuffle`).

        Every worker computes the same order and takes every ``num_workers``-th shard of it.
        """
        order = list(range(len(self.shard_paths)))
        if self.shuffle:
            random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        return order

    def rank_shards(self) -> list[int]:
        """This rank's shards this epoch: every ``world_size``-th of :meth:`epoch_shards`, from ``rank``.

        Every rank computes the same epoch order, so the ranks' shards are disjoint and cover them all.
        """
        return self.epoch_shards()[self.rank :: self.world_size]

    def worker_counts(self, num_workers: int) -> list[int]:
        """Samples each of ``num_workers`` DataLoader workers of this rank yields this epoch (one entry for 0 workers)."""
        order = self.rank_shards()
        workers = max(1, int(num_workers))
        return [int(sum(self.shard_counts[s] for s in order[w::workers])) for w in range(workers)]

    def _positioned(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Attach each sample's position: its shard's start plus its rank within the shard.

        A shard is read front to back by one worker before any shuffling, so counting suffices; a
        count that disagrees with the index means the shard changed since construction.
        """
        shard_of = {p: i for i, p in enumerate(self.shard_paths)}
        url: str | None = None
        count = start = expected = 0

        def check_complete() -> None:
            if url is not None and count != expected:
                raise DataError(f"shard {url} yielded {count} samples but held {expected} when indexed (changed since?)")

        for sample in samples:
            if sample["__url__"] != url:
                check_complete()
                url = sample["__url__"]
                index = shard_of[url]
                start, expected, count = int(self.shard_starts[index]), int(self.shard_counts[index]), 0
            if count >= expected:
                raise DataError(f"shard {url} holds more than the {expected} samples it held when indexed (changed since?)")
            sample["__position__"] = start + count
            count += 1
            yield sample
        check_complete()

    def _decode(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[Any, int, int]]:
        """``(image, label, position)`` per sample; a corrupt image or missing file names its shard and key."""
        num_classes = len(self.classes)
        for sample in samples:
            shard, key, position = sample["__url__"], sample["__key__"], sample["__position__"]
            suffix = _image_suffix(k for k in sample if not k.startswith("__"))
            if suffix is None:
                raise DataError(f"sample {key!r} in shard {shard} has no image ({key}.jpg/.png/...)")
            if LABEL_SUFFIX not in sample:
                raise DataError(f"sample {key!r} in shard {shard} has no label ({key}.{LABEL_SUFFIX})")
            label = _parse_label(sample[LABEL_SUFFIX], shard, key, num_classes)
            if label != self.targets[position]:
                raise DataError(
                    f"sample {key!r} in shard {shard} has label {label} but {int(self.targets[position])} when indexed "
                    "(changed since?)"
                )
            image = decode_rgb(sample[suffix], f"{shard}:{key}.{suffix}")
            yield (self.transform(image) if self.transform is not None else image), label, position

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        urls = [self.shard_paths[i] for i in self.rank_shards()]
        stages: list[Any] = [
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_raise_data_error),
            self._positioned,
        ]
        if self.shuffle:
            seed = _mix(self.seed, self.epoch, worker, *([self.rank] if self.rank else []))  # rank 0: a single process's
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed))
        stages.append(self._decode)
        return iter(wds.DataPipeline(*stages))

    def __repr__(self) -> str:
        return f"WebDatasetShards({self.pattern!r}, shards={len(self.shard_paths)}, n={len(self)}, classes={len(self.classes)})"


class ShardLoader(DataLoader):
    """A DataLoader over :class:`WebDatasetShards` with ``set_epoch`` and an exact ``len``.

    Workers are started anew every epoch (not persistent), so each receives the dataset with the
    current epoch; the worker RNGs that draw augmentations are seeded from ``(seed, epoch)`` too.
    Each worker batches its own shards, so ``len`` counts every worker's batches (their last ones
    may be smaller, or dropped with ``drop_last``).
    """

    def __init__(self, dataset: WebDatasetShards, *, seed: int, **kwargs: Any) -> None:
        super().__init__(dataset, generator=torch.Generator(), **kwargs)
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration draws."""
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        batch = int(self.batch_size or 1)
        counts = self.dataset.worker_counts(self.num_workers)  # type: ignore[attr-defined]
        return sum(n // batch if self.drop_last else -(-n // batch) for n in counts)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        rank = self.dataset.rank  # type: ignore[attr-defined]
        self.generator.manual_seed(_mix(self.seed, self.dataset.epoch, *([rank] if rank else [])) ^ 0x5DEECE66D)  # type: ignore[attr-defined,union-attr]
        batches = super().__iter__()
        try:
            yield from batches
        finally:
            # Stop the workers now, also when a worker raised (a corrupt image) or the consumer
            # stopped early. Left to the garbage collector, an iterator whose error traceback holds
            # it in a reference cycle finds its queues already finalised and waits 5 s per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def shard_loader(
    dataset: WebDatasetShards,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: str | torch.device,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> ShardLoader:
    """A DataLoader of ``(images, labels, positions)`` batches streamed from ``dataset``'s shards.

    The dataset is copied (shallowly) with ``shuffle`` and ``seed`` set, so the caller's object keeps
    its unshuffled order. ``set_epoch`` on the loader selects the epoch, as on
    :class:`~compatembed.data.loaders.ArrayBatchLoader`.

    Args:
        dataset: The shards to stream.
        batch_size: Items per batch (within one worker).
        num_workers: DataLoader worker processes; more workers than shards leaves some idle.
        seed: Seeds shard order, shuffle buffer and augmentation, together with the epoch.
        device: Where training runs; batches are pinned for a CUDA device.
        shuffle: Shuffle shards and samples every epoch.
        drop_last: Drop each worker's last, smaller batch.
        rank: This process's rank among ``world_size``: it reads the shards
            :meth:`WebDatasetShards.rank_shards` lists.
        world_size: Processes reading the shards (1: this loader reads them all).

    Raises:
        ConfigError: ``dataset`` is no :class:`WebDatasetShards`, a count is not positive, ``rank``
            is not in ``[0, world_size)``, or there are fewer shards than processes.
    """
    if not isinstance(dataset, WebDatasetShards):
        raise ConfigError(f"shard_loader needs a WebDatasetShards dataset, got {type(dataset).__name__}")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be non-negative, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(dataset.shard_paths) < world_size:
        raise ConfigError(
            f"{len(dataset.shard_paths)} shard(s) for {world_size} processes: every process reads whole shards, so "
            "write at least as many shards as processes (tools/make_shards.py)"
        )
    per_rank = len(dataset.shard_paths) // world_size
    if num_workers > per_rank:
        _logger.warning(
            "%d workers for %d shards: %d workers stay idle (write smaller shards)",
            num_workers,
            per_rank,
            num_workers - per_rank,
        )
    streamed = copy.copy(dataset)
    streamed.shuffle, streamed.seed = bool(shuffle), int(seed)
    streamed.rank, streamed.world_size = int(rank), int(world_size)
    return ShardLoader(
        streamed,
        seed=seed,
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        drop_last=drop_last,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )

