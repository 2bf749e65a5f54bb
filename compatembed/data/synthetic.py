"""A tiny generated image dataset with learnable class structure, for fast tests only."""

from __future__ import annotations

import colorsys
import logging
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from compatembed.data._common import Transform, pixel_item
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)

_SPLITS = {"train": 1, "test": 2}


class SyntheticImages(Dataset):
    """Coloured sinusoidal gratings, one colour/orientation/frequency per class, plus noise.

    Meant for tests that must train something in seconds: a tiny model separates the classes in
    a few steps (even nearest-class-mean on raw pixels does), yet every image differs (random
    phase, brightness and pixel noise). The class structure depends on ``seed`` only, the samples
    on ``seed`` and ``split``: ``split="test"`` gives fresh images of the same classes. Items are
    ordered class by class, and every call with the same arguments gives the same pixels.

    Args:
        num_classes: Number of classes, at least 1.
        per_class: Images per class, at least 1.
        image_size: Side of the square RGB images, at least 4.
        seed: Selects the class structure and, with ``split``, the samples.
        split: ``"train"`` or ``"test"``.
        transform: Applied to each PIL RGB image; ``None`` returns the image itself.

    Attributes:
        data: The images, uint8 ``(N, S, S, 3)``.
        targets: Labels, int64 ``(N,)``.
        ids: Item ids, int64 ``(N,)`` (``arange(N)``).
        classes: ``["class0", "class1", ...]`` (zero-padded so alphabetical order is label order).

    Raises:
        DataError: A size is out of range or ``split`` is unknown.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        per_class: int = 20,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        transform: Transform | None = None,
    ) -> None:
        if num_classes < 1 or per_class < 1 or image_size < 4:
            raise DataError(
                f"synthetic dataset needs num_classes >= 1, per_class >= 1, image_size >= 4; "
                f"got {num_classes}, {per_class}, {image_size}"
            )
        if split not in _SPLITS:
            raise DataError(f"unknown synthetic split {split!r}; known: {', '.join(_SPLITS)}")
        self.num_classes, self.per_class, self.image_size = num_classes, per_class, image_size
        self.seed, self.split = seed, split
        width = len(str(num_classes - 1))
        self.classes: list[str] = [f"class{c:0{width}d}" for c in range(num_classes)]
        self.data: np.ndarray = self._generate()
        self.targets: np.ndarray = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
        self.ids: np.ndarray = np.arange(num_classes * per_class, dtype=np.int64)
        self.transform = transform

    def _generate(self) -> np.ndarray:
        k, n, s = self.num_classes, self.per_class, self.image_size
        structure = np.random.default_rng([self.seed, 0])
        samples = np.random.default_rng([self.seed, _SPLITS[self.split]])
        # Evenly spaced hues (rotated by the seed) keep class colours apart even for similar draws.
        hue0 = structure.uniform()
        base = np.array([colorsys.hsv_to_rgb((hue0 + c / k) % 1.0, 0.65, 0.8) for c in range(k)])  # (K, 3)
        stripe = np.array([colorsys.hsv_to_rgb((hue0 + c / k + 0.5) % 1.0, 0.5, 0.6) for c in range(k)])
        theta = structure.permutation(k) * np.pi / k  # (K,) distinct orientations
        freq = structure.uniform(1.5, 4.0, size=k)  # (K,) cycles per image

        yy, xx = np.mgrid[0:s, 0:s] / s  # (S, S) each, in [0, 1)
        images = np.empty((k, n, s, s, 3), dtype=np.float64)
        for c in range(k):
            phase = samples.uniform(0, 2 * np.pi, size=(n, 1, 1))
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq[c] * (xx * np.cos(theta[c]) + yy * np.sin(theta[c])) + phase)
            mix = 0.5 * wave[..., None]  # (n, S, S, 1): weight of the stripe colour
            img = (1 - mix) * base[c] + mix * stripe[c]
            img = img * samples.uniform(0.85, 1.15, size=(n, 1, 1, 1))  # brightness
            images[c] = img + samples.normal(0.0, 0.08, size=img.shape)  # pixel noise
        pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
        return pixels.reshape(k * n, s, s, 3)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return pixel_item(self.data, self.targets, index, self.transform)

    def __repr__(self) -> str:
        return (
            f"SyntheticImages(num_classes={self.num_classes}, per_class={self.per_class}, "
            f"image_size={self.image_size}, seed={self.seed}, split={self.split!r})"
        )
