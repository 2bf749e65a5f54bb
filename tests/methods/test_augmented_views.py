"""Augmented feature views for post-hoc map fits: seeded, repeatable, the same crops for every model,
each a crop-and-flip of the zero-padded image, refused where they cannot be paired."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from compatembed.data import Preprocessing, SyntheticImages, build_transform
from compatembed.data.array_cache import decode_to_array
from compatembed.embeddings import embed_dataset
from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.lambda_orth import LambdaOrth
from compatembed.models.version import load_model_version

SIZE = 8
PAD = SIZE // 8  # the crop_flip padding of build_transform


class Pixels(nn.Module):
    """A 'model' whose embedding is its input back in [0, 255] pixel units (undoing its normalisation)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.preprocessing = Preprocessing(input_size=(3, SIZE, SIZE), mean=(mean,) * 3, std=(std,) * 3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preprocessing
        m = torch.tensor(pre.mean).view(1, -1, 1, 1)
        s = torch.tensor(pre.std).view(1, -1, 1, 1)
        return ((x * s + m) * 255).round().permute(0, 2, 3, 1).flatten(1)  # NHWC order, as the array stores


def _view(model, arrays, seed: int) -> np.ndarray:
    return embed_dataset(model, arrays, batch_size=4, progress=False, augment_seed=seed).embeddings


def _arrays(pre: Preprocessing, train: bool = True):
    arrays = decode_to_array(SyntheticImages(num_classes=3, per_class=5, image_size=SIZE), None)
    arrays.transform = build_transform(pre, train=train, augment="crop_flip")
    return arrays


def _crops_and_flips(image: np.ndarray) -> list[np.ndarray]:
    """Every (SIZE, SIZE) crop of the zero-padded image, flipped or not: what one draw may give."""
    padded = np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))
    out = []
    for top in range(2 * PAD + 1):
        for left in range(2 * PAD + 1):
            crop = padded[top : top + SIZE, left : left + SIZE]
            out += [crop, crop[:, ::-1]]
    return out


def test_a_view_is_a_crop_and_flip_of_every_item_and_the_same_for_two_models():
    a, b = Pixels(0.5, 0.5), Pixels(0.2, 0.3)  # one input size, different normalisations
    arrays_a, arrays_b = _arrays(a.preprocessing), _arrays(b.preprocessing)
    view_a = _view(a, arrays_a, 1)
    view_b = _view(b, arrays_b, 1)
    np.testing.assert_allclose(view_a, view_b, atol=1e-3)  # the same crops and flips: pairs stay paired
    pixels = arrays_a.pixels
    assert view_a.shape == (len(pixels), SIZE * SIZE * 3)
    changed = 0
    for i, row in enumerate(view_a):
        image = row.reshape(SIZE, SIZE, 3)
        assert any(np.array_equal(image, c) for c in _crops_and_flips(pixels[i].astype(np.float32))), f"item {i}"
        changed += not np.array_equal(image, pixels[i])
    assert changed > 0  # the augmentation did something


def test_a_view_depends_on_its_seed_only():
    model = Pixels(0.5, 0.5)
    arrays = _arrays(model.preprocessing)
    first = _view(model, arrays, 3)
    assert np.array_equal(first, _view(model, arrays, 3))
    assert not np.array_equal(first, _view(model, arrays, 4))


def _context(augmented_view, tmp_path=None) -> MethodContext:
    pre = Pixels(0.5, 0.5).preprocessing
    return MethodContext(
        train_set=_arrays(pre, train=False), eval_view=lambda p: _arrays(p, train=False), num_classes=3,
        train_classes=[0, 1, 2], device=torch.device("cpu"), batch_size=4, progress=False,
        augmented_view=augmented_view, cache_dir=tmp_path,
    )


def test_context_views_are_cached_apart_and_refused_where_they_cannot_be_paired(tmp_path):
    model = Pixels(0.5, 0.5)
    ctx = _context(lambda p: _arrays(p), tmp_path)
    plain, view = ctx.features(model, name="m"), ctx.features(model, name="m", view=1)
    assert plain.shape == view.shape and not torch.equal(plain, view)
    assert torch.equal(view, ctx.features(model, name="m", view=1))  # from the cache
    assert len(list(tmp_path.glob("m-view1-*.pt"))) == 1 and len(list(tmp_path.glob("m-*.pt"))) == 2
    with pytest.raises(ConfigError, match="decoded array"):
        streamed = SyntheticImages(num_classes=3, per_class=5, image_size=SIZE,
                                   transform=build_transform(model.preprocessing, train=True, augment="crop_flip"))
        _context(lambda p: streamed).features(model, name="m", view=1)
    with pytest.raises(ConfigError, match="augmented view"):
        _context(None).features(model, name="m", view=1)
    with pytest.raises(ConfigError, match="data.augment=none"):
        plain = _arrays(model.preprocessing)
        plain.transform = build_transform(model.preprocessing, train=True, augment="none")
        _context(lambda p: plain).features(model, name="m", view=1)
    with pytest.raises(ConfigError, match=">= 0"):
        ctx.features(model, name="m", view=-1)


def test_post_hoc_fit_pairs_stack_the_views_with_their_labels(versions, new_model, synthetic_context):
    model = new_model(16)
    ctx = synthetic_context(model)
    ctx.augmented_view = lambda pre: _synthetic_array(pre)
    ctx.train_set = _synthetic_array(model.preprocessing, train=False)
    ctx.eval_view = lambda pre: _synthetic_array(pre, train=False)
    method = LambdaOrth(model, 10, old_version=str(versions["old"]), fit_views=2)
    method.setup(ctx)
    x_new, x_old = method.train_features(ctx)
    n = len(ctx.train_set)
    assert x_new.shape[0] == x_old.shape[0] == 3 * n
    assert torch.equal(x_new[:n], ctx.features(model, name="new"))  # the plain view first
    assert not torch.equal(x_new[n : 2 * n], x_new[2 * n :])  # two different draws
    assert method.train_labels(ctx).tolist() == ctx.labels().tolist() * 3
    with pytest.raises(ConfigError, match="one input size"):
        method.check_views_pairable(SimpleNamespace(preprocessing=Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3)))
    with pytest.raises(ConfigError, match="fit_views must be >= 0"):
        LambdaOrth(new_model(16), 10, old_version=str(versions["old"]), fit_views=-1)


def _synthetic_array(pre: Preprocessing, train: bool = True):
    arrays = decode_to_array(SyntheticImages(num_classes=10, per_class=6, split="train"), None)
    arrays.transform = build_transform(pre, train=train, augment="crop_flip")
    return arrays


def test_a_training_run_fits_on_the_augmented_pairs_and_says_so(versions, tmp_path):
    from compatembed.training.run import train
    from helpers.configs import compose_config

    out = train(compose_config("train", [
        "data=synthetic", "trainer=smoke", "logger=none", "paths.cache_dir=null", "model=cifar_resnet20",
        "method=lambda_orth", f"method.old_version={versions['old']}", "method.fit_views=1", "method.fit_steps=5",
        "data.augment=crop_flip", "version_id=lo_views", f"output_dir={tmp_path / 'lo_views'}",
    ]))
    facts = json.loads((out / "manifest.json").read_text())["training"]["lambda_orth"]
    n_train = 10 * 20  # conf/data/synthetic.yaml: 20 training images per class
    assert facts["fit_views"] == 1 and facts["fit_pairs"] == 2 * n_train
    assert load_model_version(out).manifest["compatibility"][0]["kind"] == "affine"
