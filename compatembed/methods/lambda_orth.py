"""λ-orthogonality (Ricci, Biondi, Pernici, Patras, Del Bimbo, NeurIPS 2025): a post-hoc affine map new → old.

The new model is trained independently in the run (cross-entropy, like ``Independent``) or adopted from
``new_version``, so it keeps its own space and its new/new accuracy. In ``finalize`` an affine map
``B(x) = W x + b`` from the new space to the old one is fitted on the training set's un-augmented
features of both models (:func:`fit_lambda_orthogonal`): start from the Procrustes solution, minimise
``1 − cos(B(x_new), x_old)`` plus ``μ · max(0, dev(W) − λ)²``. λ = 0 keeps W exactly orthogonal (the
geometry of the new space is preserved); λ = ∞ is the free least-squares map. The closed-form ends, the
deviation measures and the map module are in :mod:`compatembed.methods.maps`.

The deployed embedding is the new model, unchanged. The manifest gets an ``affine`` edge to the old
version (``weight`` (d_old, d_new), ``bias`` (d_old,), output normalised), so a new query is mapped
into the old space before it searches an old gallery; ``compatembed-eval`` follows that edge.

The methods notes' reference run found a bias (and centring) harmful: a shared offset added to every
query pulls all queries toward one direction. Both are therefore off by default and explicit options.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.maps import (
    DEVIATIONS,
    AffineMap,
    centring_means,
    cross_supervised_contrastive,
    first_last_means,
    gram_deviation,
    least_squares_affine,
    mean_cosine,
    orthogonality_penalty,
    procrustes,
    shuffled_batches,
    spectral_deviation,
)
from compatembed.methods.post_hoc import PostHocMapMethod
from compatembed.models.orthogonal import ORTHOGONAL_MAPS
from compatembed.models.version import CompatibilityEdge

_logger = logging.getLogger(__name__)

OBJECTIVES = ("cosine", "mse")
"""Alignment objectives: ``cosine`` = mean 1 − cos(B(x), y); ``mse`` = mean ‖B(x) − y‖²."""


# -- loss terms ---------------------------------------------------------------------------------
def alignment_loss(mapped: torch.Tensor, target: torch.Tensor, objective: str = "cosine") -> torch.Tensor:
    """Mean ``1 − cos(mapped_i, target_i)`` (``cosine``) or mean ``‖mapped_i − target_i‖²`` (``mse``)."""
    if objective == "cosine":
        return (1 - F.cosine_similarity(mapped, target.to(mapped.dtype), dim=1)).mean()
    if objective == "mse":
        return (mapped - target.to(mapped.dtype)).square().sum(1).mean()
    raise ConfigError(f"unknown alignment objective {objective!r}; known: {', '.join(OBJECTIVES)}")


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


@dataclass(frozen=True)
class LambdaOrthOptions:
    """The options of the λ-orthogonal fit, checked once (``method=lambda_orth`` builds them from its keys).

    Attributes:
        tolerance: λ >= 0, or None / ``"inf"`` for ∞ (stored as a float, ``math.inf`` for ∞).
        penalty_weight: μ, the weight of the squared hinge.
        deviation: ``gram`` (‖G − I‖_F) or ``spectral`` (singular values outside [1 − λ, 1 + λ]).
        bias: learn a free bias b (off by default: a shared offset added to every query erodes ranking).
        center: centre both feature sets (Procrustes / least squares on centred data); the exported
            bias then holds ``μ_out − W μ_in``.
        objective: ``cosine`` (1 − cos) or ``mse`` for the alignment term.
        alignment_weight: weight of the alignment term.
        supcon_weight: weight of the supervised contrastive term (0: off).
        temperature: τ of the supervised contrastive term.
        orthogonal_map: parametrisation used at λ = 0 (see :data:`compatembed.models.orthogonal.ORTHOGONAL_MAPS`).
        steps / batch_size / lr: Adam on mini-batches (cosine-annealed learning rate).
        seed: seeds the batch order.

    Raises:
        ConfigError: a negative λ or an unknown deviation, objective or orthogonal map.
    """

    tolerance: float | str | None = 1.0
    penalty_weight: float = 10.0
    deviation: str = "gram"
    bias: bool = False
    center: bool = False
    objective: str = "cosine"
    alignment_weight: float = 1.0
    supcon_weight: float = 0.0
    temperature: float = 0.1
    orthogonal_map: str = "matrix_exp"
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for key, known in (("deviation", DEVIATIONS), ("objective", OBJECTIVES), ("orthogonal_map", ORTHOGONAL_MAPS)):
            if getattr(self, key) not in known:
                raise ConfigError(f"unknown lambda_orth {key} {getattr(self, key)!r}; known: {', '.join(known)}")
        typed = {"tolerance": parse_tolerance(self.tolerance), "bias": bool(self.bias), "center": bool(self.center),
                 **{k: float(getattr(self, k))
                    for k in ("penalty_weight", "alignment_weight", "supcon_weight", "temperature", "lr")},
                 **{k: int(getattr(self, k)) for k in ("steps", "batch_size", "seed")}}
        for key, value in typed.items():
            object.__setattr__(self, key, value)


def fit_lambda_orthogonal(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor | None = None,
    options: LambdaOrthOptions | None = None,
    *,
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
        options: the fit's options (default: :class:`LambdaOrthOptions` ``()``).
        device: where the fit runs.

    Returns:
        A :class:`LambdaOrthFit`.
    """
    o = options if options is not None else LambdaOrthOptions()
    tol = float(o.tolerance)  # type: ignore[arg-type]  # parsed by LambdaOrthOptions
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ConfigError(f"map fit needs paired (N, d) features with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    if o.supcon_weight > 0 and labels is None:
        raise ConfigError("lambda_orth supcon_weight > 0 needs the training labels")
    device = torch.device(device)
    started = time.perf_counter()
    x, y = x.to(device), y.to(device)
    x64, y64 = x.double(), y.double()  # the closed forms and the map run in float64
    mx, my = centring_means(x64, y64, o.center)
    w0, _ = procrustes(x64, y64, center=o.center)
    d_in, d_out = x.shape[1], y.shape[1]

    history: dict[str, list[float]] = {}
    if math.isinf(tol):
        weight, b = least_squares_affine(x64 - mx, y64 - my, bias=o.bias)
        fitted = AffineMap(d_in, d_out, bias=o.bias, in_mean=mx.cpu(), out_mean=my.cpu())
        fitted.set_weight(weight)
        if fitted.bias is not None:
            with torch.no_grad():
                fitted.bias.copy_(b)
        fitted.to(device)
        if o.supcon_weight > 0:
            _logger.warning("lambda_orth: λ = ∞ is the closed-form least-squares map; supcon_weight is not used")
    else:
        fitted = AffineMap(
            d_in, d_out, orthogonal_weight=tol == 0, orthogonal_map=o.orthogonal_map, bias=o.bias, in_mean=mx.cpu(),
            out_mean=my.cpu(),
        )
        fitted.set_weight(w0.cpu())  # on the CPU: a non-square orthogonal W is completed with seeded CPU noise
        fitted.to(device)
        history = _optimise(fitted, x, y, labels.to(device) if labels is not None else None, o)
    fitted.eval().requires_grad_(False)

    with torch.no_grad():
        weight = fitted.weight.detach()
        sv = torch.linalg.svdvals(weight).cpu().numpy()
        facts: dict[str, Any] = {
            "tolerance": None if math.isinf(tol) else tol,
            "penalty_weight": o.penalty_weight,
            "deviation_measure": o.deviation,
            "bias": o.bias,
            "center": o.center,
            "objective": o.objective,
            "orthogonal_map": o.orthogonal_map if tol == 0 else None,
            "fit": "least_squares" if math.isinf(tol) else ("orthogonal" if tol == 0 else "relaxed_orthogonal"),
            "steps": 0 if math.isinf(tol) else o.steps,
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
    fitted: AffineMap, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None, options: LambdaOrthOptions
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of the λ-orthogonal fit on one batch (summed by the caller).

    Args:
        fitted: the map being fitted.
        x: (B, d_in) new features; y: (B, d_out) old features; labels: (B,) (for ``supcon``).
        options: the hinge ``penalty_weight · max(0, dev(W) − λ)²`` (omitted at λ = 0, where W is
            orthogonal by construction), the alignment term (``objective``, ``alignment_weight``) and the
            supervised contrastive term (``supcon_weight``, ``temperature``; omitted at weight 0).

    Returns:
        ``{"align": ..., "orth": ..., "supcon": ...}`` (scalars, each already multiplied by its weight).
    """
    o = options
    tolerance = float(o.tolerance)  # type: ignore[arg-type]
    with parametrize.cached():
        mapped = fitted(x)
        terms = {"align": o.alignment_weight * alignment_loss(mapped, y, o.objective)}
        if tolerance > 0:
            terms["orth"] = o.penalty_weight * orthogonality_penalty(fitted.weight, tolerance, o.deviation)
        if o.supcon_weight > 0:
            if labels is None:
                raise ConfigError("lambda_orth supcon_weight > 0 needs the training labels")
            terms["supcon"] = o.supcon_weight * cross_supervised_contrastive(mapped, y, labels, o.temperature)
    return terms


def _optimise(
    fitted: AffineMap, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None, options: LambdaOrthOptions
) -> dict[str, list[float]]:
    """Adam on the map's parameters; returns per-step values of each weighted term."""
    history: dict[str, list[float]] = {"align": []}
    if float(options.tolerance) > 0:  # type: ignore[arg-type]
        history["orth"] = []
    if options.supcon_weight > 0:
        history["supcon"] = []
    if options.steps <= 0:
        return {}
    params = [p for p in fitted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
    generator = torch.Generator().manual_seed(options.seed)
    fitted.train()
    for index in shuffled_batches(x.shape[0], options.batch_size, options.steps, generator):
        index = index.to(x.device)
        xb, yb = x[index], y[index]
        terms = lambda_orth_terms(fitted, xb, yb, labels[index] if labels is not None else None, options)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in terms.items():
            history[name].append(float(value.detach()))
    return history


# -- the method ---------------------------------------------------------------------------------
class LambdaOrth(PostHocMapMethod):
    """An independently trained (or adopted) new model plus a λ-orthogonal affine map to the old space.

    Args:
        model: the new embedding model.
        num_classes: size of the label space.
        tolerance: λ >= 0, or None for ∞ (the closed-form least-squares map).
        penalty_weight: μ, weight of the squared hinge beyond λ.
        deviation: ``gram`` (‖WᵀW − I‖_F) | ``spectral`` (singular values outside [1 − λ, 1 + λ]).
        bias: learn a free bias b (exported bias exactly 0 when off and ``center`` is off).
        center: fit on centred features; the exported bias holds ``μ_old − W μ_new``.
        objective: ``cosine`` (1 − cos, the default) | ``mse``.
        alignment_weight: weight of the alignment term.
        supcon_weight: weight of the supervised contrastive term between mapped new and old features.
        temperature: τ of the supervised contrastive term.
        orthogonal_map: ``matrix_exp`` | ``cayley`` | ``householder`` (the parametrisation at λ = 0).
        fit_steps / fit_batch_size / fit_lr: Adam on the map.
        seed: seeds the batch order of the fit.
        **post_hoc: where the new model comes from: ``old_version`` (required), ``new_version``,
            ``label_smoothing``, ``classifier_input``, and ``fit_views`` (augmented pairs for the fit; see
            :class:`PostHocMapMethod`).
    """

    name = "lambda_orth"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        tolerance: float | None = 1.0,
        penalty_weight: float = 10.0,
        deviation: str = "gram",
        bias: bool = False,
        center: bool = False,
        objective: str = "cosine",
        alignment_weight: float = 1.0,
        supcon_weight: float = 0.0,
        temperature: float = 0.1,
        orthogonal_map: str = "matrix_exp",
        fit_steps: int = 2000,
        fit_batch_size: int = 1024,
        fit_lr: float = 1e-3,
        seed: int = 0,
        **post_hoc: Any,
    ) -> None:
        super().__init__(model, num_classes, **post_hoc)
        self.options = LambdaOrthOptions(
            tolerance=tolerance, penalty_weight=penalty_weight, deviation=deviation, bias=bias, center=center,
            objective=objective, alignment_weight=alignment_weight, supcon_weight=supcon_weight, temperature=temperature,
            orthogonal_map=orthogonal_map, steps=fit_steps, batch_size=fit_batch_size, lr=fit_lr, seed=seed,
        )
        self.tolerance = float(self.options.tolerance)  # type: ignore[arg-type]
        self.fit_result: LambdaOrthFit | None = None

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """Fit the map on the cached training features; returns the facts for the manifest."""
        x_new, x_old = self.train_features(ctx)
        labels = self.train_labels(ctx) if self.options.supcon_weight > 0 else None
        self.fit_result = fit_lambda_orthogonal(x_new, x_old, labels, self.options, device=ctx.device)
        facts = {**self.fit_result.facts, "fit_views": self.fit_views, "fit_pairs": int(x_new.shape[0])}
        return {"lambda_orth": {**facts, **self.source_facts()}}

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """One ``affine`` edge to the old version: B's arrays, output normalised."""
        if self.fit_result is None or self.old is None:
            raise RuntimeError("LambdaOrth.compatibility_edges() before finalize(): the map is not fitted")
        weight, bias = self.fit_result.map.exported()
        facts = self.fit_result.facts
        info = {
            "method": "lambda_orth",
            "tolerance": None if math.isinf(self.tolerance) else self.tolerance,
            "deviation_measure": facts["deviation_measure"],
            "gram_deviation": facts["gram_deviation"],
            "singular_values_min": facts["singular_values"]["min"],
            "singular_values_max": facts["singular_values"]["max"],
        }
        arrays = {"weight": weight, "bias": bias}
        return [CompatibilityEdge("affine", self.old.version_id, arrays=arrays, normalize_output=True, info=info)]
