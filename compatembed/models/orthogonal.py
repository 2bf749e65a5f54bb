"""Linear layers kept exactly orthogonal by parametrisation, and how far a weight is from orthogonal.

OCA's transformation layer, BT²'s two bases and the λ = 0 end of the λ-orthogonal map all need an
orthogonal matrix; every way of getting one lives here, chosen by ``orthogonal_map``:

========================  ===========================  =============================  =========================
``orthogonal_map``        free parameters (n × n)       cost of forming Q              reaches
========================  ===========================  =============================  =========================
``matrix_exp``            n² (n(n−1)/2 used)            O(n³): a matrix exponential    all of SO(n)
``cayley``                n² (n(n−1)/2 used)            O(n³): a linear solve          SO(n) without −1 eigenvalues
``householder``           n² (n(n−1)/2 used)            O(n³)                          all of O(n)
``givens[:L]``            L·⌊n/2⌋ angles                O(L·n²): L layers of rotations all of SO(n) at L = n−1
``butterfly[:m]``         m·⌊n/2⌋ angles                O(m·n²)                        a subset (n log n params)
``householder_chain[:L]`` L·n                           O(L·n²): L rank-1 updates      products of L reflections
========================  ===========================  =============================  =========================

The first three are ``torch.nn.utils.parametrizations.orthogonal`` (``matrix_exp`` is PyTorch's default
for square matrices and the published code bases' choice). The other three are the seed papers'
parametrisations that scale better, as ``W = (Q₀ · R(θ))[:out, :in]``: a fixed orthogonal base ``Q₀``
(a random orthogonal matrix at creation, or the weight assigned to the layer, completed to a square
orthogonal matrix) times a learned rotation ``R(θ)`` that is the identity at θ = 0:

* ``givens``: parallel Givens rotation layers (quasi-Givens orthogonal fine-tuning), each layer
  rotating ⌊n/2⌋ disjoint coordinate pairs, the pairs of successive layers following a round-robin
  schedule so that n − 1 layers (the default) meet every pair once;
* ``butterfly``: BOFT's butterfly factorisation with 2 × 2 blocks, factor k rotating the pairs
  (i, i xor 2^k); the default m = ⌈log₂ n⌉ is one full butterfly;
* ``householder_chain``: a chain of L Householder reflections (HRA), started as L/2 pairs of equal
  reflections so that the chain is the identity (L even; default 8).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from compatembed.errors import ConfigError

TORCH_MAPS: tuple[str, ...] = ("matrix_exp", "cayley", "householder")
"""The maps ``torch.nn.utils.parametrizations.orthogonal`` offers."""
ROTATION_MAPS: tuple[str, ...] = ("givens", "butterfly", "householder_chain")
"""The base-times-rotation maps of this module; each takes an optional length (``givens:16``)."""
ORTHOGONAL_MAPS: tuple[str, ...] = TORCH_MAPS + ROTATION_MAPS
"""Every accepted ``orthogonal_map`` name."""


def _split(orthogonal_map: str) -> tuple[str, int | None]:
    name, _, length = str(orthogonal_map).partition(":")
    if name not in ORTHOGONAL_MAPS or (length and (name in TORCH_MAPS or not length.isdigit() or int(length) < 1)):
        raise ConfigError(
            f"unknown orthogonal_map={orthogonal_map!r}; use one of {', '.join(ORTHOGONAL_MAPS)} "
            f"({', '.join(ROTATION_MAPS)} take an optional positive length, e.g. givens:16)"
        )
    return name, int(length) if length else None


def check_orthogonal_map(orthogonal_map: str) -> str:
    """``orthogonal_map`` itself when it names a map of :data:`ORTHOGONAL_MAPS` (with a valid length).

    Raises:
        ConfigError: an unknown map, a length on a map that takes none, or a bad length.
    """
    name, length = _split(orthogonal_map)
    if name == "householder_chain" and length is not None and length % 2:
        raise ConfigError(f"orthogonal_map={orthogonal_map!r}: the chain length must be even (it starts as pairs "
                          "of equal reflections, the identity)")
    return orthogonal_map


# -- rotations that are the identity at θ = 0 ----------------------------------------------------
def round_robin_pairs(n: int) -> list[tuple[list[int], list[int]]]:
    """n − 1 (n even) or n (n odd) layers of disjoint pairs in which every pair of 0..n−1 appears once.

    The circle method: index 0 stays, the others rotate; an odd n gets a dummy partner that is skipped.
    """
    m = n + (n % 2)
    ring = list(range(1, m))
    layers = []
    for _ in range(m - 1):
        order = [0, *ring]
        a, b = [], []
        for i in range(m // 2):
            p, q = order[i], order[m - 1 - i]
            if p < n and q < n:
                a.append(p)
                b.append(q)
        layers.append((a, b))
        ring = ring[-1:] + ring[:-1]
    return layers


def butterfly_pairs(n: int, factors: int) -> list[tuple[list[int], list[int]]]:
    """``factors`` butterfly layers: factor k pairs i with i xor 2^(k mod ⌈log₂ n⌉) (partners beyond n skipped)."""
    levels = max(1, math.ceil(math.log2(max(n, 2))))
    layers = []
    for f in range(factors):
        stride = 1 << (f % levels)
        a = [i for i in range(n) if not i & stride and i + stride < n]
        layers.append((a, [i + stride for i in a]))
    return layers


class PairRotations(nn.Module):
    """``R(θ)``: a product of layers, each rotating disjoint coordinate pairs (a, b) by its own angles."""

    def __init__(self, n: int, layers: list[tuple[list[int], list[int]]], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n = n
        for i, (a, b) in enumerate(layers):
            self.register_buffer(f"a{i}", torch.tensor(a, dtype=torch.long), persistent=False)
            self.register_buffer(f"b{i}", torch.tensor(b, dtype=torch.long), persistent=False)
        self.num_layers = len(layers)
        self.angles = nn.Parameter(torch.zeros(sum(len(a) for a, _ in layers), dtype=dtype))

    def apply_to(self, m: torch.Tensor) -> torch.Tensor:
        """``m · R(θ)`` for an (r, n) matrix ``m``, out of place (autograd-friendly)."""
        start = 0
        for i in range(self.num_layers):
            a, b = getattr(self, f"a{i}"), getattr(self, f"b{i}")
            theta = self.angles[start:start + len(a)]
            start += len(a)
            if len(a) == 0:
                continue
            c, s = torch.cos(theta).to(m.dtype), torch.sin(theta).to(m.dtype)
            ma, mb = m[:, a], m[:, b]
            m = m.index_copy(1, a, c * ma - s * mb).index_copy(1, b, s * ma + c * mb)
        return m


class HouseholderChain(nn.Module):
    """``R(V) = H(v₁) ⋯ H(v_L)`` with ``H(v) = I − 2vvᵀ/‖v‖²``; starts as L/2 pairs of equal reflections (= I)."""

    def __init__(self, n: int, length: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if length % 2:
            raise ConfigError(f"a Householder chain starts as pairs of equal reflections: its length must be even, "
                              f"got {length}")
        half = torch.randn(length // 2, n, dtype=dtype)
        self.vectors = nn.Parameter(half.repeat_interleave(2, dim=0))

    def apply_to(self, m: torch.Tensor) -> torch.Tensor:
        """``m · R(V)`` for an (r, n) matrix ``m``."""
        for v in self.vectors.to(m.dtype):
            m = m - (2.0 / v.dot(v)) * torch.outer(m @ v, v)
        return m


def _complete(w: torch.Tensor) -> torch.Tensor:
    """A square orthogonal matrix whose top-left block is the (semi-)orthogonal ``w`` (its nearest one first)."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    w = u @ vh  # the nearest (semi-)orthogonal matrix (polar factor); ``w`` itself when already orthogonal
    out, inp = w.shape
    if out == inp:
        return w
    if out < inp:  # orthonormal rows: add an orthonormal basis of their complement as rows
        q, _ = torch.linalg.qr(w.T, mode="complete")
        return torch.cat([w, q[:, out:].T], dim=0)
    q, _ = torch.linalg.qr(w, mode="complete")
    return torch.cat([w, q[:, inp:]], dim=1)


class BaseTimesRotation(nn.Module):
    """The parametrisation ``W = (Q₀ · R)[:out, :in]``; ``Q₀`` is the (frozen) original tensor of ``parametrize``.

    Assigning a weight (``layer.weight = W``) stores its completion as ``Q₀`` and resets ``R`` to the
    identity, so the layer then computes exactly ``W`` (its nearest orthogonal matrix if it was not one).
    """

    def __init__(self, shape: tuple[int, int], rotation: nn.Module) -> None:
        super().__init__()
        self.shape = shape
        self.rotation = rotation

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        out, inp = self.shape
        return self.rotation.apply_to(base)[:out, :inp]

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if tuple(w.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {self.shape}, got {tuple(w.shape)}")
        if isinstance(self.rotation, PairRotations):
            self.rotation.angles.zero_()
        else:
            half = self.rotation.vectors[::2].clone()
            self.rotation.vectors.copy_(half.repeat_interleave(2, dim=0))
        return _complete(w).to(w)


def make_orthogonal(layer: nn.Module, orthogonal_map: str = "matrix_exp", name: str = "weight") -> nn.Module:
    """Parametrise ``layer.<name>`` (a 2-D weight) so that it stays exactly (semi-)orthogonal through optimiser steps.

    Raises:
        ConfigError: an unknown ``orthogonal_map`` (see :data:`ORTHOGONAL_MAPS`).
    """
    check_orthogonal_map(orthogonal_map)
    kind, length = _split(orthogonal_map)
    if kind in TORCH_MAPS:
        return parametrizations.orthogonal(layer, name, orthogonal_map=kind)
    weight = getattr(layer, name)
    out, inp = weight.shape
    n = max(out, inp)
    if kind == "givens":
        layers = round_robin_pairs(n)
        rotation: nn.Module = PairRotations(n, [layers[i % len(layers)] for i in range(length or len(layers))],
                                            dtype=weight.dtype)
    elif kind == "butterfly":
        rotation = PairRotations(n, butterfly_pairs(n, length or max(1, math.ceil(math.log2(max(n, 2))))),
                                 dtype=weight.dtype)
    else:
        rotation = HouseholderChain(n, length or 8, dtype=weight.dtype)
    parametrize.register_parametrization(layer, name, BaseTimesRotation((out, inp), rotation.to(weight.device)))
    getattr(layer.parametrizations, name).original.requires_grad_(False)  # Q₀ is fixed: only R(θ) learns
    return layer


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
    return make_orthogonal(nn.Linear(dim, dim, bias=bias), orthogonal_map)  # type: ignore[return-value]


def trainable_parameters(layer: nn.Module) -> int:
    """How many numbers an optimiser updates in ``layer`` (a frozen base ``Q₀`` does not count)."""
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


def decay_free_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The free parameters of ``module``'s orthogonal layers that weight decay would break rather than regularise.

    Why: ``torch``'s ``householder`` map keeps the signs of Q's columns on the diagonal of its free matrix and
    reads them through a cast to int, so any shrinkage of that diagonal (Adam's L2 decay moves it by about the
    learning rate on the first step) makes Q the zero matrix; a ``householder_chain``'s reflections do not
    depend on the length of their vectors, so decay only shrinks them toward the 2/‖v‖² singularity. The
    other maps' free parameters decay toward the starting matrix, as in the published code (matrix_exp),
    and are not listed. The training loop gives the listed parameters no weight decay.
    """
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if not parametrize.is_parametrized(sub):
            continue
        for plist in sub.parametrizations.values():
            for p in plist:
                kind = getattr(p, "orthogonal_map", None)  # torch's orthogonal parametrisation
                if kind is not None and getattr(kind, "name", None) == "householder":
                    found[id(plist.original)] = plist.original
                elif isinstance(p, BaseTimesRotation) and isinstance(p.rotation, HouseholderChain):
                    found[id(p.rotation.vectors)] = p.rotation.vectors
    return list(found.values())


@torch.no_grad()
def orthogonality_error(weight: torch.Tensor) -> float:
    """``‖WᵀW − I‖_F`` of a square matrix (0 for an exactly orthogonal one), computed in float64.

    For non-square maps and tolerances see :func:`compatembed.methods.maps.orthogonality_deviation`.
    """
    w = weight.detach().double()
    return float(torch.linalg.matrix_norm(w.T @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)))
