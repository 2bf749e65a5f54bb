"""Embedding a dataset with a model, and the on-disk format of extracted embeddings.

One function embeds for every caller (the extract CLI, evaluation, methods that cache teacher
features), so a batch is preprocessed and normalised the same way everywhere. :func:`extract_split`
embeds a configured split with a model version (its own preprocessing); :func:`load_or_extract` is
what evaluation reads: extracted once, then cached inside the version directory.

A large gallery is embedded in parts, one process each (``shard=(i, n)`` of :func:`extract_split`):
part ``i`` of ``n`` embeds a contiguous range of the split and is saved to ``<out>/shard-i-of-n``;
:meth:`EmbeddingSet.load` merges the parts and checks every id appears once. The layout and the
merge are :mod:`compatembed_index.embedding_sets` (numpy only, so the index service reads it too).

A model built on a :class:`~compatembed.models.frozen_prefix.FrozenPrefixBackbone` (with ``cache``
on) can be embedded from the cached output of its frozen prefix (:mod:`compatembed.feature_cache`)
when the caller names a cache directory: every model sharing that prefix (an upgrade's independent
new model and its compatible variants) then pays the expensive part of the forward pass once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from compatembed_index.embedding_sets import is_embedding_set, read_embedding_set, shard_dir_name
from compatembed_index.errors import InvalidInputError

from compatembed.data import Preprocessing, build_dataset, build_transform
from compatembed.data.loaders import ArrayBatchLoader, batch_source
from compatembed.data.shards import WebDatasetShards
from compatembed.errors import ConfigError, EvalError
from compatembed.feature_cache import load_or_build_prefix_features
from compatembed.hardware import resolve_device
from compatembed.models.frozen_prefix import find_frozen_prefix
from compatembed.models.version import MANIFEST, load_manifest, load_model_version

_logger = logging.getLogger(__name__)


@dataclass
class EmbeddingSet:
    """Embeddings of a labelled split.

    Attributes:
        embeddings: (N, D) float32.
        labels: (N,) int64 class ids.
        ids: (N,) int64 stable item ids (position in the full split).
        meta: facts about where they came from (version id, dataset, split, normalized, ...).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``embeddings.npy``, ``labels.npy``, ``ids.npy`` and ``meta.json`` (meta last).

        A part of a sharded extraction (``meta`` has ``shard`` and ``num_shards``) goes to
        ``<out_dir>/shard-i-of-n``; the returned path is that directory.
        """
        out = Path(out_dir)
        if "shard" in self.meta:
            out = out / shard_dir_name(int(self.meta["shard"]), int(self.meta["num_shards"]))
        out.mkdir(parents=True, exist_ok=True)
        for name, array in (("embeddings", self.embeddings), ("labels", self.labels), ("ids", self.ids)):
            tmp = out / f".{name}.npy.tmp"
            with open(tmp, "wb") as handle:
                np.save(handle, array)
            os.replace(tmp, out / f"{name}.npy")
        meta = dict(self.meta, count=len(self), dim=int(self.embeddings.shape[1]))
        tmp = out / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / "meta.json")
        return out

    @classmethod
    def load(cls, in_dir: str | os.PathLike[str]) -> "EmbeddingSet":
        """Read a set :meth:`save` wrote: a whole one, or the ``shard-i-of-n`` parts merged in order.

        Raises:
            EvalError: no set there, a partial write, or parts missing, unfinished, inconsistent or
                holding an id twice (the message names them).
        """
        try:
            stored = read_embedding_set(in_dir)
        except InvalidInputError as exc:
            raise EvalError(str(exc)) from None
        return cls(embeddings=stored.embeddings, labels=stored.labels, ids=stored.ids, meta=stored.meta)


def _model_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    embed = getattr(model, "embed", None)
    return embed(images) if callable(embed) else model(images)


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "embed",
    progress: bool = True,
    prefix_cache_dir: str | os.PathLike[str] | None = None,
    augment_seed: int = 0,
) -> EmbeddingSet:
    """Embed every item of ``dataset`` (which yields ``(image, label)``) in order.

    The model's ``embed`` (its deployed, normalised embedding) is used when it has one. A dataset
    served from a decoded array (:mod:`compatembed.data.array_cache`) is embedded in whole batches
    transformed on ``device``, the same path training uses; others go through a ``DataLoader``.

    Args:
        prefix_cache_dir: When set and the model holds a :class:`FrozenPrefixBackbone` with ``cache``
            on, its frozen prefix's output is read from (or first written to) the prefix cache there
            and only the rest of the model runs; ``dataset`` must then be the backbone's un-augmented
            eval view. The result equals the image path up to the cache's storage precision.

    Returns:
        An :class:`EmbeddingSet` with ``ids`` taken from ``dataset.ids`` when present, else positions.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    prefix = find_frozen_prefix(model) if prefix_cache_dir is not None else None
    if prefix is not None and prefix.cache:
        cached = load_or_build_prefix_features(prefix, dataset, prefix_cache_dir, batch_size=batch_size,
                                               num_workers=num_workers, progress=progress)
        if cached is not None:
            embedded = []
            with prefix.prefix_features_input():
                for start in tqdm(range(0, len(cached), batch_size), desc=desc, disable=not progress, leave=False):
                    x = torch.from_numpy(np.array(cached.features[start : start + batch_size], dtype=np.float32))
                    embedded.append(_model_embed(model, x.to(device)).float().cpu().numpy())
            model.train(was_training)
            dim = int(getattr(model, "embed_dim", 0))
            embeddings = np.concatenate(embedded) if embedded else np.zeros((0, dim), np.float32)
            return EmbeddingSet(embeddings=embeddings.astype(np.float32), labels=cached.targets.copy(), ids=cached.ids.copy())
    if batch_source(dataset) is not None:  # decoded array: whole batches, transformed on the device
        loader: Any = ArrayBatchLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, seed=augment_seed,
                                       device=device)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, targets = batch[0], batch[1]
        out = _model_embed(model, images.to(device, non_blocking=True))
        chunks.append(out.float().cpu().numpy())
        labels.append(np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64))
        if len(batch) > 2:  # streamed shards: workers interleave, so each item says where it sits in the dataset
            positions.append(np.asarray(batch[2].cpu() if isinstance(batch[2], torch.Tensor) else batch[2], dtype=np.int64))
    model.train(was_training)
    ids = np.asarray(getattr(dataset, "ids", np.arange(len(dataset))), dtype=np.int64)
    if positions:
        ids = ids[np.concatenate(positions)]
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return EmbeddingSet(embeddings=embeddings.astype(np.float32), labels=np.concatenate(labels), ids=ids)


class ItemRange(Dataset):
    """Items ``[start, stop)`` of a map-style dataset, keeping their ids: what one part of an extraction embeds.

    It has the ``dataset``/``indices`` pair a decoded array is seen through, so the part keeps the
    whole-batch path.
    """

    def __init__(self, dataset: Dataset, start: int, stop: int) -> None:
        self.dataset = dataset
        self.indices = np.arange(start, stop, dtype=np.int64)
        self.ids = np.asarray(getattr(dataset, "ids", np.arange(len(dataset))), dtype=np.int64)[start:stop]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]


def split_range(units: int, shard: int, num_shards: int, *, what: str = "units") -> tuple[int, int]:
    """Units ``[a, b)`` of part ``shard`` of ``num_shards``: contiguous, sizes differing by at most one.

    Raises:
        ConfigError: ``shard`` not in ``[0, num_shards)``, or more parts than units (``what`` names them).
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"shard={shard} num_shards={num_shards}: need 0 <= shard < num_shards")
    if num_shards > units:
        raise ConfigError(f"num_shards={num_shards} but the split has only {units} {what}: use at most {units} parts")
    base, extra = divmod(units, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def shard_of(dataset: Dataset, shard: int, num_shards: int, *, batch_size: int) -> tuple[Dataset, int, int]:
    """Part ``shard`` of ``num_shards`` of ``dataset``: ``(the part, first item, end item)``.

    A map-style dataset is split at multiples of ``batch_size``, so every item is embedded in the
    batch an unsharded run puts it in (the same numbers, bit for bit on the CPU); streamed tar
    shards are split at tar-file boundaries (a part reads whole files).

    Raises:
        ConfigError: more parts than batches (or tar files), or a bad ``shard``.
    """
    if isinstance(dataset, WebDatasetShards):
        a, b = split_range(len(dataset.shard_paths), shard, num_shards, what="tar files (a part reads whole files)")
        part = dataset.select_shards(a, b)
        start = int(dataset.shard_starts[a])
        return part, start, start + len(part)
    n = len(dataset)  # type: ignore[arg-type]
    a, b = split_range(-(-n // batch_size), shard, num_shards, what=f"batches of {batch_size} (or lower batch_size)")
    start, stop = a * batch_size, min(b * batch_size, n)
    return ItemRange(dataset, start, stop), start, stop


def extract_split(
    version_dir: str | Path, data_cfg: DictConfig, split: str, *, device: str = "auto", batch_size: int = 256,
    num_workers: int = 0, progress: bool = True, shard: tuple[int, int] | None = None, prefix_cache: bool = False,
) -> EmbeddingSet:
    """Embed ``split`` of ``data_cfg`` with the model version in ``version_dir`` (its own preprocessing).

    With ``prefix_cache`` a frozen-prefix model (see :func:`embed_dataset`) reads its prefix output
    from the cache under ``data.cache_dir``, shared by every version with the same frozen prefix.

    Args:
        shard: ``(i, n)``: embed part ``i`` of ``n`` only (see :func:`shard_of`); its ``meta`` says
            which, and :meth:`EmbeddingSet.save` puts it in ``<out>/shard-i-of-n``.
    """
    loaded = load_model_version(version_dir)
    torch_device = resolve_device(device)
    preprocessing = Preprocessing.from_dict(loaded.manifest["preprocessing"])
    dataset = build_dataset(data_cfg, split, transform=build_transform(preprocessing, train=False))
    total, part_meta = len(dataset), {}
    if shard is not None:
        dataset, start, stop = shard_of(dataset, shard[0], shard[1], batch_size=batch_size)
        part_meta = {"shard": shard[0], "num_shards": shard[1], "start": start, "stop": stop, "total": total}
    result = embed_dataset(
        loaded.model.to(torch_device),
        dataset,
        batch_size=batch_size,
        device=torch_device,
        num_workers=num_workers,
        desc=f"embed {loaded.version_id}/{split}",
        progress=progress,
        prefix_cache_dir=OmegaConf.select(data_cfg, "cache_dir", default=None) if prefix_cache else None,
    )
    result.meta = {
        "version_id": loaded.version_id,
        "version_dir": str(Path(version_dir).resolve()),
        "weights_sha256": loaded.manifest["files"]["model.safetensors"],
        "dataset": str(data_cfg.name),
        "split": split,
        "normalized": bool(loaded.manifest["embedding"]["normalized"]),
        **part_meta,
    }
    return result


def load_or_extract(
    path: str | Path, data_cfg: DictConfig, split: str, *, device: str = "auto", batch_size: int = 256,
    num_workers: int = 0, progress: bool = True, prefix_cache: bool = False,
) -> EmbeddingSet:
    """Embeddings of ``split`` from a version directory (extracted once, cached inside it) or an embeddings directory.

    ``prefix_cache`` is passed to :func:`extract_split` when the embeddings have to be extracted.
    """
    path = Path(path)
    if is_embedding_set(path) and not (path / MANIFEST).is_file():
        return EmbeddingSet.load(path)
    manifest = load_manifest(path)
    cache = path / "embeddings" / _cache_name(data_cfg, split)
    if (cache / "meta.json").is_file():
        cached = EmbeddingSet.load(cache)
        if cached.meta.get("weights_sha256") == manifest["files"]["model.safetensors"]:
            return cached
    result = extract_split(
        path, data_cfg, split, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
        prefix_cache=prefix_cache,
    )
    result.save(cache)
    return result


def _cache_name(data_cfg: DictConfig, split: str) -> str:
    """``<dataset>-<split>``, plus a tag of the item selection when one is set (classes, per-class cap, validation split)."""
    keys = {"train": ("classes", "train_per_class"), "val": ("eval_classes",)}.get(split, ("eval_classes",))
    selection = {k: OmegaConf.select(data_cfg, k, default=None) for k in keys}
    validation = OmegaConf.select(data_cfg, "validation", default=None)
    if split != "test" and validation is not None and float(validation.get("fraction") or 0) > 0:
        selection["validation"] = OmegaConf.to_container(validation, resolve=True)
    if all(v is None for v in selection.values()):
        return f"{data_cfg.name}-{split}"
    tag = hashlib.sha256(json.dumps(selection, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{data_cfg.name}-{split}-{tag}"
