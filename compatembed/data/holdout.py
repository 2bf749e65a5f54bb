"""A validation split carved out of the training split: seeded, per class, never overlapping training.

Method settings (loss weights, influence scales, tolerances) must be chosen on data the final
evaluation never sees. :class:`HoldoutSplit` draws, for every class separately, a seeded fraction of
the training items as validation items; ``part="train"`` is the rest. The draw depends only on the
seed, the fraction and the items' labels and ids, so the same config always gives the same split, and
the two parts of one draw partition the split exactly.
"""

from __future__ import annotations

import numpy as np

from compatembed.data._common import LabeledImageDataset
from compatembed.data.subset import ItemSubset
from compatembed.errors import DataError

PARTS: tuple[str, ...] = ("train", "val")


def holdout_mask(targets: np.ndarray, ids: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean ``(N,)`` mask of the validation items: ``round(fraction · n_c)`` items of each class ``c``.

    Items are drawn per class with a generator seeded by ``(seed, c)``, over the class's items sorted
    by id, so the draw does not depend on the dataset's order. A class keeps at least one training item.

    Raises:
        DataError: ``fraction`` is not in (0, 1).
    """
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    targets, ids = np.asarray(targets, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    mask = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        members = members[np.argsort(ids[members], kind="stable")]
        count = min(len(members) - 1, int(round(float(fraction) * len(members))))
        if count > 0:
            chosen = np.random.default_rng([int(seed), int(c)]).choice(len(members), size=count, replace=False)
            mask[members[chosen]] = True
    return mask


class HoldoutSplit(ItemSubset):
    """One part of a seeded per-class train/validation split of a dataset.

    Labels, ids and class names are the base dataset's (like :class:`~compatembed.data.ClassSubset`).

    Args:
        dataset: The training split to carve.
        fraction: Share of each class held out for validation, in (0, 1).
        seed: Seeds the draw (independent of the training seed).
        part: ``train`` (the items left for training) or ``val`` (the held-out items).

    Attributes:
        indices: Positions of this part's items in ``dataset``, int64 ``(M,)``, in the base order.

    Raises:
        DataError: ``part`` is unknown or ``fraction`` is not in (0, 1).
    """

    def __init__(self, dataset: LabeledImageDataset, *, fraction: float, seed: int = 0, part: str = "train") -> None:
        if part not in PARTS:
            raise DataError(f"unknown split part {part!r}; known: {', '.join(PARTS)}")
        self.dataset = dataset
        self.fraction, self.seed, self.part = float(fraction), int(seed), part
        mask = holdout_mask(dataset.targets, dataset.ids, fraction=fraction, seed=seed)
        self.indices: np.ndarray = np.flatnonzero(mask if part == "val" else ~mask).astype(np.int64)
        self.classes: list[str] = list(dataset.classes)
        self.targets: np.ndarray = np.asarray(dataset.targets, dtype=np.int64)[self.indices]
        self.ids: np.ndarray = np.asarray(dataset.ids, dtype=np.int64)[self.indices]

    def __repr__(self) -> str:
        return f"HoldoutSplit({self.dataset!r}, part={self.part}, fraction={self.fraction}, seed={self.seed}, n={len(self)})"
