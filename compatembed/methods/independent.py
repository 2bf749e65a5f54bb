"""Independent training: the new model learns its own space (the baseline every method is measured against)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compatembed.methods.base import Method
from compatembed.models.heads import Classifier


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
        logits = self.classifier(self.model(images))
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean().item()
        return {"ce": ce}, {"acc": acc}
