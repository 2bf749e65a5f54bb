"""Maps between embedding spaces: their geometry, the closed-form fits, and what every map fit shares.

λ-orthogonality (Ricci et al., NeurIPS 2025, :mod:`compatembed.methods.lambda_orth`) restores compatibility
*post hoc* with an affine map ``B(x) = W x + b`` from the new space into the old one. The two ends of its
tolerance λ are closed forms, kept here so tools and tests can compare against them:

* λ = 0: an orthogonal W (Procrustes, :func:`procrustes`), which keeps the new space's geometry;
* λ = ∞: a free affine map (least squares, :func:`least_squares_affine`), which adapts to the data
  but distorts the space.

Orthogonality of a non-square ``W`` (d_out, d_in) means orthonormal columns when ``d_in <= d_out`` and
orthonormal rows otherwise, so every deviation measure here uses the smaller Gram matrix
(``WᵀW`` or ``WWᵀ``, size ``min(d_in, d_out)``); for a square W it is ``‖WᵀW − I‖_F``.

:func:`mean_cosine`, :func:`shuffled_batches` and :func:`first_last_means` serve both iterative fits
(the λ-orthogonal map and FCT's forward map, :mod:`compatembed.methods.fct`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compatembed.errors import ConfigError
from compatembed.models.orthogonal import check_orthogonal_map, make_orthogonal

DEVIATIONS = ("gram", "spectral")
"""Deviation-from-orthogonality measures: ``gram`` = ‖G − I‖_F, ``spectral`` = max_i |σ_i − 1|."""


# -- deviation from orthogonality ---------------------------------------------------------------
def _small_gram(weight: torch.Tensor) -> torch.Tensor:
    """``WᵀW`` when W (d_out, d_in) can have orthonormal columns (d_in <= d_out), else ``WWᵀ``."""
    return weight.mT @ weight if weight.shape[-1] <= weight.shape[-2] else weight @ weight.mT


def gram_deviation(weight: torch.Tensor) -> torch.Tensor:
    """‖G − I‖_F with G the smaller Gram matrix of ``weight`` (d_out, d_in); 0 iff W is (semi-)orthogonal."""
    gram = _small_gram(weight)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye)


def spectral_deviation(weight: torch.Tensor) -> torch.Tensor:
    """max_i |σ_i(W) − 1| over the min(d_out, d_in) singular values; 0 iff W is (semi-)orthogonal."""
    return (torch.linalg.svdvals(weight) - 1).abs().max()


def orthogonality_deviation(weight: torch.Tensor, measure: str = "gram") -> torch.Tensor:
    """The deviation of ``weight`` from (semi-)orthogonality under ``measure`` (see :data:`DEVIATIONS`).

    Raises:
        ConfigError: unknown measure.
    """
    if measure == "gram":
        return gram_deviation(weight)
    if measure == "spectral":
        return spectral_deviation(weight)
    raise ConfigError(f"unknown orthogonality deviation measure {measure!r}; known: {', '.join(DEVIATIONS)}")


def orthogonality_penalty(weight: torch.Tensor, tolerance: float, measure: str = "gram") -> torch.Tensor:
    """Squared hinge on the deviation beyond the tolerance λ: exactly 0 (and flat) inside it.

    * ``gram``: ``max(0, ‖G − I‖_F − λ)²``.
    * ``spectral``: ``Σ_i max(0, |σ_i − 1| − λ)²``, zero iff every singular value lies in [1 − λ, 1 + λ]
      (each singular value outside the band is pushed back, not only the worst one).

    Args:
        weight: (d_out, d_in) map weight.
        tolerance: λ >= 0.
        measure: one of :data:`DEVIATIONS`.

    Returns:
        A scalar tensor, differentiable in ``weight``.
    """
    if tolerance < 0:
        raise ConfigError(f"orthogonality tolerance must be >= 0, got {tolerance}")
    if measure == "gram":
        return F.relu(gram_deviation(weight) - tolerance).square()
    if measure == "spectral":
        return F.relu((torch.linalg.svdvals(weight) - 1).abs() - tolerance).square().sum()
    raise ConfigError(f"unknown orthogonality deviation measure {measure!r}; known: {', '.join(DEVIATIONS)}")


# -- closed forms -------------------------------------------------------------------------------
def centring_means(x: torch.Tensor, y: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The means of ``x`` and ``y`` with ``center``, else zero vectors of their widths."""
    if center:
        return x.mean(0), y.mean(0)
    return x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])


@torch.no_grad()
def procrustes(x: torch.Tensor, y: torch.Tensor, *, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (semi-)orthogonal W minimising ‖W x_i + b − y_i‖² summed over pairs: the λ = 0 end.

    With ``M = Σ (y_i − ȳ)(x_i − x̄)ᵀ = U S Vᵀ`` (reduced SVD) the solution is ``W = U Vᵀ``; with
    ``center`` the means are removed first and ``b = ȳ − W x̄``, else ``b = 0``.

    Args:
        x: (N, d_in) source vectors.
        y: (N, d_out) target vectors.
        center: fit on centred data and return the implied bias.

    Returns:
        ``(W, b)``: (d_out, d_in) and (d_out,), float64.
    """
    x, y = x.double(), y.double()
    mx, my = centring_means(x, y, center)
    u, _, vh = torch.linalg.svd((y - my).mT @ (x - mx), full_matrices=False)
    weight = u @ vh
    return weight, my - weight @ mx


@torch.no_grad()
def least_squares_affine(x: torch.Tensor, y: torch.Tensor, *, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The free map minimising ‖W x_i + b − y_i‖² (least squares): the λ = ∞ end.

    Args:
        x: (N, d_in) source vectors.
        y: (N, d_out) target vectors.
        bias: fit an intercept b (else b = 0, a linear map).

    Returns:
        ``(W, b)``: (d_out, d_in) and (d_out,), float64.
    """
    device = x.device
    x, y = x.double().cpu(), y.double().cpu()
    design = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x
    # on the CPU, where the gelsd driver (SVD) copes with collinear features; CUDA offers only full-rank gels
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution  # (d_in [+1], d_out)
    weight = solution[: x.shape[1]].mT.contiguous()
    b = solution[x.shape[1]] if bias else y.new_zeros(y.shape[1])
    return weight.to(device), b.to(device)


# -- the map module -----------------------------------------------------------------------------
class AffineMap(nn.Module):
    """``B(x) = W (x − μ_in) + μ_out + b``: the map λ-orthogonality fits (float64 parameters).

    Args:
        in_dim: d_in (the new model's embedding size).
        out_dim: d_out (the old model's embedding size).
        orthogonal_weight: keep W exactly (semi-)orthogonal through
            ``torch.nn.utils.parametrizations.orthogonal`` (the λ = 0 case).
        orthogonal_map: any of :data:`compatembed.models.orthogonal.ORTHOGONAL_MAPS` (only with ``orthogonal_weight``).
        bias: learn a free bias b (else there is no b: exactly zero).
        in_mean / out_mean: fixed centring vectors μ_in (d_in,) and μ_out (d_out,) (default zeros).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        orthogonal_weight: bool = False,
        orthogonal_map: str = "matrix_exp",
        bias: bool = False,
        in_mean: torch.Tensor | None = None,
        out_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_orthogonal_map(orthogonal_map)
        self.linear = nn.Linear(in_dim, out_dim, bias=False, dtype=torch.float64)
        self.orthogonal_weight = orthogonal_weight
        if orthogonal_weight:
            make_orthogonal(self.linear, orthogonal_map)
        self.bias = nn.Parameter(torch.zeros(out_dim, dtype=torch.float64)) if bias else None
        self.register_buffer("in_mean", torch.zeros(in_dim, dtype=torch.float64) if in_mean is None else in_mean.double().clone())
        self.register_buffer(
            "out_mean", torch.zeros(out_dim, dtype=torch.float64) if out_mean is None else out_mean.double().clone()
        )

    @property
    def weight(self) -> torch.Tensor:
        """W, (d_out, d_in) float64 (recomputed from the parametrisation when orthogonal)."""
        return self.linear.weight

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set W; with the orthogonal parametrisation W must itself be (semi-)orthogonal."""
        weight = weight.to(self.linear.weight)
        if self.orthogonal_weight:
            # the parametrisation completes a non-square W with random columns: keep that reproducible
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(0)
                self.linear.weight = weight
        else:
            self.linear.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) → (N, d_out), float64, not normalised."""
        out = self.linear(x.double() - self.in_mean) + self.out_mean
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def exported(self) -> tuple[np.ndarray, np.ndarray]:
        """The map as plain arrays: ``weight`` (d_out, d_in) and ``bias`` (d_out,) with B(x) = weight @ x + bias."""
        weight = self.weight.detach()
        bias = self.out_mean - weight @ self.in_mean
        if self.bias is not None:
            bias = bias + self.bias.detach()
        return weight.cpu().numpy().astype(np.float32), bias.cpu().numpy().astype(np.float32)


# -- what the iterative fits share -------------------------------------------------------------
def cross_supervised_contrastive(
    mapped: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss from mapped vectors (anchors) to the target space's vectors of the batch.

    Shared by the λ-orthogonal map (new → old) and FCT's forward map (old → new): besides matching each
    item's own target, the map is pulled toward the targets of its class.

    For anchor i, the positives are the target vectors of the batch with label y_i (its own pair
    included); ``−mean_{p ∈ P(i)} log softmax_j(cos(B(x_i), y_j) / τ)[p]``, averaged over anchors.

    Args:
        mapped: (B, d) mapped vectors (normalised here).
        target: (B, d) target-space vectors of the same items.
        labels: (B,) class ids.
        temperature: τ > 0.
    """
    if temperature <= 0:
        raise ConfigError(f"supervised contrastive temperature must be > 0, got {temperature}")
    logits = F.normalize(mapped, dim=1) @ F.normalize(target.to(mapped.dtype), dim=1).mT / temperature
    positives = (labels[:, None] == labels[None, :]).to(logits.dtype)
    log_prob = logits.log_softmax(dim=1)
    return -((log_prob * positives).sum(1) / positives.sum(1)).mean()


@torch.no_grad()
def mean_cosine(x: torch.Tensor, y: torch.Tensor, transform: Any = None, *, chunk: int = 65536) -> float:
    """Mean cosine of paired rows ``(transform(x_i), y_i)``, truncated to the smaller dim (the protocol's rule).

    Args:
        x: (N, d_x) vectors (mapped by ``transform`` first when given, chunk by chunk).
        y: (N, d_y) vectors.
        transform: optional callable (n, d_x) → (n, d); None keeps x.
    """
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        a = x[start : start + chunk]
        a = (transform(a) if transform is not None else a).double()
        b = y[start : start + chunk].double()
        d = min(a.shape[1], b.shape[1])
        total += float(F.cosine_similarity(a[:, :d], b[:, :d], dim=1).sum())
    return total / max(1, x.shape[0])


def shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches of size min(batch_size, n), one shuffled pass after another (no ragged batch)."""
    size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            if done == steps:
                return
            yield perm[start : start + size]
            done += 1


def first_last_means(history: dict[str, list[float]], window: int) -> tuple[dict[str, float], dict[str, float]]:
    """Mean of each term over its first and its last ``window`` steps (did the fit lower it?)."""
    first = {k: float(np.mean(v[:window])) for k, v in history.items() if v}
    last = {k: float(np.mean(v[-window:])) for k, v in history.items() if v}
    return first, last
