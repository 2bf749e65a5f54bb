"""Any timm image model as a backbone, wrapped once around timm's shared contract.

timm models built with ``num_classes=0`` already return pooled pre-logit features from ``forward``,
so one wrapper serves every architecture. Weights come only from a local file (``pretrained=False``
always): the machines this runs on may have no route to a model hub, and a silent download would make
a run depend on the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from compatembed.data import Preprocessing
from compatembed.errors import ConfigError
from compatembed.models.registry import load_state_dict_strict, read_state_dict, register_backbone

_logger = logging.getLogger(__name__)


class TimmBackbone(nn.Module):
    """A timm model without classifier: ``(N, C, H, W)`` -> ``(N, num_features)`` pooled features.

    Args:
        model: A timm model created with ``num_classes=0``.
        preprocessing: How its inputs are prepared.

    Attributes:
        model: The wrapped timm model (its state dict is the timm layout).
        model_name: timm's architecture name.
        num_features: Width of the pooled feature (timm's ``head_hidden_size``, which differs from
            ``num_features`` for models with a pre-logits layer such as MobileNetV3).
        preprocessing: As given.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.model_name = str(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, unnormalised features: ``(N, C, H, W)`` -> ``(N, num_features)``."""
        return self.model(x)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, num_features={self.num_features}"


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_timm_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a local timm-layout weights file into a timm model (or a :class:`TimmBackbone`).

    Classifier tensors the model does not have (it was built with ``num_classes=0``) are dropped;
    everything else must match exactly, so a file of another architecture is refused instead of
    half-loaded. A state dict saved from a :class:`TimmBackbone` (keys prefixed ``model.``) is
    accepted too.

    Args:
        model: The module to fill.
        path: A local ``.safetensors`` or torch file (bare or ``{'state_dict': ...}``).

    Returns:
        ``model``, for chaining.

    Raises:
        CheckpointError: The file is absent, unreadable, or does not fit the architecture.
    """
    target = model.model if isinstance(model, TimmBackbone) else model
    state_dict = read_state_dict(path)
    own = target.state_dict()
    if state_dict and not any(k in own for k in state_dict) and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    prefixes = _classifier_prefixes(target)
    dropped = [k for k in state_dict if k not in own and any(k == p or k.startswith(p + ".") for p in prefixes)]
    for k in dropped:
        del state_dict[k]
    if dropped:
        _logger.info("dropped classifier tensors %s from %s", dropped, path)
    name = getattr(target, "pretrained_cfg", {}).get("architecture", type(target).__name__)
    load_state_dict_strict(target, state_dict, source=str(path), expected=f"timm {name}")
    return model


def _check_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ConfigError(f"input_size must be [C, H, W] positive ints, got {list(size)}")
    return size  # type: ignore[return-value]


def build_timm_backbone(
    model_name: str,
    *,
    input_size: Sequence[int] | None = None,
    crop_pct: float | None = None,
    **model_kwargs: Any,
) -> TimmBackbone:
    """Create a randomly initialised timm backbone (no weights loaded, never a download).

    Args:
        model_name: A timm architecture name, e.g. ``"resnet18"``.
        input_size: ``[C, H, W]`` replacing timm's default input size in the preprocessing.
        crop_pct: Replaces timm's eval centre-crop fraction (1.0 feeds native-size images as is).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate=0.1``).

    Returns:
        The wrapped model.

    Raises:
        ConfigError: Unknown architecture, or arguments timm rejects.
    """
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown timm model {model_name!r}{hint}")
    for reserved, why in (("pretrained", "use weights=<local file>"), ("num_classes", "a backbone has no classifier")):
        if reserved in model_kwargs:
            raise ConfigError(f"timm backbone {model_name!r}: {reserved!r} cannot be set ({why})")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm model {model_name!r} rejects arguments {sorted(model_kwargs)}: {exc}") from None
    overrides: dict[str, Any] = {}
    if input_size is not None:
        overrides["input_size"] = _check_size(input_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    return TimmBackbone(model, Preprocessing.from_timm(model, **overrides))


@register_backbone("timm")
def timm_backbone(
    model_name: str,
    weights: str | None = None,
    input_size: list[int] | None = None,
    crop_pct: float | None = None,
    **model_kwargs: Any,
) -> TimmBackbone:
    """Build a timm backbone, optionally with local weights.

    Args:
        model_name: A timm architecture name, e.g. ``"resnet18"`` or ``"resnet50"``.
        weights: A local timm-layout weights file (safetensors or torch), or None for random init.
        input_size: ``[C, H, W]`` overriding the preprocessing input size, e.g. ``[3, 32, 32]`` to
            feed CIFAR images at native resolution.
        crop_pct: Overrides the eval centre-crop fraction (set 1.0 together with a native size).
        **model_kwargs: Passed to ``timm.create_model(model_name, pretrained=False, num_classes=0, ...)``.

    Returns:
        A :class:`TimmBackbone`.

    Raises:
        ConfigError: Unknown architecture or bad arguments.
        CheckpointError: ``weights`` is absent or does not fit.
    """
    backbone = build_timm_backbone(model_name, input_size=input_size, crop_pct=crop_pct, **model_kwargs)
    if weights is not None:
        load_timm_weights(backbone, weights)
    return backbone
