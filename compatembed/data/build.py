"""Build a split of the dataset a ``conf/data/*.yaml`` config describes, with its class selection applied."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from torch.utils.data import IterableDataset

from compatembed.data._common import LabeledImageDataset, Transform
from compatembed.data.array_cache import decode_to_array
from compatembed.data.holdout import HoldoutSplit
from compatembed.data.subset import ClassSubset, parse_classes
from compatembed.errors import CompatEmbedError, ConfigError, DataError

_logger = logging.getLogger(__name__)

SPLITS: dict[str, str] = {"train": "classes", "val": "eval_classes", "test": "eval_classes"}
"""Splits ``build_dataset`` knows, each with the config key holding its class selection.

``val`` is carved out of the training source (``data.validation``); it is evaluated like ``test``
(all evaluation classes), so settings can be chosen on it without touching the test split."""

_PATH_KEYS = ("path", "root")

PIPELINES: tuple[str, ...] = ("auto", "array", "stream")
"""Values of ``data.pipeline``: how images reach the model (see :func:`build_dataset`)."""


def _resolve_split(data_cfg: DictConfig, split: str) -> dict[str, Any]:
    if split not in data_cfg or data_cfg[split] is None:
        raise ConfigError(f"data config has no '{split}' dataset (data.{split}._target_ and its arguments)")
    try:
        node = OmegaConf.to_container(data_cfg[split], resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing mandatory value data.{split}.{e.key} (set data.{split}.{e.key}=...)") from None
    except InterpolationResolutionError as e:
        raise ConfigError(f"cannot resolve data.{split}: {e}") from None
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"data.{split} must be a mapping with a _target_ (the dataset class)")
    return node


def _check_paths(node: Mapping[str, Any], split: str) -> None:
    # A dataset that may download creates its root itself; otherwise a missing path is the usual
    # first-run mistake, so name the key to set.
    if node.get("download"):
        return
    for key in _PATH_KEYS:
        value = node.get(key)
        if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
            raise DataError(f"dataset path not found: {value} (set data.{split}.{key}=... or COMPATEMBED_DATA_ROOT)")


def _instantiate(node: dict[str, Any], split: str, transform: Transform | None) -> LabeledImageDataset:
    try:
        return instantiate(node, transform=transform)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, CompatEmbedError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CompatEmbedError):
            raise cause from None
        if cause is None or isinstance(cause, (TypeError, ImportError, AttributeError)):
            # A misspelt argument or an unknown _target_: a config error, not a bug.
            raise ConfigError(f"cannot build data.{split} ({node['_target_']}): {cause or e}") from e
        raise


def _optional(cfg: DictConfig, key: str) -> Any:
    """An optional data key (absent, or an interpolation that cannot resolve here, reads as None)."""
    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def _serve(dataset: LabeledImageDataset, cfg: DictConfig, split: str) -> LabeledImageDataset:
    """Apply ``data.pipeline``: the decoded-array cache for small images, or the dataset as it is."""
    pipeline = _optional(cfg, "pipeline") or "stream"
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown data.pipeline={pipeline!r}; known: {', '.join(PIPELINES)}")
    if pipeline == "stream" or len(dataset) == 0:
        return dataset
    cache_dir = _optional(cfg, "cache_dir")
    if pipeline == "auto" and not hasattr(dataset, "data"):
        limit_gb = float(_optional(cfg, "array_cache_max_gb") or 8)
        saved, dataset.transform = dataset.transform, None
        try:
            first, _ = dataset[0]
        finally:
            dataset.transform = saved
        decoded_gb = len(dataset) * first.size[0] * first.size[1] * 3 / 1e9
        if decoded_gb > limit_gb:
            _logger.info("data.%s streams: %.1f GB decoded exceeds data.array_cache_max_gb=%g", split, decoded_gb, limit_gb)
            return dataset
    arrays = decode_to_array(dataset, cache_dir)
    if arrays is None:
        if pipeline == "array":
            raise ConfigError(
                f"data.pipeline=array but data.{split} ({type(dataset).__name__}) cannot be decoded into an array "
                f"cache{'' if cache_dir else ' (data.cache_dir is not set)'}; use data.pipeline=stream"
            )
        return dataset
    return arrays


def build_dataset(
    data_cfg: DictConfig | Mapping[str, Any], split: str, transform: Transform | None = None
) -> LabeledImageDataset:
    """Instantiate ``data_cfg[split]`` and keep the classes its selection names.

    ``data.classes`` applies to ``"train"`` and ``data.eval_classes`` to ``"test"``; ``None`` keeps
    every class. ``data.train_per_class`` keeps the first n training items of each class (quick runs).
    ``data.pipeline`` picks how images are served: ``array`` decodes the split once into a uint8
    array cache under ``data.cache_dir`` (:func:`~compatembed.data.array_cache.decode_to_array`;
    batches are then augmented as tensors), ``stream`` decodes each image when it is read, and
    ``auto`` (the default) takes ``array`` unless the decoded split would exceed
    ``data.array_cache_max_gb``.
    ``data.validation.fraction`` > 0 holds out that share of every class of the training source,
    drawn with ``data.validation.seed`` (:class:`~compatembed.data.holdout.HoldoutSplit`): ``"val"``
    yields the held-out items and ``"train"`` the rest, so the two never overlap.
    Labels and item ids are those of the full split (see :class:`ClassSubset`).

    Args:
        data_cfg: The ``data`` node of a composed config (interpolations such as
            ``${paths.data_root}`` resolve against its root) or an equivalent plain dict.
        split: ``"train"``, ``"val"`` (needs ``data.validation.fraction`` > 0) or ``"test"``.
        transform: Passed to the dataset's constructor; applied to each PIL image.

    Returns:
        The dataset, wrapped in a :class:`ClassSubset` when a selection is set.

    Raises:
        ConfigError: Unknown split, missing mandatory value, unresolvable interpolation,
            unknown ``_target_`` or constructor argument.
        DataError: A dataset path is missing, the data cannot be read, the class selection is
            invalid, or ``data.num_classes`` disagrees with the dataset.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown data split {split!r}; known: {', '.join(SPLITS)}")
    cfg = data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(dict(data_cfg))
    source = "train" if split == "val" else split
    node = _resolve_split(cfg, source)
    fraction = float(_optional(cfg, "validation.fraction") or 0.0)
    if split == "val" and fraction <= 0:
        raise ConfigError("data split 'val' needs data.validation.fraction > 0 (the share of each class held out)")
    _check_paths(node, source)
    dataset = _serve(_instantiate(node, source, transform), cfg, source)
    if isinstance(dataset, IterableDataset):  # streamed shards: no random access to select items by
        chosen = [k for k, v in (("data.validation.fraction", fraction), ("data.train_per_class", cfg.get("train_per_class")),
                                 (f"data.{SPLITS[split]}", cfg.get(SPLITS[split]))) if v]
        if chosen:
            raise ConfigError(f"data.{source} streams from shards, which cannot select items: unset {', '.join(chosen)} "
                              "(write shards of the selection instead, tools/make_shards.py)")
    if fraction > 0 and source == "train":
        dataset = HoldoutSplit(dataset, fraction=fraction, seed=int(_optional(cfg, "validation.seed") or 0), part=split)
    declared = None if "num_classes" not in cfg or OmegaConf.is_missing(cfg, "num_classes") else cfg.num_classes
    if declared is not None and int(declared) != len(dataset.classes):
        raise DataError(f"data.num_classes={declared} but data.{split} has {len(dataset.classes)} classes")
    key = SPLITS[split]
    selected = parse_classes(cfg.get(key), dataset.classes)  # optional: absent means all classes
    per_class = cfg.get("train_per_class") if split == "train" else None  # optional: absent means all items
    if selected is not None or per_class is not None:
        dataset = ClassSubset(dataset, selected, per_class=per_class)
    _logger.info("data.%s: %r", split, dataset)
    return dataset
