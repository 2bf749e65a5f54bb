"""A pretrained backbone whose first stages stay frozen: only the last stage(s), the head conv and the projection train.

Upgrading between two off-the-shelf pretrained models on a CPU cannot afford fine-tuning the whole new
backbone, and does not need to: compatibility methods (BCT, OCA, BT²) mostly reshape the top of the
network. :class:`FrozenPrefixBackbone` splits a timm EfficientNet at a stage boundary:

- the **prefix** (stem, ``bn1`` and ``blocks[:split]``) is frozen: no gradients, always in eval mode
  (its BatchNorm statistics never move), so its output for an image never changes;
- the **suffix** (``blocks[split:]``, ``conv_head``, ``bn2`` and the pooling) trains, together with
  whatever head sits on top (the projection of :class:`~compatembed.models.EmbeddingModel`).

Because the prefix output is a fixed function of the image, training can read it from a cache computed
once (:mod:`compatembed.feature_cache`) and run only the suffix; the backbone is then switched to take
prefix features instead of images (:meth:`FrozenPrefixBackbone.prefix_features_input`). Deployed, it is
an ordinary backbone: ``forward`` maps images to pooled features through both parts, exactly as the
wrapped model does (the state dict keeps the wrapped model's layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from compatembed.errors import ConfigError
from compatembed.models.registry import register_backbone
from compatembed.models.timm_backbone import TimmBackbone

_logger = logging.getLogger(__name__)

CACHE_DTYPES: tuple[str, ...] = ("float16", "float32")
"""How cached prefix features may be stored (float16 halves the disk and page cache for ~1e-3 relative error)."""

INPUT_MODES: tuple[str, ...] = ("images", "prefix_features")


class FrozenPrefixBackbone(nn.Module):
    """A timm EfficientNet backbone split into a frozen prefix and a trainable suffix.

    Args:
        backbone: A :class:`~compatembed.models.timm_backbone.TimmBackbone` around a timm
            ``EfficientNet`` (``tf_efficientnet_lite*``, ``efficientnet_*``...), e.g. from
            ``create_backbone("efficientnet_lite2", weights="imagenet")``.
        trainable_stages: How many of the last stages of ``blocks`` train (1: the last stage only;
            0: only ``conv_head``/``bn2``; ``len(blocks)``: everything after the stem).
        cache: Whether training (and embedding passes given a cache directory) may read the prefix
            output from the feature cache instead of running the prefix.
        cache_dtype: ``float16`` or ``float32``: how cached prefix features are stored.

    Attributes:
        backbone: The wrapped backbone (its state dict is the timm layout under ``backbone.model``).
        split: Index of the first trainable stage in ``blocks``.
        num_features: Width of the pooled feature (as the wrapped backbone).
        preprocessing: The wrapped backbone's preprocessing.
        model_name: timm's architecture name.
        input_mode: ``images`` (the default, what deployment uses) or ``prefix_features``.

    Raises:
        ConfigError: The backbone is not a timm EfficientNet, ``trainable_stages`` is out of range, or
            ``cache_dtype`` is unknown.
    """

    def __init__(
        self, backbone: nn.Module, *, trainable_stages: int = 1, cache: bool = True, cache_dtype: str = "float16"
    ) -> None:
        super().__init__()
        model = getattr(backbone, "model", None)
        if not isinstance(backbone, TimmBackbone) or not isinstance(model, EfficientNet):
            raise ConfigError(
                f"frozen_prefix needs a timm EfficientNet backbone (efficientnet_lite0/1/2, or name: timm with an "
                f"EfficientNet model_name); got {type(backbone).__name__}"
                + (f" around {type(model).__name__}" if model is not None else "")
            )
        stages = len(model.blocks)
        if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= stages:
            raise ConfigError(f"frozen_prefix trainable_stages must be an integer in [0, {stages}] (stages of "
                              f"{backbone.model_name}), got {trainable_stages!r}")
        if cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"frozen_prefix cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
        self.backbone = backbone
        self.split = stages - trainable_stages
        self.trainable_stages = trainable_stages
        self.num_features = int(backbone.num_features)
        self.preprocessing = backbone.preprocessing
        self.model_name = backbone.model_name
        self.cache = bool(cache)
        self.cache_dtype = cache_dtype
        self.input_mode = "images"
        for module in self.prefix_modules():
            for param in module.parameters():
                param.requires_grad_(False)
            module.eval()

    # -- the two parts ---------------------------------------------------------------------------
    def prefix_modules(self) -> list[nn.Module]:
        """The frozen modules, in order: ``conv_stem``, ``bn1``, ``blocks[0..split)``."""
        model = self.backbone.model
        return [model.conv_stem, model.bn1, *list(model.blocks)[: self.split]]

    def suffix_modules(self) -> list[nn.Module]:
        """The trainable modules, in order: ``blocks[split..)``, ``conv_head``, ``bn2`` (pooling has no weights)."""
        model = self.backbone.model
        return [*list(model.blocks)[self.split :], model.conv_head, model.bn2]

    def prefix_channels(self) -> int:
        """Channels of the prefix output (the cached tensor's ``C``)."""
        model = self.backbone.model
        if self.split == 0:
            return int(model.bn1.num_features)
        convs = [m for m in model.blocks[self.split - 1].modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels)  # a block's last registered conv is its output projection

    def forward_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` → prefix features ``(N, C', H', W')`` (frozen: eval mode, as cached)."""
        self._expect(images, "images")
        x = images
        for module in self.prefix_modules():
            x = module(x)
        return x

    def forward_suffix(self, features: torch.Tensor) -> torch.Tensor:
        """Prefix features ``(N, C', H', W')`` → pooled features ``(N, num_features)``."""
        self._expect(features, "prefix_features")
        x = features
        for module in self.suffix_modules():
            x = module(x)
        return self.backbone.model.forward_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, unnormalised features ``(N, num_features)`` of images, or of prefix features in that input mode."""
        if self.input_mode == "prefix_features":
            return self.forward_suffix(x)
        return self.forward_suffix(self.forward_prefix(x))

    def _expect(self, x: torch.Tensor, kind: str) -> None:
        channels = self.preprocessing.input_size[0] if kind == "images" else self.prefix_channels()
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f"{self.model_name} frozen prefix (split at stage {self.split}) expects {kind} of shape (N, {channels}, H, W), "
                f"got {tuple(x.shape)} (input_mode={self.input_mode!r}: cached prefix features go in only inside "
                "prefix_features_input())"
            )

    @contextlib.contextmanager
    def prefix_features_input(self) -> Iterator[FrozenPrefixBackbone]:
        """Within the block, ``forward`` takes cached prefix features instead of images (then images again)."""
        previous, self.input_mode = self.input_mode, "prefix_features"
        try:
            yield self
        finally:
            self.input_mode = previous

    def train(self, mode: bool = True) -> FrozenPrefixBackbone:
        """Set the suffix's mode; the prefix stays in eval mode (its BatchNorm statistics are frozen too)."""
        super().train(mode)
        for module in self.prefix_modules():
            module.eval()
        return self

    # -- identity of the frozen part -------------------------------------------------------------
    def prefix_state_sha256(self) -> str:
        """A hash of the prefix's parameters and buffers: what its output depends on besides the input."""
        digest = hashlib.sha256()
        for index, module in enumerate(self.prefix_modules()):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(f"{index}.{name}".encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, split={self.split} (trainable_stages={self.trainable_stages}), "
                f"cache={self.cache}, cache_dtype={self.cache_dtype}")


def find_frozen_prefix(model: nn.Module) -> FrozenPrefixBackbone | None:
    """The one :class:`FrozenPrefixBackbone` inside ``model``, or None when it holds none (or several: ambiguous)."""
    found = [m for m in model.modules() if isinstance(m, FrozenPrefixBackbone)]
    return found[0] if len(found) == 1 else None


@register_backbone("frozen_prefix")
def frozen_prefix(
    backbone: nn.Module, trainable_stages: int = 1, cache: bool = True, cache_dtype: str = "float16"
) -> FrozenPrefixBackbone:
    """Freeze all but the last ``trainable_stages`` stages of a timm EfficientNet backbone.

    Args:
        backbone: The backbone to split (in a config: a nested ``create_backbone`` node, built first).
        trainable_stages: Stages of ``blocks`` that train, counted from the end (1: the last stage).
        cache: Let training read the frozen prefix's output from the feature cache.
        cache_dtype: ``float16`` | ``float32`` storage of that cache.

    Returns:
        A :class:`FrozenPrefixBackbone`.

    Example:
        >>> from compatembed.models import create_backbone  # doctest: +SKIP
        >>> create_backbone("frozen_prefix", backbone=create_backbone("efficientnet_lite2", weights="imagenet"))  # doctest: +SKIP
    """
    wrapped = FrozenPrefixBackbone(backbone, trainable_stages=trainable_stages, cache=cache, cache_dtype=cache_dtype)
    _logger.info("%s: stages %d.. of %d train, the prefix is frozen", wrapped.model_name, wrapped.split,
                 wrapped.split + wrapped.trainable_stages)
    return wrapped
