"""λ-orthogonality (Ricci, Biondi, Pernici, Patras, Del Bimbo, NeurIPS 2025): a post-hoc affine map new → old.

The new model is trained independently in the run (cross-entropy, like ``Independent``) or adopted from
``new_version``, so it keeps its own space and its new/new accuracy. In ``finalize`` an affine map
``B(x) = W x + b`` from the new space to the old one is fitted on the training set's un-augmented
features of both models (:func:`compatembed.methods.maps.fit_lambda_orthogonal`): start from the
Procrustes solution, minimise ``1 − cos(B(x_new), x_old)`` plus ``μ · max(0, dev(W) − λ)²``. λ = 0 keeps
W exactly orthogonal (the geometry of the new space is preserved); λ = ∞ is the free least-squares map.

The deployed embedding is the new model, unchanged. The manifest gets an ``affine`` edge to the old
version (``weight`` (d_old, d_new), ``bias`` (d_old,), output normalised), so a new query is mapped
into the old space before it searches an old gallery; ``compatembed-eval`` follows that edge.

The methods notes' reference run found a bias (and centring) harmful: a shared offset added to every
query pulls all queries toward one direction. Both are therefore off by default and explicit options.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.maps import (
    DEVIATIONS,
    OBJECTIVES,
    ORTHOGONAL_MAPS,
    LambdaOrthFit,
    PostHocMapMethod,
    parse_tolerance,
    fit_lambda_orthogonal,
)
from compatembed.models.version import CompatibilityEdge

_logger = logging.getLogger(__name__)


class LambdaOrth(PostHocMapMethod):
    """An independently trained (or adopted) new model plus a λ-orthogonal affine map to the old space.

    Args:
        model: the new embedding model.
        num_classes: size of the label space.
        old_version: the deployed old model version directory (required).
        new_version: adopt this trained new version instead of training one in the run (then
            ``trainer.epochs=0``).
        label_smoothing: label smoothing of the new model's cross-entropy (in-run training).
        classifier_input: what the in-run classifier reads: ``raw`` or ``normalized`` (as ``Independent``).
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
    """

    name = "lambda_orth"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        new_version: str | None = None,
        label_smoothing: float = 0.1,
        classifier_input: str = "raw",
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
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version, new_version=new_version, label_smoothing=label_smoothing,
                         classifier_input=classifier_input)
        for key, value, known in (
            ("deviation", deviation, DEVIATIONS),
            ("objective", objective, OBJECTIVES),
            ("orthogonal_map", orthogonal_map, ORTHOGONAL_MAPS),
        ):
            if value not in known:
                raise ConfigError(f"unknown lambda_orth {key} {value!r}; known: {', '.join(known)}")
        self.tolerance = parse_tolerance(tolerance)
        self.fit_options: dict[str, Any] = dict(
            tolerance=self.tolerance,
            penalty_weight=float(penalty_weight),
            deviation=deviation,
            bias=bool(bias),
            center=bool(center),
            objective=objective,
            alignment_weight=float(alignment_weight),
            supcon_weight=float(supcon_weight),
            temperature=float(temperature),
            orthogonal_map=orthogonal_map,
            steps=int(fit_steps),
            batch_size=int(fit_batch_size),
            lr=float(fit_lr),
            seed=int(seed),
        )
        self.fit_result: LambdaOrthFit | None = None

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """Fit the map on the cached training features; returns the facts for the manifest."""
        x_new, x_old = self.train_features(ctx)
        labels = self.train_labels(ctx) if self.fit_options["supcon_weight"] > 0 else None
        self.fit_result = fit_lambda_orthogonal(x_new, x_old, labels, device=ctx.device, **self.fit_options)
        return {"lambda_orth": {**self.fit_result.facts, **self.source_facts()}}

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
        return [CompatibilityEdge("affine", self.old.version_id, arrays={"weight": weight, "bias": bias}, normalize_output=True, info=info)]
