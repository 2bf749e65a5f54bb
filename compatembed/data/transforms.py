"""Preprocessing of a model version and the image transforms built from it.

A model version records its preprocessing (input size, normalisation, resize policy) in its manifest,
so that whoever embeds images later (extraction, the eval CLI, a client of the index service) feeds the
model exactly what it was trained on. :class:`Preprocessing` is that record; :func:`build_transform`
turns it into a ``PIL image -> (C, H, W) tensor`` callable for training or evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from compatembed.errors import ConfigError

_logger = logging.getLogger(__name__)

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}

AUGMENTATIONS: tuple[str, ...] = ("crop_flip", "none")
"""Names accepted by ``build_transform(augment=...)``."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into model inputs; stored in every model version's manifest.

    Attributes:
        input_size: ``(C, H, W)`` of the model input; ``C`` is 3 (RGB) or 1 (grayscale).
        mean: Per-channel mean subtracted after scaling pixels to ``[0, 1]`` (``C`` values).
        std: Per-channel divisor applied after the mean (``C`` values, all positive).
        interpolation: Resize filter: one of nearest, bilinear, bicubic, box, hamming, lanczos.
        crop_pct: Eval-time centre-crop fraction: images are resized to ``H / crop_pct`` and then
            centre-cropped to ``(H, W)``; 1.0 resizes straight to the input size.

    Raises:
        ConfigError: A field is malformed (wrong length, non-positive std, unknown interpolation...).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        # Normalise lists (JSON, OmegaConf) to tuples so the record stays hashable and comparable.
        try:
            size = tuple(int(v) for v in self.input_size)
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid preprocessing values: {e}") from None
        if len(size) != 3 or min(size) <= 0:
            raise ConfigError(
                f"preprocessing input_size must be 3 positive ints (C, H, W), got {list(self.input_size)}"
            )
        if size[0] not in (1, 3):
            raise ConfigError(f"preprocessing input_size channels must be 1 or 3, got {size[0]}")
        if len(mean) != size[0] or len(std) != size[0]:
            raise ConfigError(
                f"preprocessing mean/std need {size[0]} values (one per channel), got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ConfigError(f"preprocessing std must be positive, got {list(std)}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(_INTERPOLATIONS)}")
        if not 0.0 < crop_pct <= 1.0:
            raise ConfigError(f"preprocessing crop_pct must be in (0, 1], got {crop_pct}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (lists, not tuples), the manifest's ``preprocessing`` entry."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Rebuild a record written by :meth:`to_dict`.

        Raises:
            ConfigError: A required key is missing or an unknown key is present (a typo must not
                silently fall back to a default).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {unknown}; known: {sorted(known)}")
        missing = [k for k in ("input_size", "mean", "std") if k not in d]
        if missing:
            raise ConfigError(f"preprocessing is missing keys {missing}")
        return cls(**dict(d))

    @classmethod
    def from_timm(cls, model: torch.nn.Module, **overrides: Any) -> Preprocessing:
        """Read a timm model's pretrained data config, e.g. to fine-tune it with its own normalisation.

        Args:
            model: A model built by ``timm.create_model`` (its ``pretrained_cfg`` is used).
            **overrides: Fields to replace, e.g. ``input_size=(3, 32, 32)`` to feed CIFAR images at
                native resolution.

        Raises:
            ConfigError: An override names an unknown field.
        """
        from timm.data import resolve_model_data_config

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing overrides {unknown}; known: {sorted(known)}")
        cfg = resolve_model_data_config(model)
        values: dict[str, Any] = {k: cfg[k] for k in known if k in cfg}
        values.update(overrides)
        return cls(**values)


def _normalize_steps(pre: Preprocessing) -> list[Callable[[Any], Any]]:
    steps: list[Callable[[Any], Any]] = []
    if pre.input_size[0] == 1:
        steps.append(T.Grayscale(num_output_channels=1))
    steps += [T.ToTensor(), T.Normalize(mean=pre.mean, std=pre.std)]
    return steps


class ImageTransform:
    """A model version's image pipeline, runnable per PIL image or on a whole uint8 batch.

    Calling it maps one PIL image to a ``(C, H, W)`` tensor (torchvision, as DataLoader workers
    use it); :meth:`batch` runs the same definition on a ``(B, H, W, 3)`` uint8 tensor
    (:mod:`compatembed.data.batch_transforms`), which is what the array-cache data path uses.
    Picklable.

    Attributes:
        preprocessing: The record the pipeline is built from.
        train: Whether the training pipeline (with ``augment``) is used.
        augment: One of :data:`AUGMENTATIONS`.
    """

    def __init__(self, preprocessing: Preprocessing, *, train: bool, augment: str = "crop_flip") -> None:
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augment {augment!r}; known: {', '.join(AUGMENTATIONS)}")
        self.preprocessing = preprocessing
        self.train = bool(train)
        self.augment = augment
        self._compose = _compose(preprocessing, train=self.train, augment=augment)

    @property
    def random(self) -> bool:
        """True when the pipeline draws random numbers (training with an augmentation)."""
        return self.train and self.augment != "none"

    @property
    def batchable(self) -> bool:
        """True when :meth:`batch` can run this pipeline (RGB inputs)."""
        return self.preprocessing.input_size[0] == 3

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._compose(image)

    def batch(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float32 model inputs (``channels_last`` order)."""
        from compatembed.data.batch_transforms import apply_batch

        pre = self.preprocessing
        return apply_batch(pixels, input_size=pre.input_size, mean=pre.mean, std=pre.std, interpolation=pre.interpolation,
                           crop_pct=pre.crop_pct, train=self.train, augment=self.augment, generator=generator)

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, augment={self.augment!r}, {self.preprocessing})"


def build_transform(pre: Preprocessing, *, train: bool, augment: str = "crop_flip") -> ImageTransform:
    """Build the image pipeline of a model version.

    Eval (and ``augment="none"``): resize so the crop covers ``crop_pct`` of the image (the shorter
    side to ``floor(H / crop_pct)`` for square inputs), centre-crop to ``(H, W)``, scale to [0, 1],
    normalise. An image that is already ``H x W`` with ``crop_pct == 1`` keeps its exact pixels.

    Train with ``augment="crop_flip"``: the CIFAR recipe. Resize to ``(H, W)`` (a no-op when the
    image already has that size, an upscale when 32-px CIFAR feeds a 224-px model), then a random
    ``(H, W)`` crop from the image zero-padded by ``H // 8`` on every side, then a random horizontal
    flip, then scaling and normalisation.

    Args:
        pre: The preprocessing record.
        train: Build the training pipeline (applies ``augment``) instead of the eval one.
        augment: One of :data:`AUGMENTATIONS`; ignored when ``train`` is false.

    Returns:
        A picklable :class:`ImageTransform`: a PIL image to a float tensor of shape ``(C, H, W)``,
        or a uint8 batch to a float batch with :meth:`ImageTransform.batch`.

    Raises:
        ConfigError: ``augment`` is unknown.
    """
    return ImageTransform(pre, train=train, augment=augment)


def _compose(pre: Preprocessing, *, train: bool, augment: str) -> Callable[[Image.Image], torch.Tensor]:
    _, h, w = pre.input_size
    mode = _INTERPOLATIONS[pre.interpolation]
    if train and augment == "crop_flip":
        geometry: list[Callable[[Any], Any]] = [
            T.Resize((h, w), interpolation=mode),
            T.RandomCrop((h, w), padding=h // 8, fill=0, padding_mode="constant"),
            T.RandomHorizontalFlip(),
        ]
    else:
        if h == w:
            resize = T.Resize(math.floor(h / pre.crop_pct), interpolation=mode)
        else:
            resize = T.Resize((math.floor(h / pre.crop_pct), math.floor(w / pre.crop_pct)), interpolation=mode)
        geometry = [resize, T.CenterCrop((h, w))]
    return T.Compose(geometry + _normalize_steps(pre))
