"""EmbeddingModel and Classifier: dimensions, normalisation, no-projection mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatembed.errors import ConfigError
from compatembed.models import Classifier, EmbeddingModel, create_backbone
from helpers.models import TinyBackbone


def test_projection_dims_and_unnormalised_forward(tiny_backbone: TinyBackbone) -> None:
    model = EmbeddingModel(tiny_backbone, 4)
    x = torch.randn(5, 3, 4, 4)
    z = model(x)
    assert z.shape == (5, 4) and model.embed_dim == 4
    expected = tiny_backbone(x) @ model.projection.weight.T + model.projection.bias
    torch.testing.assert_close(z, expected)
    assert not torch.allclose(z.norm(dim=1), torch.ones(5)), "forward must stay unnormalised"


def test_embed_is_l2_normalised(tiny_backbone: TinyBackbone) -> None:
    model = EmbeddingModel(tiny_backbone, 4)
    x = torch.randn(5, 3, 4, 4)
    e = model.embed(x)
    z = model(x).detach().numpy()
    torch.testing.assert_close(e, torch.from_numpy(z / ((z**2).sum(axis=1, keepdims=True) ** 0.5)))
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))


def test_normalize_false_embeds_raw(tiny_backbone: TinyBackbone) -> None:
    model = EmbeddingModel(tiny_backbone, 3, normalize=False)
    x = torch.randn(2, 3, 4, 4)
    assert model.normalize is False
    torch.testing.assert_close(model.embed(x), model(x))


def test_embed_dim_none_keeps_backbone_feature(tiny_backbone: TinyBackbone) -> None:
    model = EmbeddingModel(tiny_backbone, None)
    x = torch.randn(3, 3, 4, 4)
    assert model.embed_dim == tiny_backbone.num_features == 6
    torch.testing.assert_close(model(x), tiny_backbone(x))
    torch.testing.assert_close(model.embed(x), F.normalize(tiny_backbone(x), dim=1))
    assert set(model.state_dict()) == {f"backbone.{k}" for k in tiny_backbone.state_dict()}


def test_preprocessing_is_the_backbone_s(tiny_backbone: TinyBackbone) -> None:
    assert EmbeddingModel(tiny_backbone, 8).preprocessing is tiny_backbone.preprocessing


def test_gradients_reach_the_backbone(tiny_backbone: TinyBackbone) -> None:
    model = EmbeddingModel(tiny_backbone, 4)
    model.embed(torch.randn(4, 3, 4, 4)).sum().backward()
    assert tiny_backbone.fc.weight.grad is not None and tiny_backbone.fc.weight.grad.abs().sum() > 0


def test_with_a_real_backbone() -> None:
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8), 16).eval()
    with torch.no_grad():
        assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_bad_backbone_and_dims() -> None:
    with pytest.raises(ConfigError, match="num_features"):
        EmbeddingModel(nn.Linear(2, 2), 4)
    with pytest.raises(ConfigError, match="embed_dim"):
        EmbeddingModel(TinyBackbone(), 0)


def test_classifier_shape_and_bias() -> None:
    head = Classifier(8, 3)
    assert head.weight.shape == (3, 8) and head.bias is None and head.num_classes == 3
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), x @ head.weight.T)
    with_bias = Classifier(8, 3, bias=True)
    assert with_bias.bias is not None and with_bias.bias.shape == (3,)
    with pytest.raises(ConfigError):
        Classifier(0, 3)
