"""Maps between embedding spaces fitted after training, and the base of the methods that fit one.

λ-orthogonality (Ricci et al., NeurIPS 2025) restores compatibility *post hoc*: the new model keeps its
own space and an affine map ``B(x) = W x + b`` takes its vectors into the old space. The two ends of
its tolerance λ are closed forms, kept here so tools and tests can compare against them:

* λ = 0: an orthogonal W (Procrustes, :func:`procrustes`), which keeps the new space's geometry;
* λ = ∞: a free affine map (least squares, :func:`least_squares_affine`), which adapts to the data
  but distorts the space.

In between, :func:`fit_lambda_orthogonal` starts from Procrustes and minimises ``1 − cos(B(x_new), x_old)``
plus ``μ · max(0, dev(W) − λ)²``: W is pulled back toward orthogonality only beyond the tolerance λ.

Orthogonality of a non-square ``W`` (d_out, d_in) means orthonormal columns when ``d_in <= d_out`` and
orthonormal rows otherwise, so every deviation measure here uses the smaller Gram matrix
(``WᵀW`` or ``WWᵀ``, size ``min(d_in, d_out)``); for a square W it is ``‖WᵀW − I‖_F``.

:class:`PostHocMapMethod` is what λ-orthogonality and FCT share: a new model trained independently in
the run (cross-entropy, like ``Independent``) or loaded from ``new_version``, the frozen old model,
and cached un-augmented training features of both for the fit in ``finalize``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from compatembed.errors import ConfigError
from compatembed.methods.base import Method, MethodContext, freeze
from compatembed.methods.independent import check_classifier_input, classification_step
from compatembed.models.heads import Classifier
from compatembed.models.version import LoadedVersion, load_model_version

_logger = logging.getLogger(__name__)

DEVIATIONS = ("gram", "spectral")
"""Deviation-from-orthogonality measures: ``gram`` = ‖G − I‖_F, ``spectral`` = max_i |σ_i − 1|."""
ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")
"""The maps ``torch.nn.utils.parametrizations.orthogonal`` offers."""
OBJECTIVES = ("cosine", "mse")
"""Alignment objectives: ``cosine`` = mean 1 − cos(B(x), y); ``mse`` = mean ‖B(x) − y‖²."""


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
def _means(x: torch.Tensor, y: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
    mx, my = _means(x, y, center)
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
        orthogonal_map: ``matrix_exp`` | ``cayley`` | ``householder`` (only with ``orthogonal_weight``).
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
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ConfigError(f"unknown orthogonal_map {orthogonal_map!r}; known: {', '.join(ORTHOGONAL_MAPS)}")
        self.linear = nn.Linear(in_dim, out_dim, bias=False, dtype=torch.float64)
        self.orthogonal_weight = orthogonal_weight
        if orthogonal_weight:
            orthogonal(self.linear, orthogonal_map=orthogonal_map)
        self.bias = nn.Parameter(torch.zeros(out_dim, dtype=torch.float64)) if bias else None
        self.register_buffer("in_mean", torch.zeros(in_dim, dtype=torch.float64) if in_mean is None else in_mean.double().clone())
        self.register_buffer("out_mean", torch.zeros(out_dim, dtype=torch.float64) if out_mean is None else out_mean.double().clone())

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


# -- loss terms ---------------------------------------------------------------------------------
def alignment_loss(mapped: torch.Tensor, target: torch.Tensor, objective: str = "cosine") -> torch.Tensor:
    """Mean ``1 − cos(mapped_i, target_i)`` (``cosine``) or mean ``‖mapped_i − target_i‖²`` (``mse``)."""
    if objective == "cosine":
        return (1 - F.cosine_similarity(mapped, target.to(mapped.dtype), dim=1)).mean()
    if objective == "mse":
        return (mapped - target.to(mapped.dtype)).square().sum(1).mean()
    raise ConfigError(f"unknown alignment objective {objective!r}; known: {', '.join(OBJECTIVES)}")


def cross_supervised_contrastive(
    mapped: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss from mapped new vectors (anchors) to old vectors of the batch.

    For anchor i, the positives are the old vectors of the batch with label y_i (its own pair
    included); ``−mean_{p ∈ P(i)} log softmax_j(cos(B(x_i), y_j) / τ)[p]``, averaged over anchors.

    Args:
        mapped: (B, d) mapped new vectors (normalised here).
        target: (B, d) old vectors of the same items.
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


# -- λ-orthogonal fit ---------------------------------------------------------------------------
@dataclass
class LambdaOrthFit:
    """A fitted λ-orthogonal map and what the fit measured.

    Attributes:
        map: the fitted :class:`AffineMap` (eval mode, float64).
        tolerance: λ (``math.inf`` for the free affine end).
        history: per-step values of each weighted loss term (``align``, ``orth``, ``supcon``).
        facts: JSON-ready summary (λ, spectrum, deviation, train alignment before/after, ...).
    """

    map: AffineMap
    tolerance: float
    history: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def parse_tolerance(value: float | str | None) -> float:
    """λ from config: a float >= 0, or None / "inf" for ∞."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "none", "null")):
        return math.inf
    tol = float(value)
    if tol < 0 or math.isnan(tol):
        raise ConfigError(f"lambda_orth tolerance (λ) must be >= 0 or null (∞), got {value!r}")
    return tol


def fit_lambda_orthogonal(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tolerance: float | str | None = 1.0,
    penalty_weight: float = 10.0,
    deviation: str = "gram",
    bias: bool = False,
    center: bool = False,
    objective: str = "cosine",
    alignment_weight: float = 1.0,
    supcon_weight: float = 0.0,
    temperature: float = 0.1,
    orthogonal_map: str = "matrix_exp",
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LambdaOrthFit:
    """Fit ``B(x) = W x + b`` from the new space (x) to the old space (y) with tolerance λ on W's orthogonality.

    * λ = 0: W stays exactly (semi-)orthogonal through the orthogonal parametrisation, initialised at the
      Procrustes solution; Adam then minimises the alignment (``steps = 0`` returns Procrustes itself).
    * 0 < λ < ∞: W is free, initialised at Procrustes; Adam minimises
      ``alignment_weight·align + penalty_weight·max(0, dev(W) − λ)² + supcon_weight·supcon``.
    * λ = ∞ (``None``): the closed-form least-squares map (the other end; no iterative terms).

    Args:
        x: (N, d_in) new-model features of the training items (L2-normalised).
        y: (N, d_out) old-model features of the same items (L2-normalised).
        labels: (N,) class ids; needed only when ``supcon_weight > 0``.
        tolerance: λ >= 0, or None / ``"inf"`` for ∞.
        penalty_weight: μ, the weight of the squared hinge.
        deviation: ``gram`` (‖G − I‖_F) or ``spectral`` (singular values outside [1 − λ, 1 + λ]).
        bias: learn a free bias b (off by default: a shared offset added to every query erodes ranking).
        center: centre both feature sets (Procrustes / least squares on centred data); the exported
            bias then holds ``μ_out − W μ_in``.
        objective: ``cosine`` (1 − cos) or ``mse`` for the alignment term.
        alignment_weight: weight of the alignment term.
        supcon_weight: weight of the supervised contrastive term (0: off).
        temperature: τ of the supervised contrastive term.
        orthogonal_map: parametrisation used at λ = 0.
        steps / batch_size / lr: Adam on mini-batches (cosine-annealed learning rate).
        seed: seeds the batch order.
        device: where the fit runs.

    Returns:
        A :class:`LambdaOrthFit`.
    """
    tol = parse_tolerance(tolerance)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ConfigError(f"map fit needs paired (N, d) features with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    if deviation not in DEVIATIONS:
        raise ConfigError(f"unknown orthogonality deviation measure {deviation!r}; known: {', '.join(DEVIATIONS)}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown alignment objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if supcon_weight > 0 and labels is None:
        raise ConfigError("lambda_orth supcon_weight > 0 needs the training labels")
    device = torch.device(device)
    started = time.perf_counter()
    x, y = x.to(device), y.to(device)
    x64, y64 = x.double(), y.double()  # the closed forms and the map run in float64
    mx, my = _means(x64, y64, center)
    w0, _ = procrustes(x64, y64, center=center)
    d_in, d_out = x.shape[1], y.shape[1]

    history: dict[str, list[float]] = {}
    if math.isinf(tol):
        weight, b = least_squares_affine(x64 - mx, y64 - my, bias=bias)
        fitted = AffineMap(d_in, d_out, bias=bias, in_mean=mx.cpu(), out_mean=my.cpu())
        fitted.set_weight(weight)
        if fitted.bias is not None:
            with torch.no_grad():
                fitted.bias.copy_(b)
        fitted.to(device)
        if supcon_weight > 0:
            _logger.warning("lambda_orth: λ = ∞ is the closed-form least-squares map; supcon_weight is not used")
    else:
        fitted = AffineMap(
            d_in, d_out, orthogonal_weight=tol == 0, orthogonal_map=orthogonal_map, bias=bias, in_mean=mx.cpu(), out_mean=my.cpu()
        )
        fitted.set_weight(w0.cpu())  # on the CPU: a non-square orthogonal W is completed with seeded CPU noise
        fitted.to(device)
        history = _optimise(
            fitted, x, y, labels.to(device) if labels is not None else None,
            tolerance=tol, penalty_weight=penalty_weight, deviation=deviation, objective=objective,
            alignment_weight=alignment_weight, supcon_weight=supcon_weight, temperature=temperature,
            steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        )
    fitted.eval().requires_grad_(False)

    with torch.no_grad():
        weight = fitted.weight.detach()
        sv = torch.linalg.svdvals(weight).cpu().numpy()
        facts: dict[str, Any] = {
            "tolerance": None if math.isinf(tol) else tol,
            "penalty_weight": penalty_weight,
            "deviation_measure": deviation,
            "bias": bias,
            "center": center,
            "objective": objective,
            "orthogonal_map": orthogonal_map if tol == 0 else None,
            "fit": "least_squares" if math.isinf(tol) else ("orthogonal" if tol == 0 else "relaxed_orthogonal"),
            "steps": 0 if math.isinf(tol) else int(steps),
            "singular_values": {"min": float(sv.min()), "max": float(sv.max()), "values": [round(float(s), 6) for s in sv]},
            "gram_deviation": float(gram_deviation(weight)),
            "spectral_deviation": float(spectral_deviation(weight)),
            "train_alignment": {
                "raw": mean_cosine(x, y),
                "procrustes": mean_cosine(x64, y64, lambda a: (a - mx) @ w0.mT + my),
                "fitted": mean_cosine(x, y, fitted),
            },
            "fit_seconds": round(time.perf_counter() - started, 3),
        }
    if history:
        first, last = first_last_means(history, max(1, min(50, len(next(iter(history.values()))) // 10)))
        facts["loss_first"], facts["loss_last"] = first, last
    _logger.info(
        "λ-orthogonal map (λ=%s): ‖G−I‖_F %.4f, σ in [%.3f, %.3f], train cos %.4f → %.4f",
        facts["tolerance"], facts["gram_deviation"], sv.min(), sv.max(),
        facts["train_alignment"]["procrustes"], facts["train_alignment"]["fitted"],
    )
    return LambdaOrthFit(map=fitted, tolerance=tol, history=history, facts=facts)


def lambda_orth_terms(
    fitted: AffineMap,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    tolerance: float,
    penalty_weight: float,
    deviation: str = "gram",
    objective: str = "cosine",
    alignment_weight: float = 1.0,
    supcon_weight: float = 0.0,
    temperature: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of the λ-orthogonal fit on one batch (summed by the caller).

    Args:
        fitted: the map being fitted.
        x: (B, d_in) new features; y: (B, d_out) old features; labels: (B,) (for ``supcon``).
        tolerance / penalty_weight / deviation: the hinge ``penalty_weight · max(0, dev(W) − λ)²``
            (omitted at λ = 0, where W is orthogonal by construction).
        objective / alignment_weight: the alignment term.
        supcon_weight / temperature: the supervised contrastive term (omitted at weight 0).

    Returns:
        ``{"align": ..., "orth": ..., "supcon": ...}`` (scalars, each already multiplied by its weight).
    """
    with parametrize.cached():
        mapped = fitted(x)
        terms = {"align": alignment_weight * alignment_loss(mapped, y, objective)}
        if tolerance > 0:
            terms["orth"] = penalty_weight * orthogonality_penalty(fitted.weight, tolerance, deviation)
        if supcon_weight > 0:
            if labels is None:
                raise ConfigError("lambda_orth supcon_weight > 0 needs the training labels")
            terms["supcon"] = supcon_weight * cross_supervised_contrastive(mapped, y, labels, temperature)
    return terms


def _optimise(
    fitted: AffineMap,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    tolerance: float,
    penalty_weight: float,
    deviation: str,
    objective: str,
    alignment_weight: float,
    supcon_weight: float,
    temperature: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, list[float]]:
    """Adam on the map's parameters; returns per-step values of each weighted term."""
    history: dict[str, list[float]] = {"align": []}
    if tolerance > 0:
        history["orth"] = []
    if supcon_weight > 0:
        history["supcon"] = []
    if steps <= 0:
        return {}
    params = [p for p in fitted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    fitted.train()
    for index in shuffled_batches(x.shape[0], batch_size, steps, generator):
        index = index.to(x.device)
        xb, yb = x[index], y[index]
        terms = lambda_orth_terms(
            fitted, xb, yb, labels[index] if labels is not None else None,
            tolerance=tolerance, penalty_weight=penalty_weight, deviation=deviation, objective=objective,
            alignment_weight=alignment_weight, supcon_weight=supcon_weight, temperature=temperature,
        )
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in terms.items():
            history[name].append(float(value.detach()))
    return history


# -- the methods' shared scaffolding -------------------------------------------------------------
class PostHocMapMethod(Method):
    """A new model trained independently (or loaded) plus a map to/from the old space fitted in ``finalize``.

    Without ``new_version`` the run trains the new model with cross-entropy through its own linear
    classifier, exactly like ``Independent`` (both call
    :func:`~compatembed.methods.independent.classification_step`); with ``new_version`` the new
    model's weights come from that version directory in :meth:`setup`, it is frozen (its hash is
    checked like the old model's), and the run trains nothing (``trainer.epochs=0``): only the map
    is fitted.

    Args:
        model: the new embedding model (its architecture must match ``new_version`` when given).
        num_classes: size of the label space.
        old_version: the deployed old model version directory (required).
        new_version: a trained new model version directory to adopt instead of training one.
        label_smoothing: label smoothing of the cross-entropy (in-run training).
        classifier_input: what the in-run classifier reads: ``raw`` or ``normalized`` (as ``Independent``).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        new_version: str | None = None,
        label_smoothing: float = 0.1,
        classifier_input: str = "raw",
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        self.label_smoothing = float(label_smoothing)
        self.classifier_input = check_classifier_input(classifier_input)
        self.new_version_path = new_version
        self.new: LoadedVersion | None = None
        if new_version is None:
            self.classifier = Classifier(model.embed_dim, num_classes)

    def _adopt(self, new_version: str) -> None:
        """Copy a trained new version's weights into ``self.model`` (same architecture) and freeze it."""
        loaded = load_model_version(new_version)
        mine, theirs = self.model.preprocessing.to_dict(), loaded.model.preprocessing.to_dict()
        if mine != theirs:
            raise ConfigError(
                f"method.new_version={new_version} was trained with preprocessing {theirs}, but the run's model "
                f"uses {mine}: set model=... to the new version's model"
            )
        try:
            self.model.load_state_dict(loaded.model.state_dict())
        except RuntimeError as exc:
            raise ConfigError(
                f"method.new_version={new_version} does not fit the run's model (set model=... to its architecture): "
                + str(exc).splitlines()[0]
            ) from exc
        self.new = loaded
        self._frozen["new_model"] = freeze(self.model)
        _logger.info("adopted new model version %s from %s (frozen)", loaded.version_id, new_version)

    def setup(self, ctx: MethodContext) -> None:
        """Load the frozen old model and, with ``new_version``, adopt and freeze the trained new model."""
        self.load_old(required=True)
        if self.new_version_path is not None and self.new is None:
            self._adopt(self.new_version_path)

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.new_version_path is not None:
            raise ConfigError(
                f"method.new_version={self.new_version_path} is adopted, not trained: set trainer.epochs=0"
            )
        return classification_step(self.classifier, self.model(images), labels, self.label_smoothing, self.classifier_input)

    def train_features(self, ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d_new) new-model and (N, d_old) old-model L2-normalised features of the training items.

        Un-augmented (eval preprocessing of each model), cached through :meth:`MethodContext.features`.
        """
        if self.old is None:
            self.load_old(required=True)
        x_new = ctx.features(self.model, name="new")
        x_old = ctx.features(self.old_model, name="old")
        return x_new, x_old

    @staticmethod
    def train_labels(ctx: MethodContext) -> torch.Tensor | None:
        """(N,) labels of the training items when the dataset exposes ``targets`` (all project datasets do)."""
        targets = getattr(ctx.train_set, "targets", None)
        return None if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)

    def source_facts(self) -> dict[str, Any]:
        """Where the new model came from, for the manifest."""
        if self.new is None:
            return {"new_model": "trained in this run"}
        return {"new_model": "adopted", "new_version_id": self.new.version_id, "new_version_dir": str(self.new_version_path)}
