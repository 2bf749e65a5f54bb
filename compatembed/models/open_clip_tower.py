"""The image tower of an open_clip model as a backbone.

Only ``model.visual`` is kept: retrieval embeds images, and dropping the text tower saves most of the
memory of a CLIP model. Weights are a local checkpoint file or nothing: open_clip treats any
``pretrained`` string that is not a file as a tag to download, so this module checks for the file
first and passes ``pretrained=None`` when there are no weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compatembed.data import Preprocessing
from compatembed.errors import CheckpointError, ConfigError
from compatembed.models.registry import register_backbone

_logger = logging.getLogger(__name__)

# create_model arguments that could fetch weights or change where the model lives; owned here.
_RESERVED = (
    "pretrained",
    "pretrained_image",
    "pretrained_text",
    "pretrained_image_path",
    "pretrained_text_path",
    "cache_dir",
    "require_pretrained",
    "load_weights",
    "device",
    "jit",
)


class OpenClipImageTower(nn.Module):
    """An open_clip image tower: ``(N, 3, H, W)`` -> ``(N, num_features)`` (CLIP image embedding).

    Args:
        visual: ``model.visual`` of an open_clip model.
        model_name: The open_clip config name it was built from.
        preprocessing: How its inputs are prepared.
        num_features: Output width (the CLIP embedding size).
    """

    def __init__(self, visual: nn.Module, model_name: str, preprocessing: Preprocessing, num_features: int) -> None:
        super().__init__()
        self.visual = visual
        self.model_name = model_name
        self.preprocessing = preprocessing
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding: ``(N, 3, H, W)`` -> ``(N, num_features)``."""
        return self.visual(x)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, num_features={self.num_features}"


def _preprocessing_of(visual: nn.Module) -> Preprocessing:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(visual)
    size = cfg.get("size", getattr(visual, "image_size", 224))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocessing(
        input_size=(3, int(h), int(w)),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=1.0,  # open_clip resizes the shorter side to the input size, then centre-crops
    )


def _output_dim(visual: nn.Module, input_size: tuple[int, int, int]) -> int:
    dim = getattr(visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    was_training = visual.training
    visual.eval()
    with torch.no_grad():
        out = visual(torch.zeros(1, *input_size))
    visual.train(was_training)
    return int(out.shape[-1])


@register_backbone("open_clip")
def open_clip_backbone(model_name: str, weights: str | None = None, **model_kwargs: Any) -> OpenClipImageTower:
    """Build the image tower of a built-in open_clip architecture.

    Args:
        model_name: An open_clip config name, e.g. ``"ViT-B-32"`` (no ``hf-hub:``/``local-dir:``
            schema: those read from elsewhere).
        weights: A local checkpoint file of the full CLIP model, loaded by
            ``open_clip.create_model(..., pretrained=<file>)``; None for random init.
        **model_kwargs: Passed to ``open_clip.create_model``, e.g. ``embed_dim``, ``vision_cfg`` and
            ``text_cfg`` to shrink the model in tests.

    Returns:
        An :class:`OpenClipImageTower` with the model's own image mean/std/size as preprocessing.

    Raises:
        ConfigError: Unknown architecture or arguments open_clip rejects.
        CheckpointError: ``weights`` is not a local file or does not fit the architecture.
    """
    import open_clip  # imported here: importing it costs seconds, and most runs never build a CLIP tower

    if ":" in model_name or model_name.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    reserved = sorted(set(_RESERVED) & set(model_kwargs))
    if reserved:
        raise ConfigError(f"open_clip backbone: {reserved} cannot be set (weights come only from weights=<local file>)")
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"open_clip weights must be a local checkpoint file (tags would download): {weights}")
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=str(weights) if weights is not None else None,
            pretrained_image=False,
            pretrained_text=False,
            **model_kwargs,
        )
    except TypeError as exc:
        raise ConfigError(f"open_clip model {model_name!r} rejects arguments {sorted(model_kwargs)}: {exc}") from None
    except Exception as exc:
        if weights is None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights {weights} do not fit open_clip {model_name}: {first[:300]}") from exc
    visual = model.visual
    preprocessing = _preprocessing_of(visual)
    num_features = _output_dim(visual, preprocessing.input_size)
    _logger.info("open_clip %s image tower: %d features, weights %s", model_name, num_features, weights)
    return OpenClipImageTower(visual, model_name, preprocessing, num_features)
