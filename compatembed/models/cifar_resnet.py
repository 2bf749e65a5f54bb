"""The CIFAR ResNet family of He et al. (2016), section 4.2, written for this project.

This is the architecture of the deployed third-party "old model" in ``../shared/data/cifar10-resnet``
(ResNet-20 / ResNet-32 CIFAR-10 classifiers). Parameter names follow that checkpoint layout
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``) so its state dict loads
unchanged once the ``module.`` prefix is stripped.

Architecture: a 3x3 conv stem with 16 channels + BN + ReLU; three stages of ``n = (depth - 2) / 6``
basic blocks with 16/32/64 channels, stride 2 at the first block of stages 2 and 3; the "option A"
shortcut (parameter-free: subsample every second pixel and zero-pad the new channels) where the shape
changes; global average pooling; a ``linear`` 64 -> ``num_classes`` classifier.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compatembed.data import Preprocessing
from compatembed.errors import ConfigError
from compatembed.models.registry import load_state_dict_strict, read_state_dict, register_backbone

_logger = logging.getLogger(__name__)

CIFAR_RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
"""Depths with published CIFAR results (6n + 2 for n = 3, 5, 7, 9, 18)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut ("option A" of He et al.).

    Keeps every second pixel and zero-pads ``pad`` channels on each side, so a block that halves
    the resolution and doubles the width adds no parameters to the identity path.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to ``(N, C + 2 * pad, ceil(H / 2), ceil(W / 2))``."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if planes - in_planes != 2 * (planes // 4) or stride != 2:
                raise ValueError(
                    f"option A shortcut needs stride 2 and planes = 2 * in_planes, got {in_planes}->{planes}"
                )
            self.shortcut: nn.Module = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_planes, H, W)`` to ``(N, planes, H / stride, W / stride)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet whose ``forward`` returns the 64-d pooled feature (the embedding).

    The classifier is kept (as ``linear``, also reachable as :attr:`classifier`) because BCT's
    influence loss needs the deployed model's real classifier; :meth:`forward_logits` applies it.

    Args:
        depth: ``6n + 2`` layers; one of :data:`CIFAR_RESNET_DEPTHS` for the published variants.
        num_classes: Classifier outputs.

    Attributes:
        num_features: 64, the pooled feature width.
        preprocessing: 32x32 input, ImageNet mean/std (what the third-party weights expect).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"cifar_resnet depth must be 6n + 2 (e.g. {CIFAR_RESNET_DEPTHS}), got {depth}")
        if num_classes < 1:
            raise ConfigError(f"cifar_resnet num_classes must be positive, got {num_classes}")
        self.depth = depth
        self.num_classes = num_classes
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.num_features = 64
        self.preprocessing = Preprocessing(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        """The ``linear`` classifier (a property, so the state dict holds it once)."""
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, unnormalised features: ``(N, 3, H, W)`` -> ``(N, 64)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores: ``(N, 3, H, W)`` -> ``(N, num_classes)``."""
        return self.linear(self.forward(x))


def _guess_depth(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Depth a CIFAR ResNet state dict was saved from, read off its ``layer1`` block count."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"layer1\.(\d+)\.", k))}
    return 6 * (max(blocks) + 1) + 2 if blocks else None


def load_cifar_resnet_checkpoint(model: CifarResNet, path: str | os.PathLike[str]) -> CifarResNet:
    """Load CIFAR ResNet weights (e.g. the third-party ``resnet20-*.th``) into ``model``.

    Accepts ``{'state_dict': ...}`` or a bare state dict, with or without the ``module.`` prefix.

    Args:
        model: The module to fill; its depth and class count must match the file.
        path: A local ``.th``/``.pt``/``.safetensors`` file.

    Returns:
        ``model``, for chaining.

    Raises:
        CheckpointError: The file is absent or holds another architecture; the one-line message
            names the file, the expected depth and the first offending keys.
    """
    state_dict = read_state_dict(path)
    expected = f"cifar_resnet depth {model.depth} with {model.num_classes} classes"
    guessed = _guess_depth(state_dict)
    if guessed is not None and guessed != model.depth:
        expected += f" (the file looks like depth {guessed})"
    load_state_dict_strict(model, state_dict, source=str(path), expected=expected)
    _logger.info("loaded %s into cifar_resnet depth %d", path, model.depth)
    return model


@register_backbone("cifar_resnet")
def cifar_resnet(depth: int = 20, num_classes: int = 10, weights: str | None = None) -> CifarResNet:
    """Build a CIFAR ResNet backbone, optionally from a local checkpoint.

    Args:
        depth: One of :data:`CIFAR_RESNET_DEPTHS` (any ``6n + 2`` works).
        num_classes: Classifier outputs (10 for the third-party CIFAR-10 weights).
        weights: A local checkpoint file, or None for random (Kaiming) initialisation.

    Returns:
        A :class:`CifarResNet` (``(N, 3, 32, 32)`` -> ``(N, 64)``).
    """
    model = CifarResNet(depth=depth, num_classes=num_classes)
    if weights is not None:
        load_cifar_resnet_checkpoint(model, weights)
    return model


def _fixed_depth(depth: int) -> Callable[..., CifarResNet]:
    """A factory for one depth, so ``cifar_resnet20`` cannot be given another ``depth``."""

    def factory(num_classes: int = 10, weights: str | None = None) -> CifarResNet:
        return cifar_resnet(depth=depth, num_classes=num_classes, weights=weights)

    factory.__name__ = factory.__qualname__ = f"cifar_resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} backbone; see :func:`cifar_resnet`."
    return factory


for _depth in CIFAR_RESNET_DEPTHS:
    register_backbone(f"cifar_resnet{_depth}")(_fixed_depth(_depth))
