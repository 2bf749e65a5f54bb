"""What every dataset in this package shares: the protocol callers code against, file-type checks, decoding."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from compatembed.errors import DataError

IMG_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
"""File suffixes (lower case) treated as images; other files in a folder or archive are skipped."""

Transform = Callable[[Image.Image], Any]


@runtime_checkable
class LabeledImageDataset(Protocol):
    """The interface of every dataset here: what training, extraction and evaluation rely on.

    ``targets[i]`` is the label of item ``i`` (an index into ``classes``, the class names of the
    FULL dataset, so a class keeps its id in any subset); ``ids[i]`` is a stable item id (the
    position of the item in its full, sorted split), which galleries store to identify images.
    """

    targets: np.ndarray
    ids: np.ndarray
    classes: list[str]
    transform: Transform | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, int]: ...


def is_image_name(name: str) -> bool:
    """True when the file name (last ``/`` part) has an image suffix and is not hidden (``._x.jpg`` from macOS tar)."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return dot > 0 and not base.startswith(".") and base[dot:].lower() in IMG_EXTENSIONS


def decode_rgb(data: bytes, name: str = "image") -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image (fully loaded, detached from the buffer).

    Raises:
        DataError: The bytes are not a complete image of a known format; the message names ``name``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways of saying "corrupt"
        raise DataError(f"cannot decode {name}: {e} (a truncated or malformed image file)") from None


def open_rgb(path: str) -> Image.Image:
    """Read an image file into an RGB PIL image; a corrupt file raises :class:`DataError` naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return decode_rgb(data, path)


def as_int64(values: Any) -> np.ndarray:
    """Return ``values`` as a contiguous int64 array of shape ``(N,)``."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1))


def pixel_item(pixels: np.ndarray, targets: np.ndarray, index: int, transform: Transform | None) -> tuple[Any, int]:
    """Item ``index`` of a dataset held as decoded ``(N, H, W, 3)`` uint8 pixels: the PIL image (transformed) and its label.

    Every in-memory dataset (CIFAR, synthetic, decoded array cache) serves its items through this one function,
    so an image reaches the transform the same way whichever of them holds it.
    """
    image = Image.fromarray(np.asarray(pixels[index]))
    return (transform(image) if transform is not None else image), int(targets[index])
