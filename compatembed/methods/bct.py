"""BCT (Shen et al., CVPR 2020): train the new embedding through the deployed model's frozen classifier.

The "influence loss" applies the OLD classifier ``w_old`` (frozen) to the NEW embedding, so new
features must land where the old classifier expects each class, i.e. in the old space::

    L = ce_weight · CE(w_new · φ_new(x), y) + λ · CE(w_old · φ_new(x), y)          (variant "paper")

Classes the old classifier never saw get synthesised rows: the mean old feature of the class over the
new training set, concatenated to the real rows. Where ``w_old`` comes from (``old_classifier``):

- ``real``: the deployed model's own classifier (the third-party CIFAR ResNet-20's 64 → 10 ``linear``,
  reachable as ``old_model.backbone.classifier``).
- ``prototypes``: class means of the old features for ALL classes (an old version trained by this
  project stores only its embedding module, so it has no classifier to reuse).
- ``auto``: ``real`` when the old version is an imported model (0 training epochs) whose backbone
  classifier reads the embedding itself, else ``prototypes``.

``variant: prototypes`` is the OCA/BT² code bases' BCT: ``w_old`` replaced entirely by the pseudo
classifier P (class means of L2-normalised old features), applied to the NORMALISED new feature with
weight 10. The new embedding (or its first ``d_old`` coordinates, ``compatible_dims: prefix``) must
have the old model's size; the manifest gets an ``identity`` (same size) or ``prefix`` edge.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compatembed.errors import ConfigError, DataError
from compatembed.methods.base import Method, MethodContext, class_prototypes
from compatembed.methods.independent import check_classifier_input
from compatembed.models.heads import Classifier
from compatembed.models.version import CompatibilityEdge, LoadedVersion

_logger = logging.getLogger(__name__)

VARIANTS = ("paper", "prototypes")
OLD_CLASSIFIERS = ("auto", "real", "prototypes")
COMPATIBLE_DIMS = ("exact", "prefix")
_DEFAULT_INFLUENCE_WEIGHT = {"paper": 1.0, "prototypes": 10.0}


def _choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"unknown {key}={value!r}; use one of {', '.join(allowed)}")
    return value


def old_prototypes(ctx: MethodContext, old_model: nn.Module) -> torch.Tensor:
    """The pseudo classifier P of the code bases: per-class means of the old model's normalised features.

    Every training item is embedded once by the frozen old model (un-augmented, cached by
    ``ctx.features``), including items of classes the old model never saw.

    Returns:
        (num_classes, d_old) float32 on CPU; rows of classes without training items are zero.
    """
    features = ctx.features(old_model, name="old")
    labels = ctx.labels()
    if features.shape[0] != labels.shape[0]:
        raise DataError(f"old features cover {features.shape[0]} items but the training set has {labels.shape[0]}")
    return class_prototypes(features.float(), labels, ctx.num_classes)


def compatible_dim(d_new: int, d_old: int, compatible_dims: str, *, method: str) -> int:
    """Check that the new embedding can be compared with the old one; returns ``d_old``.

    Raises:
        ConfigError: ``d_new != d_old`` with ``exact``, or ``d_new < d_old``.
    """
    if d_new == d_old:
        return d_old
    if compatible_dims == "prefix" and d_new > d_old:
        return d_old
    hint = (
        f"set model.embed_dim={d_old}" + (" or method.compatible_dims=prefix" if d_new > d_old else "")
    )
    raise ConfigError(f"{method} needs the new embedding dim ({d_new}) to match the old one ({d_old}): {hint}")


def real_old_classifier(old: LoadedVersion) -> nn.Linear | None:
    """The deployed model's own classifier when it reads the deployed embedding, else None.

    It qualifies when the backbone exposes ``classifier`` (an ``nn.Linear``), the embedding module
    adds no projection after the backbone, and the classifier's input width is the embedding size.
    """
    model = old.model
    head = getattr(getattr(model, "backbone", None), "classifier", None)
    projection = getattr(model, "projection", None)
    if not isinstance(head, nn.Linear) or not (projection is None or isinstance(projection, nn.Identity)):
        return None
    return head if head.in_features == old.embed_dim else None


def _trained_here(old: LoadedVersion) -> bool:
    """True when this project trained the old version (its backbone classifier was never trained)."""
    return int(old.manifest.get("training", {}).get("epochs", 0) or 0) > 0


class BCT(Method):
    """Backward-compatible training through the frozen old classifier ("influence loss").

    Args:
        model: the new embedding model (its ``forward`` is the unnormalised feature φ_new).
        num_classes: size of the label space.
        old_version: the deployed old model version directory (required).
        variant: ``paper`` (old classifier on the raw feature) or ``prototypes`` (the code bases':
            P on the normalised feature).
        influence_weight: λ; ``None`` = the variant's default (paper 1, prototypes 10).
        ce_weight: weight of the new classifier's cross-entropy.
        old_classifier: ``auto`` | ``real`` | ``prototypes`` (variant ``paper`` only; see the module doc).
        compatible_dims: ``exact`` (d_new == d_old) or ``prefix`` (φ_new[:d_old] when d_new > d_old).
        influence_scale: multiplies the cosine logits ĝ·Pᵀ of variant ``prototypes`` (the code uses 1).
        label_smoothing: of both cross-entropies (the paper uses none).
        classifier_input: what the new classifier reads: ``raw`` (the paper) or ``normalized`` (the
            L2-normalised feature, as the OCA/BT² code bases classify theirs).
    """

    name = "bct"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        variant: str = "paper",
        influence_weight: float | None = None,
        ce_weight: float = 1.0,
        old_classifier: str = "auto",
        compatible_dims: str = "exact",
        influence_scale: float = 1.0,
        label_smoothing: float = 0.0,
        classifier_input: str = "raw",
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        self.classifier_input = check_classifier_input(classifier_input)
        self.variant = _choice(variant, VARIANTS, "method.variant")
        self.old_classifier_source = _choice(old_classifier, OLD_CLASSIFIERS, "method.old_classifier")
        self.compatible_dims = _choice(compatible_dims, COMPATIBLE_DIMS, "method.compatible_dims")
        if self.variant == "prototypes" and self.old_classifier_source == "real":
            raise ConfigError("method.variant=prototypes replaces the old classifier by P; drop method.old_classifier=real")
        self.influence_weight = float(_DEFAULT_INFLUENCE_WEIGHT[variant] if influence_weight is None else influence_weight)
        self.ce_weight = float(ce_weight)
        self.influence_scale = float(influence_scale)
        self.label_smoothing = float(label_smoothing)
        self.classifier = Classifier(model.embed_dim, num_classes)
        self.d_old: int | None = None
        self.old_classifier: nn.Linear | None = None
        self._facts: dict[str, Any] = {}

    def setup(self, ctx: MethodContext) -> None:
        """Load and freeze the old model, build the frozen old classifier (real rows + synthesised rows)."""
        old = self.load_old(required=True)
        assert old is not None
        self.d_old = compatible_dim(int(self.model.embed_dim), old.embed_dim, self.compatible_dims, method="bct")
        protos = old_prototypes(ctx, self.old_model)
        head = real_old_classifier(old)
        source = self.old_classifier_source
        if self.variant == "prototypes":
            source, reason = "prototypes", "variant prototypes: w_old = P for all classes, on the normalised feature"
        elif source == "real":
            if head is None:
                raise ConfigError(
                    f"method.old_classifier=real but old version {old.version_id} has no classifier on its "
                    "embedding (backbone.classifier reading the un-projected feature); use auto or prototypes"
                )
            if _trained_here(old):
                _logger.warning("old version %s was trained here: its backbone classifier was never trained", old.version_id)
            reason = "the deployed model's own classifier"
        elif source == "auto" and head is not None and not _trained_here(old):
            source, reason = "real", "the imported model's own classifier"
        elif source == "auto":
            source = "prototypes"
            reason = (
                "the old version was trained by this project and stores only its embedding module"
                if _trained_here(old)
                else "the old model has no classifier on its embedding"
            )
        else:
            reason = "method.old_classifier=prototypes"

        weight = protos.clone()
        bias = torch.zeros(self.num_classes) if source == "real" and head is not None and head.bias is not None else None
        real_classes: list[int] = []
        if source == "real":
            assert head is not None
            if head.out_features > self.num_classes:
                raise ConfigError(
                    f"old classifier has {head.out_features} classes but the label space has {self.num_classes} "
                    "(data.num_classes)"
                )
            listed = old.manifest.get("training", {}).get("classes")
            seen = list(range(head.out_features)) if not listed else [int(c) for c in listed]
            real_classes = sorted(c for c in seen if c < head.out_features)
            rows = torch.as_tensor(real_classes, dtype=torch.long)
            weight[rows] = head.weight.detach().float().cpu()[rows]
            if bias is not None:
                bias[rows] = head.bias.detach().float().cpu()[rows]
        synthesised = [c for c in range(self.num_classes) if c not in set(real_classes)]
        old_head = nn.Linear(old.embed_dim, self.num_classes, bias=bias is not None)
        with torch.no_grad():
            old_head.weight.copy_(weight)
            if bias is not None:
                old_head.bias.copy_(bias)
        self.add_frozen("old_classifier", old_head.to(ctx.device))
        _logger.info(
            "BCT old classifier: %s (%s); real rows %s, synthesised rows (class means of old features) %s; λ=%g",
            source, reason, real_classes, synthesised, self.influence_weight,
        )
        self._facts = {
            "bct": {
                "variant": self.variant,
                "old_classifier": source,
                "old_classifier_reason": reason,
                "real_classifier_classes": real_classes,
                "synthesised_classes": synthesised,
                "influence_weight": self.influence_weight,
                "ce_weight": self.ce_weight,
                "influence_scale": self.influence_scale,
                "label_smoothing": self.label_smoothing,
                "compatible_dims": self.compatible_dims,
                "d_old": self.d_old,
            }
        }

    def old_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores of the frozen old classifier on new features ``(B, d_new)`` → ``(B, num_classes)``."""
        if self.old_classifier is None or self.d_old is None:
            raise RuntimeError("BCT.setup(ctx) must run before training")
        g = features[:, : self.d_old]
        if self.variant == "prototypes":
            return self.influence_scale * F.linear(F.normalize(g, dim=1), self.old_classifier.weight)
        return self.old_classifier(g)

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        features = self.model(images)
        logits = self.classifier(F.normalize(features, dim=1) if self.classifier_input == "normalized" else features)
        old_logits = self.old_logits(features)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        influence = F.cross_entropy(old_logits, labels, label_smoothing=self.label_smoothing)
        report = {
            "acc": (logits.argmax(1) == labels).float().mean().item(),
            "old_acc": (old_logits.argmax(1) == labels).float().mean().item(),
        }
        return {"ce": self.ce_weight * ce, "influence": self.influence_weight * influence}, report

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        return dict(self._facts)

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """``identity`` when the new embedding has the old size, else ``prefix`` with ``dim = d_old``."""
        target = self.parent_version_id
        if target is None or self.d_old is None:
            raise RuntimeError("BCT.setup(ctx) must run before export")
        if int(self.model.embed_dim) == self.d_old:
            return [CompatibilityEdge("identity", target)]
        return [CompatibilityEdge("prefix", target, dim=self.d_old)]
