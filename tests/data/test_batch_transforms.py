"""Batched tensor transforms against their definition and against the per-image torchvision pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatembed.data import Preprocessing, SyntheticImages, build_transform
from compatembed.data.batch_transforms import random_crop_flip
from compatembed.errors import ConfigError

PRE = Preprocessing(input_size=(3, 16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def _pixels(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))


def test_eval_batch_equals_the_per_image_pipeline_bit_for_bit() -> None:
    data = SyntheticImages(num_classes=3, per_class=5, image_size=16)
    transform = build_transform(PRE, train=False)
    batch = transform.batch(torch.from_numpy(data.data))
    reference = torch.stack([transform(data[i][0]) for i in range(len(data))])
    assert batch.shape == (15, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, reference)


def test_eval_resize_is_close_to_pil() -> None:
    pre = Preprocessing(input_size=(3, 24, 24), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    data = SyntheticImages(num_classes=2, per_class=4, image_size=32)
    transform = build_transform(pre, train=False)
    batch = transform.batch(torch.from_numpy(data.data))
    reference = torch.stack([transform(data[i][0]) for i in range(len(data))])
    assert batch.shape == reference.shape == (8, 3, 24, 24)
    # antialiased tensor resize vs PIL's filter: a few grey levels apart at most, on average well under one
    assert (batch - reference).abs().mean() * 0.5 * 255 < 1.0


def test_crops_come_from_the_padded_image_at_the_drawn_offsets() -> None:
    images = _pixels(200, size=8)
    pad = 2
    crops, offsets, flipped = random_crop_flip(images, pad, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    for i in range(len(images)):
        top, left = offsets[i].tolist()
        expected = padded[i, top : top + 8, left : left + 8]
        if flipped[i]:
            expected = expected.flip(1)
        assert torch.equal(crops[i], expected)
    # every offset value is drawn, flips about half the time
    assert set(offsets.flatten().tolist()) == set(range(2 * pad + 1))
    assert 0.35 < flipped.float().mean() < 0.65


def test_training_batch_is_normalised_crop_of_the_source() -> None:
    images = _pixels(32)
    transform = build_transform(PRE, train=True)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batch = transform.batch(images, gen_a)
    crops, _, _ = random_crop_flip(images, 16 // 8, gen_b)  # the same draws, by construction
    expected = build_transform(PRE, train=False).batch(crops)  # normalisation only (16 px in, 16 px out)
    assert torch.equal(batch, expected)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_same_generator_same_batch_and_device_independent_draws() -> None:
    images = _pixels(16)
    transform = build_transform(PRE, train=True)
    a = transform.batch(images, torch.Generator().manual_seed(1))
    b = transform.batch(images, torch.Generator().manual_seed(1))
    c = transform.batch(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_augmentation_needs_a_generator_and_rgb() -> None:
    with pytest.raises(ConfigError, match="generator"):
        build_transform(PRE, train=True).batch(_pixels(2))
    gray = Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    assert not build_transform(gray, train=False).batchable
    with pytest.raises(ConfigError, match="pipeline=stream"):
        build_transform(gray, train=False).batch(_pixels(2))
