"""The image pipeline of :func:`~compatembed.data.build_transform`, applied to a whole uint8 batch at once.

Same definition as the per-image torchvision pipeline, as tensor operations on a ``(B, H, W, 3)``
uint8 batch, on whatever device the batch is on (the GPU when training there):

- geometry: resize when the stored size differs from the model's input size (bilinear/bicubic with
  antialiasing, close to PIL's filters but not bit-identical; no resize at all when the sizes
  match, which is the CIFAR case); for training with ``crop_flip``, a random ``(H, W)`` crop of the
  image zero-padded by ``H // 8`` on every side (offsets uniform in ``[0, 2·pad]``, independently per
  axis and per image) and a horizontal flip with probability 1/2; for evaluation, a centre crop;
- scaling to ``[0, 1]`` and per-channel normalisation, in the same float operations as ``ToTensor``
  and ``Normalize``, so an un-augmented batch equals the per-image pipeline bit for bit.

The result is ``(B, 3, H, W)`` float32 in ``channels_last`` memory order (what convolutions on
CPU and GPU run fastest on), produced without an extra copy.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from compatembed.errors import ConfigError

_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST}


def _resize_nhwc(images: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    if interpolation not in _MODES:
        raise ConfigError(f"batched resize supports {', '.join(_MODES)}, not {interpolation!r}; use data.pipeline=stream")
    nchw = images.permute(0, 3, 1, 2)
    out = TF.resize(nchw, size, interpolation=_MODES[interpolation], antialias=True)
    return out.permute(0, 2, 3, 1)


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(H, W)`` crops of the zero-padded images, each flipped horizontally with probability 1/2.

    Args:
        images: ``(B, H, W, C)`` batch (any dtype, any device).
        padding: Zero padding added on every side before cropping.
        generator: A CPU generator: the draws do not depend on the device.

    Returns:
        The ``(B, H, W, C)`` crops, and the draws: ``offsets`` ``(B, 2)`` (top, left) into the padded
        image, each in ``[0, 2·padding]``, and ``flipped`` ``(B,)`` bool.
    """
    b, h, w, _ = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator)
    flipped = torch.rand(b, generator=generator) < 0.5
    device = images.device
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding)) if padding else images
    rows = offsets[:, :1] + torch.arange(h)  # (B, H)
    cols = offsets[:, 1:] + torch.where(flipped[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))  # (B, W)
    index_b = torch.arange(b)[:, None, None]
    crops = padded[index_b.to(device), rows[:, :, None].to(device), cols[:, None, :].to(device)]
    return crops, offsets, flipped


def to_normalized(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float32 in ``channels_last`` order, ``(x / 255 − mean) / std``."""
    x = images.permute(0, 3, 1, 2).to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous(memory_format=torch.channels_last)


def apply_batch(
    images: torch.Tensor,
    *,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str,
    crop_pct: float,
    train: bool,
    augment: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The model-input batch for ``(B, H0, W0, 3)`` uint8 pixels (see the module docstring).

    Raises:
        ConfigError: A grayscale model input (use the per-image path), or a random augmentation
            without a generator.
    """
    c, h, w = input_size
    if c != 3:
        raise ConfigError("batched transforms produce RGB inputs; a 1-channel model needs data.pipeline=stream")
    stored = tuple(images.shape[1:3])
    if train and augment == "crop_flip":
        if generator is None:
            raise ConfigError("random augmentation needs a generator")
        if stored != (h, w):
            images = _resize_nhwc(images, [h, w], interpolation)
        images, _, _ = random_crop_flip(images, h // 8, generator)
    else:
        if stored != (h, w) or crop_pct != 1.0:
            size = [math.floor(h / crop_pct)] if h == w else [math.floor(h / crop_pct), math.floor(w / crop_pct)]
            if not (h == w and min(stored) == size[0]) and stored != tuple(size):
                images = _resize_nhwc(images, size, interpolation)
            images = TF.center_crop(images.permute(0, 3, 1, 2), [h, w]).permute(0, 2, 3, 1)
    return to_normalized(images, mean, std)
