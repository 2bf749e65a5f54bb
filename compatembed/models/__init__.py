"""Backbones (timm, open_clip towers, CIFAR ResNet), embedding heads and model-version I/O."""

from compatembed.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers backbones)
from compatembed.models import efficientnet_lite as _efficientnet_lite  # noqa: F401
from compatembed.models import frozen_prefix as _frozen_prefix  # noqa: F401
from compatembed.models import open_clip_tower as _open_clip_tower  # noqa: F401
from compatembed.models import timm_backbone as _timm_backbone  # noqa: F401
from compatembed.models.cifar_resnet import CifarResNet, load_cifar_resnet_checkpoint
from compatembed.models.efficientnet_lite import load_efficientnet_lite0_weights, load_efficientnet_lite_weights
from compatembed.models.heads import Classifier, EmbeddingModel
from compatembed.models.registry import create_backbone, list_backbones, register_backbone
from compatembed.models.version import (
    CompatibilityEdge,
    LoadedVersion,
    load_manifest,
    load_model_version,
    save_model_version,
)

__all__ = [
    "Classifier",
    "CifarResNet",
    "CompatibilityEdge",
    "EmbeddingModel",
    "LoadedVersion",
    "create_backbone",
    "list_backbones",
    "load_cifar_resnet_checkpoint",
    "load_efficientnet_lite0_weights",
    "load_efficientnet_lite_weights",
    "load_manifest",
    "load_model_version",
    "register_backbone",
    "save_model_version",
]
