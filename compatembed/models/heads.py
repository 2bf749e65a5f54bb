"""Heads that turn a backbone into the embedding model a version deploys, plus the class head.

:class:`EmbeddingModel` is the deployed module (the ``model`` entry of a version manifest): a backbone
followed by an optional linear projection to the embedding size. Its ``forward`` is unnormalised so
methods can put losses on raw features (OCA's extra dimensions, λ-orthogonality's maps);
:meth:`EmbeddingModel.embed` is what retrieval uses. :class:`Classifier` is the bias-free class head
the published compatible-training code puts on top of the embedding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from compatembed.errors import ConfigError

_logger = logging.getLogger(__name__)


class EmbeddingModel(nn.Module):
    """A backbone plus an optional linear projection: the deployed embedding module.

    Args:
        backbone: A module honouring the backbone contract (``(N, C, H, W)`` -> ``(N, num_features)``,
            attributes ``num_features`` and ``preprocessing``), e.g. from ``create_backbone``.
        embed_dim: Embedding size. ``None`` keeps the backbone's pooled feature as the embedding
            (no projection), which is how a third-party model is deployed as-is.
        normalize: Whether :meth:`embed` L2-normalises (retrieval by cosine similarity).

    Attributes:
        embed_dim: Output width of ``forward`` and ``embed``.
        preprocessing: The backbone's preprocessing (images must be prepared this way).
        normalize: As given.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int | None = None, *, normalize: bool = True) -> None:
        super().__init__()
        for attr in ("num_features", "preprocessing"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"EmbeddingModel backbone {type(backbone).__name__} has no attribute {attr!r}")
        if embed_dim is not None and embed_dim < 1:
            raise ConfigError(f"EmbeddingModel embed_dim must be positive or None, got {embed_dim}")
        self.backbone = backbone
        num_features = int(backbone.num_features)
        self.embed_dim = num_features if embed_dim is None else int(embed_dim)
        self.projection: nn.Module = nn.Identity() if embed_dim is None else nn.Linear(num_features, self.embed_dim)
        self.normalize = normalize
        self.preprocessing = backbone.preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding: ``(N, C, H, W)`` -> ``(N, embed_dim)``."""
        return self.projection(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding ``(N, embed_dim)``, L2-normalised when ``normalize`` is set."""
        z = self.forward(x)
        return F.normalize(z, dim=1) if self.normalize else z

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, normalize={self.normalize}"


class Classifier(nn.Linear):
    """A linear class head; bias-free by default as in the published BCT/OCA/BT² code.

    ``weight`` has shape ``(num_classes, in_features)``; row ``c`` is class ``c``'s prototype, which
    is what BCT's influence loss and the pseudo classifier compare features with.

    Args:
        in_features: Embedding width.
        num_classes: Number of classes.
        bias: Whether to add a bias.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False) -> None:
        if in_features < 1 or num_classes < 1:
            raise ConfigError(
                f"Classifier needs positive sizes, got in_features={in_features}, num_classes={num_classes}"
            )
        super().__init__(in_features, num_classes, bias=bias)
        self.num_classes = num_classes
