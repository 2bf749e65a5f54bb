"""What a method may read from its context: the training labels, one way for every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatembed.errors import DataError
from compatembed.methods.base import MethodContext


class Items:
    def __init__(self, targets=None):
        if targets is not None:
            self.targets = targets

    def __len__(self):
        return 4


def context(train_set) -> MethodContext:
    return MethodContext(train_set=train_set, eval_view=lambda pre: train_set, num_classes=10, train_classes=list(range(10)),
                         device=torch.device("cpu"))


def test_labels_come_from_targets_in_item_order():
    labels = context(Items([3, 1, 4, 1])).labels()
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1, 4, 1]
    assert context(Items(np.array([2, 7], dtype=np.int32))).labels().dtype == torch.int64


def test_a_training_set_without_targets_is_a_data_error():
    with pytest.raises(DataError, match="Items has no 'targets'"):
        context(Items()).labels()
