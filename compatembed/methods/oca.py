"""OCA (Ricci et al., ECCV 2024 workshops): an expanded embedding, an orthogonal layer, prototype alignment.

The new embedding has ``d_new = d_old + k`` dimensions; h = normalize(f(x)) is what is deployed. Its
first ``d_old`` coordinates g = h[:d_old] are pulled into the old space; the ``k`` extra ones are free
to hold what the old space cannot. During training an orthogonal transformation with bias sits
between h and the new classifier, ``logits = W_out(Q·h + c)``, so the classifier can rotate the space
without distorting it (Q is exactly orthogonal through ``parametrizations.orthogonal``). Loss, with
the public code's weights α/β/γ = 5/10/5 and label smoothing 0.1::

    L = α·CE_ls(W_out(Q·h + c), y) + β·CE_ls(s · ĝ·Pᵀ, y) + γ·(1 − cos(P[y], ĝ))

P is the pseudo classifier (class means of the old model's normalised features over the new
training set), ĝ = normalize(g), s = ``influence_scale`` (the methods notes give the logits ĝ·Pᵀ with
no scale: s = 1). Old galleries are searched with normalize(h[:d_old]): a ``prefix`` edge.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compatembed.errors import ConfigError
from compatembed.methods.base import Method, MethodContext
from compatembed.methods.bct import old_prototypes
from compatembed.models.heads import Classifier
from compatembed.models.orthogonal import orthogonal_linear, orthogonality_error
from compatembed.models.version import CompatibilityEdge

_logger = logging.getLogger(__name__)


class OCA(Method):
    """Orthogonal Compatible Aligned training: expanded embedding, orthogonal layer, prototype pull.

    Args:
        model: the new embedding model; its ``embed_dim`` must be ``d_old + extra_dims``.
        num_classes: size of the label space.
        old_version: the deployed old model version directory (required).
        extra_dims: k, the dimensions added to the old model's size (32 on top of 128 in the paper).
        ce_weight: α, classification through the orthogonal layer.
        influence_weight: β, BCT-style cross-entropy of ĝ against the pseudo classifier P.
        pull_weight: γ, 1 − cos(P[y], ĝ).
        label_smoothing: of both cross-entropies (0.1 in the public code).
        influence_scale: s, multiplies the cosine logits ĝ·Pᵀ (the notes use none: 1).
        orthogonal_map: ``matrix_exp`` (the public code's, PyTorch's default) or any of
            :data:`compatembed.models.orthogonal.ORTHOGONAL_MAPS` (``givens``, ``butterfly``, ``householder_chain:8``, ...).
        transform_bias: the bias c of the transformation layer (present in the public code).
    """

    name = "oca"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        extra_dims: int = 32,
        ce_weight: float = 5.0,
        influence_weight: float = 10.0,
        pull_weight: float = 5.0,
        label_smoothing: float = 0.1,
        influence_scale: float = 1.0,
        orthogonal_map: str = "matrix_exp",
        transform_bias: bool = True,
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        if extra_dims < 0:
            raise ConfigError(f"method.extra_dims must be >= 0, got {extra_dims}")
        self.extra_dims = int(extra_dims)
        self.ce_weight = float(ce_weight)
        self.influence_weight = float(influence_weight)
        self.pull_weight = float(pull_weight)
        self.label_smoothing = float(label_smoothing)
        self.influence_scale = float(influence_scale)
        self.orthogonal_map = orthogonal_map
        d_new = int(model.embed_dim)
        self.transform = orthogonal_linear(d_new, bias=transform_bias, orthogonal_map=orthogonal_map)
        self.classifier = Classifier(d_new, num_classes)
        self.d_old: int | None = None
        self.register_buffer("prototypes", torch.zeros(num_classes, 0), persistent=False)

    def setup(self, ctx: MethodContext) -> None:
        """Load and freeze the old model, check ``d_new = d_old + k``, build the pseudo classifier P."""
        old = self.load_old(required=True)
        assert old is not None
        d_old, d_new = old.embed_dim, int(self.model.embed_dim)
        if d_new != d_old + self.extra_dims:
            raise ConfigError(
                f"OCA needs the new embedding dim = d_old + extra_dims = {d_old} + {self.extra_dims}: "
                f"set model.embed_dim={d_old + self.extra_dims} (it is {d_new})"
            )
        self.d_old = d_old
        self.prototypes = old_prototypes(ctx, self.old_model).to(ctx.device)
        _logger.info(
            "OCA: d_old=%d + k=%d = %d, Q %s, weights ce/influence/pull = %g/%g/%g",
            d_old, self.extra_dims, d_new, self.orthogonal_map, self.ce_weight, self.influence_weight, self.pull_weight,
        )

    def losses(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Weighted loss terms of unnormalised features ``(B, d_new)`` with labels ``(B,)``."""
        if self.d_old is None:
            raise RuntimeError("OCA.setup(ctx) must run before training")
        h = F.normalize(features.float(), dim=1)  # float32 also under autocast: 1 − cos needs the precision
        logits = self.classifier(self.transform(h))
        g = F.normalize(h[:, : self.d_old], dim=1)
        protos = self.prototypes.float()
        old_logits = self.influence_scale * g @ protos.T
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        influence = F.cross_entropy(old_logits, labels, label_smoothing=self.label_smoothing)
        pull = (1.0 - F.cosine_similarity(protos[labels], g, dim=1)).mean()
        terms = {"ce": self.ce_weight * ce, "influence": self.influence_weight * influence, "pull": self.pull_weight * pull}
        report = {
            "acc": (logits.argmax(1) == labels).float().mean().item(),
            "old_acc": (old_logits.argmax(1) == labels).float().mean().item(),
        }
        return terms, report

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return self.losses(self.model(images), labels)

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """Facts for the manifest, including how orthogonal Q still is (‖QᵀQ − I‖_F)."""
        return {
            "oca": {
                "d_old": self.d_old,
                "extra_dims": self.extra_dims,
                "orthogonal_map": self.orthogonal_map,
                "ce_weight": self.ce_weight,
                "influence_weight": self.influence_weight,
                "pull_weight": self.pull_weight,
                "label_smoothing": self.label_smoothing,
                "influence_scale": self.influence_scale,
                "orthogonality_error": orthogonality_error(self.transform.weight),
            }
        }

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """The deployed h: its first ``d_old`` coordinates, renormalised, live in the old space."""
        target = self.parent_version_id
        if target is None or self.d_old is None:
            raise RuntimeError("OCA.setup(ctx) must run before export")
        return [CompatibilityEdge("prefix", target, dim=self.d_old, info={"extra_dims": self.extra_dims})]
