"""Independent training: the new model learns its own space (the baseline every method is measured against)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compatembed.errors import ConfigError
from compatembed.methods.base import Method
from compatembed.models.heads import Classifier

CLASSIFIER_INPUTS: tuple[str, ...] = ("raw", "normalized")
"""What a new model's own classifier reads: the raw projection, or the L2-normalised feature (the OCA/BT² code)."""


def check_classifier_input(value: str) -> str:
    """Validate ``method.classifier_input``."""
    if value not in CLASSIFIER_INPUTS:
        raise ConfigError(f"unknown method.classifier_input={value!r}; known: {', '.join(CLASSIFIER_INPUTS)}")
    return value


def classification_step(
    classifier: nn.Module,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    classifier_input: str = "raw",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Independent's training step on one batch: ``{"ce": ...}`` and the batch accuracy ``{"acc": ...}``.

    Shared with the methods that train their new model in the run exactly like ``Independent``
    (:class:`compatembed.methods.post_hoc.PostHocMapMethod`), so the two cannot drift apart.

    Args:
        classifier: the linear classifier on the embedding.
        embeddings: (B, d) the new model's (unnormalised) embeddings of the batch.
        labels: (B,) class ids.
        label_smoothing: label smoothing of the cross-entropy.
        classifier_input: ``raw`` classifies the embeddings as they are; ``normalized`` classifies
            their L2-normalised version, as OCA and BT² classify theirs (a like-for-like baseline).
    """
    logits = classifier(F.normalize(embeddings, dim=1) if classifier_input == "normalized" else embeddings)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"ce": ce}, {"acc": acc}


class Independent(Method):
    """Cross-entropy through a linear classifier on the embedding; no relation to any old model.

    Args:
        model: the new embedding model.
        num_classes: size of the label space.
        label_smoothing: label smoothing of the cross-entropy.
        classifier_input: ``raw`` (the projection) or ``normalized`` (the L2-normalised feature, what
            OCA and BT² classify: use it where the comparison is with them).
        old_version: optional parent version, recorded in the manifest with no compatibility relation
            (the old model is never loaded).
    """

    name = "independent"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        label_smoothing: float = 0.1,
        classifier_input: str = "raw",
        old_version: str | None = None,
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        self.classifier = Classifier(model.embed_dim, num_classes)
        self.label_smoothing = label_smoothing
        self.classifier_input = check_classifier_input(classifier_input)

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return classification_step(self.classifier, self.model(images), labels, self.label_smoothing, self.classifier_input)
