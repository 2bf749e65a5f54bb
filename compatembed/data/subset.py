"""Class selections: the old model trains on some classes, the new one on more, and labels never move."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

from compatembed.data._common import LabeledImageDataset, Transform
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_INT = re.compile(r"^\s*\d+\s*$")


def _describe(classes: Sequence[str]) -> str:
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    return f"valid ids 0-{len(classes) - 1}, names: {shown}"


def _check_id(value: int, classes: Sequence[str], spec: Any) -> int:
    if not 0 <= value < len(classes):
        raise DataError(f"class id {value} out of range in class selection {spec!r} ({_describe(classes)})")
    return value


def _token(token: str, classes: Sequence[str], spec: Any) -> list[int]:
    """Resolve one string token: a class name (checked first), an id, or an inclusive range ``a-b``."""
    if token in classes:
        return [classes.index(token)]
    if _INT.match(token):
        return [_check_id(int(token), classes, spec)]
    m = _RANGE.match(token)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise DataError(f"empty class range {token.strip()!r} in class selection {spec!r} (start > end)")
        _check_id(hi, classes, spec)
        return list(range(lo, hi + 1))
    raise DataError(f"unknown class {token.strip()!r} in class selection {spec!r} ({_describe(classes)})")


def _item(item: Any, classes: Sequence[str], spec: Any) -> list[int]:
    if isinstance(item, (bool, np.bool_)):
        raise DataError(f"class selection {spec!r} holds a boolean; use class ids or names")
    if isinstance(item, (int, np.integer)):
        return [_check_id(int(item), classes, spec)]
    if isinstance(item, str):
        return _token(item, classes, spec)
    raise DataError(f"class selection {spec!r} holds {item!r} ({type(item).__name__}); use class ids or names")


def parse_classes(spec: Any, classes: Sequence[str]) -> list[int] | None:
    """Turn a config's class selection into sorted, unique class ids.

    Accepted forms (``classes`` gives the names and the valid id range ``0..len-1``):

    - ``None`` or ``"all"``: every class, returned as ``None``.
    - a list of ids and/or names: ``[0, 1, "cat"]``.
    - a string of comma-separated tokens, each an id, a name or an inclusive range: ``"0-4"``,
      ``"0,1,2"``, ``"airplane,cat"``. A token equal to a class name is read as that name
      (matters only for datasets whose class folders are named by numbers).
    - a mapping ``{start, stop}`` (optionally ``step``), read like ``range``: stop is exclusive.
    - a single int id.

    Args:
        spec: The selection, as written in a config (plain or OmegaConf containers).
        classes: The class names of the full dataset, in label order.

    Returns:
        Sorted unique class ids, or ``None`` for all classes.

    Raises:
        DataError: An id is out of range, a name is unknown, the form is not understood, or the
            selection is empty.
    """
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    ids: list[int] = []
    if isinstance(spec, str):
        for token in spec.split(","):
            if not token.strip():
                raise DataError(f"empty item in class selection {spec!r}")
            ids += _token(token.strip(), classes, spec)
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"start", "stop", "step"})
        if unknown or "stop" not in spec:
            raise DataError(
                f"class range {spec!r} needs keys start (default 0), stop and optional step; got {list(spec)}"
            )
        bounds = [spec.get("start", 0), spec["stop"], spec.get("step", 1)]
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in bounds) or bounds[2] == 0:
            raise DataError(f"class range {spec!r} needs integer start, stop and a non-zero step")
        ids = [_check_id(v, classes, spec) for v in range(*(int(v) for v in bounds))]
    elif isinstance(spec, Sequence):
        for item in spec:
            ids += _item(item, classes, spec)
    else:
        ids = _item(spec, classes, spec)
    if not ids:
        raise DataError(f"class selection {spec!r} selects no class")
    return sorted(set(ids))


class ItemSubset(Dataset):
    """Some items of a base dataset, by position (``indices``), sharing its images and transform.

    The common ground of :class:`ClassSubset` and :class:`~compatembed.data.holdout.HoldoutSplit`;
    :func:`~compatembed.data.array_cache.array_view` sees through it to a decoded array.
    """

    dataset: LabeledImageDataset
    indices: np.ndarray

    @property
    def transform(self) -> Transform | None:
        """The base dataset's transform; setting it sets the base's (subsets share their images)."""
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Transform | None) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[int(self.indices[index])]


class ClassSubset(ItemSubset):
    """The items of some classes of a dataset, in their original order, with their original labels.

    Labels are preserved (class 7 stays 7) and ``classes`` stays the full list, so a classifier over
    all classes, the pseudo-classifier of the old model and retrieval relevance all keep one label
    space across an upgrade. ``ids`` are the base dataset's ids: an item keeps its id in any subset.

    Args:
        dataset: A dataset with ``targets``, ``ids``, ``classes`` and ``transform``.
        classes: Which classes to keep, in any form :func:`parse_classes` accepts (``None`` keeps all).
        per_class: Keep only the first ``per_class`` items of each class, in the dataset's order
            (deterministic; for quick runs on a budget). ``None`` keeps every item.

    Attributes:
        selected_classes: Sorted class ids kept.
        indices: Positions of the kept items in ``dataset``, int64 ``(M,)``.
        targets: Labels of the kept items, int64 ``(M,)``.
        ids: Item ids of the kept items, int64 ``(M,)``.
        classes: The full class names of ``dataset``.

    Raises:
        DataError: A class id is out of range or a class name unknown.
    """

    def __init__(self, dataset: LabeledImageDataset, classes: Any, per_class: int | None = None) -> None:
        self.dataset = dataset
        self.classes: list[str] = list(dataset.classes)
        selected = parse_classes(classes, self.classes)
        self.selected_classes: list[int] = list(range(len(self.classes))) if selected is None else selected
        base_targets = np.asarray(dataset.targets, dtype=np.int64)
        self.indices: np.ndarray = np.flatnonzero(np.isin(base_targets, self.selected_classes)).astype(np.int64)
        if per_class is not None:
            if int(per_class) <= 0:
                raise DataError(f"per_class must be positive, got {per_class}")
            rank = np.zeros(len(self.indices), dtype=np.int64)  # position of each item within its class
            for c in self.selected_classes:
                members = base_targets[self.indices] == c
                rank[members] = np.arange(int(members.sum()))
            self.indices = self.indices[rank < int(per_class)]
        self.per_class = per_class
        self.targets: np.ndarray = base_targets[self.indices]
        self.ids: np.ndarray = np.asarray(dataset.ids, dtype=np.int64)[self.indices]
        empty = sorted(set(self.selected_classes) - set(np.unique(self.targets).tolist()))
        if empty:
            _logger.warning("selected classes without any item: %s", [self.classes[c] for c in empty])

    def __repr__(self) -> str:
        limit = "" if self.per_class is None else f", per_class={self.per_class}"
        return f"ClassSubset({self.dataset!r}, classes={self.selected_classes}{limit}, n={len(self)})"
