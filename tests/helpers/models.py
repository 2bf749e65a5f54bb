"""Tiny stand-in models for the tests."""

from __future__ import annotations

import torch
from torch import nn

from compatembed.data import Preprocessing


class TinyBackbone(nn.Module):
    """A linear "backbone" on flattened 3x4x4 images: exact, instant, and honours the backbone contract
    (``num_features``, ``preprocessing``)."""

    def __init__(self, num_features: int = 6) -> None:
        super().__init__()
        self.num_features = num_features
        self.preprocessing = Preprocessing(input_size=(3, 4, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.fc = nn.Linear(48, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))
