"""timm backbones: feature width, preprocessing, local weights round trip and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from compatembed.errors import CheckpointError, ConfigError
from compatembed.models import create_backbone
from compatembed.models.timm_backbone import TimmBackbone, load_timm_weights


@pytest.mark.parametrize(
    ("model_name", "width"),
    [("test_resnet", 96), ("resnet18", 512), ("mobilenetv3_small_050", 1024)],
)
def test_feature_width_matches_forward(model_name: str, width: int) -> None:
    """``num_features`` is the width ``forward`` really returns (MobileNetV3: the 1024-d pre-logits)."""
    torch.manual_seed(0)
    backbone = create_backbone("timm", model_name=model_name, input_size=[3, 64, 64]).eval()
    assert isinstance(backbone, TimmBackbone) and backbone.model_name == model_name
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 64))
    assert backbone.num_features == width
    assert out.shape == (2, width)


def test_preprocessing_defaults_come_from_timm() -> None:
    backbone = create_backbone("timm", model_name="resnet18")
    cfg = timm.data.resolve_model_data_config(timm.create_model("resnet18", pretrained=False))
    pre = backbone.preprocessing
    assert pre.input_size == tuple(cfg["input_size"]) == (3, 224, 224)
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.std == pytest.approx(cfg["std"])
    assert pre.interpolation == cfg["interpolation"] and pre.crop_pct == pytest.approx(cfg["crop_pct"])


def test_preprocessing_override_for_cifar() -> None:
    cfg = OmegaConf.create({"input_size": [3, 32, 32]})  # what Hydra passes
    backbone = create_backbone("timm", model_name="resnet18", input_size=cfg.input_size, crop_pct=1.0)
    assert backbone.preprocessing.input_size == (3, 32, 32)
    assert backbone.preprocessing.crop_pct == 1.0
    assert backbone.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_model_kwargs_reach_timm() -> None:
    backbone = create_backbone("timm", model_name="test_resnet", drop_rate=0.25)
    assert backbone.model.drop_rate == 0.25


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_through_local_file(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    trained = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / f"weights{suffix}"
    state = trained.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 1}, path)
    torch.manual_seed(1)
    loaded = create_backbone("timm", model_name="test_resnet", weights=str(path)).eval()
    fresh = create_backbone("timm", model_name="test_resnet").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        torch.testing.assert_close(loaded(x), expected)
        assert not torch.allclose(fresh(x), expected)


def test_backbone_state_dict_also_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = create_backbone("timm", model_name="test_resnet").eval()
    path = tmp_path / "backbone.pt"
    torch.save(src.state_dict(), path)  # keys prefixed "model."
    dst = load_timm_weights(create_backbone("timm", model_name="test_resnet").eval(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), str(path))
    with pytest.raises(CheckpointError) as info:
        create_backbone("timm", model_name="resnet34", weights=str(path))
    message = str(info.value)
    assert "resnet18.safetensors" in message and "timm resnet34" in message and "missing" in message
    assert "\n" not in message
    shape_message = r"1 shape mismatch: conv1.weight file \(64, 3, 7, 7\) vs model \(64, 1, 7, 7\)"
    with pytest.raises(CheckpointError, match=shape_message):
        create_backbone("timm", model_name="resnet18", weights=str(path), in_chans=1)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("timm", model_name="test_resnet", weights=str(tmp_path / "nope.safetensors"))


def test_unknown_timm_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown timm model 'resnet9000'"):
        create_backbone("timm", model_name="resnet9000")


@pytest.mark.parametrize(
    "kwargs", [{"pretrained": True}, {"num_classes": 10}, {"no_such_arg": 1}, {"input_size": [32, 32]}]
)
def test_bad_arguments_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_backbone("timm", model_name="test_resnet", **kwargs)
