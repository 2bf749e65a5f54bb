"""Linear layers kept exactly orthogonal by parametrisation, and how far a weight is from orthogonal.

OCA's transformation layer, BT²'s two bases and the λ = 0 end of the λ-orthogonal map all use
``torch.nn.utils.parametrizations.orthogonal``; the maps it offers and the checks live here, once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

from compatembed.errors import ConfigError

ORTHOGONAL_MAPS: tuple[str, ...] = ("matrix_exp", "cayley", "householder")
"""The maps ``torch.nn.utils.parametrizations.orthogonal`` offers (``matrix_exp`` is PyTorch's default for
square matrices, and the published code bases' choice)."""


def check_orthogonal_map(orthogonal_map: str) -> str:
    """``orthogonal_map`` itself when it is one of :data:`ORTHOGONAL_MAPS`.

    Raises:
        ConfigError: an unknown map.
    """
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ConfigError(f"unknown orthogonal_map={orthogonal_map!r}; use one of {', '.join(ORTHOGONAL_MAPS)}")
    return orthogonal_map


def orthogonal_linear(dim: int, *, bias: bool, orthogonal_map: str = "matrix_exp") -> nn.Linear:
    """A ``dim × dim`` linear layer whose weight stays exactly orthogonal through optimiser steps.

    Args:
        dim: input and output width.
        bias: add a learnable bias (OCA's transformation layer has one, BT²'s bases have none).
        orthogonal_map: how free parameters map to orthogonal matrices (see :data:`ORTHOGONAL_MAPS`).

    Raises:
        ConfigError: unknown ``orthogonal_map`` or a non-positive ``dim``.
    """
    check_orthogonal_map(orthogonal_map)
    if dim < 1:
        raise ConfigError(f"an orthogonal layer needs a positive width, got {dim}")
    return parametrizations.orthogonal(nn.Linear(dim, dim, bias=bias), orthogonal_map=orthogonal_map)


@torch.no_grad()
def orthogonality_error(weight: torch.Tensor) -> float:
    """``‖WᵀW − I‖_F`` of a square matrix (0 for an exactly orthogonal one), computed in float64.

    For non-square maps and tolerances see :func:`compatembed.methods.maps.orthogonality_deviation`.
    """
    w = weight.detach().double()
    return float(torch.linalg.matrix_norm(w.T @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)))
