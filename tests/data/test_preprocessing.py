"""Preprocessing records and the transforms built from them, against hand-computed pixels."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from compatembed.data import AUGMENTATIONS, Preprocessing, build_transform
from compatembed.errors import ConfigError

IMAGENET = Preprocessing(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _random_image(h: int, w: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), arr


def test_dict_round_trip_is_json_ready() -> None:
    d = IMAGENET.to_dict()
    assert d == {
        "input_size": [3, 32, 32],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    again = Preprocessing.from_dict(json.loads(json.dumps(d)))
    assert again == IMAGENET and isinstance(again.input_size, tuple) and hash(again) == hash(IMAGENET)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": (3, 32)}, "3 positive ints"),
        ({"input_size": (2, 32, 32), "mean": (0.5, 0.5), "std": (1, 1)}, "channels must be 1 or 3"),
        ({"mean": (0.5, 0.5)}, "need 3 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"interpolation": "cubic"}, "unknown interpolation 'cubic'; known: nearest, bilinear, bicubic"),
        ({"crop_pct": 0.0}, r"crop_pct must be in \(0, 1\]"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    values = {**IMAGENET.to_dict(), **kwargs}
    with pytest.raises(ConfigError, match=message):
        Preprocessing(**values)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown preprocessing keys \['crop'\]"):
        Preprocessing.from_dict({**IMAGENET.to_dict(), "crop": 1.0})
    with pytest.raises(ConfigError, match=r"missing keys \['std'\]"):
        Preprocessing.from_dict({"input_size": [3, 8, 8], "mean": [0, 0, 0]})


def test_from_timm() -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    ref = resolve_model_data_config(model)
    pre = Preprocessing.from_timm(model)
    assert pre.input_size == tuple(ref["input_size"]) and pre.mean == tuple(ref["mean"])
    assert pre.std == tuple(ref["std"]) and pre.interpolation == ref["interpolation"]
    assert pre.crop_pct == ref["crop_pct"]
    small = Preprocessing.from_timm(model, input_size=(3, 32, 32), crop_pct=1.0)
    assert small.input_size == (3, 32, 32) and small.crop_pct == 1.0 and small.mean == tuple(ref["mean"])
    with pytest.raises(ConfigError, match="unknown preprocessing overrides"):
        Preprocessing.from_timm(model, size=32)


@pytest.mark.parametrize("train", [False, True])
def test_constant_image_maps_to_normalised_value(train: bool) -> None:
    rgb = (200, 30, 120)
    img = Image.new("RGB", (32, 32), rgb)
    x = build_transform(IMAGENET, train=train)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET.mean, IMAGENET.std, strict=True)]
    if train:  # zero padding may enter the random crop: check the pixels the crop keeps from the image
        for c in range(3):
            inside = x[c][~torch.isclose(x[c], torch.tensor(-IMAGENET.mean[c] / IMAGENET.std[c]))]
            assert torch.allclose(inside, torch.tensor(expected[c]), atol=1e-5)
    else:
        for c in range(3):
            assert torch.allclose(x[c], torch.full((32, 32), expected[c]), atol=1e-5)


def test_eval_is_identity_geometry_at_input_size() -> None:
    img, arr = _random_image(32, 32)
    plain = Preprocessing(input_size=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    for transform in (build_transform(plain, train=False), build_transform(plain, train=True, augment="none")):
        x = transform(img)
        assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, atol=1e-7)


def test_eval_resize_and_center_crop() -> None:
    # crop_pct 0.5 at 16 px: shorter side to 32 (already 32 here), then the central 16x16.
    img, arr = _random_image(32, 48, seed=1)  # H=32, W=48
    pre = Preprocessing(input_size=(3, 16, 16), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.5)
    x = build_transform(pre, train=False)(img)
    assert torch.allclose(x, torch.from_numpy(arr[8:24, 16:32]).permute(2, 0, 1).float() / 255, atol=1e-7)
    # A larger image is downscaled (shorter side 64 -> 32) before the crop: compare with PIL directly.
    img2, _ = _random_image(64, 64, seed=2)
    ref = np.asarray(img2.resize((32, 32), Image.BILINEAR))[8:24, 8:24]
    x2 = build_transform(pre, train=False)(img2)
    assert torch.allclose(x2, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255, atol=1e-7)


def test_train_crop_flip_varies_and_flips() -> None:
    # Left half black, right half white: a flip moves the white half to the left.
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 16:] = 255
    img = Image.fromarray(arr)
    plain = Preprocessing(input_size=(3, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    transform = build_transform(plain, train=True)
    torch.manual_seed(0)
    outs = [transform(img) for _ in range(40)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    left_white = [bool(o[0, 16, :8].mean() > 0.5) for o in outs]
    assert any(left_white) and not all(left_white)
    assert len({tuple(o[0, 16].tolist()) for o in outs}) > 5  # shifted crops differ
    # Every output is a shifted (and maybe flipped) copy: values are only 0 and 1.
    assert all(torch.all((o == 0) | (o == 1)) for o in outs)


def test_train_resizes_small_images_to_input_size() -> None:
    pre = Preprocessing(input_size=(3, 64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    img, _ = _random_image(32, 32)
    assert build_transform(pre, train=True)(img).shape == (3, 64, 64)
    assert build_transform(pre, train=False)(img).shape == (3, 64, 64)


def test_grayscale_and_pickling() -> None:
    pre = Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    transform = pickle.loads(pickle.dumps(build_transform(pre, train=False)))
    x = transform(Image.new("RGB", (16, 16), (255, 255, 255)))
    assert x.shape == (1, 16, 16) and torch.allclose(x, torch.ones(1, 16, 16))


def test_unknown_augment() -> None:
    assert AUGMENTATIONS == ("crop_flip", "none")
    with pytest.raises(ConfigError, match="unknown augment 'randaugment'; known: crop_flip, none"):
        build_transform(IMAGENET, train=True, augment="randaugment")
