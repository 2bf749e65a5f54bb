"""Independent training: the new model learns its own space (the baseline every method is measured against)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compatembed.methods.base import Method
from compatembed.models.heads import Classifier


def classification_step(
    classifier: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Independent's training step on one batch: ``{"ce": ...}`` and the batch accuracy ``{"acc": ...}``.

    Shared with the methods that train their new model in the run exactly like ``Independent``
    (:class:`compatembed.methods.maps.PostHocMapMethod`), so the two cannot drift apart.

    Args:
        classifier: the linear classifier on the embedding.
        embeddings: (B, d) the new model's (unnormalised) embeddings of the batch.
        labels: (B,) class ids.
        label_smoothing: label smoothing of the cross-entropy.
    """
    logits = classifier(embeddings)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"ce": ce}, {"acc": acc}


class Independent(Method):
    """Cross-entropy through a linear classifier on the embedding; no relation to any old model.

    Args:
        model: the new embedding model.
        num_classes: size of the label space.
        label_smoothing: label smoothing of the cross-entropy.
        old_version: optional parent version, recorded in the manifest with no compatibility relation
            (the old model is never loaded).
    """

    name = "independent"

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.1, old_version: str | None = None) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        self.classifier = Classifier(model.embed_dim, num_classes)
        self.label_smoothing = label_smoothing

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return classification_step(self.classifier, self.model(images), labels, self.label_smoothing)
