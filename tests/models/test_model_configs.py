"""Every ``conf/model/*.yaml`` instantiates with Hydra into a working EmbeddingModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from compatembed.models import EmbeddingModel

from .conftest import shared_data_root

MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"

# name -> (backbone name, embed_dim, input size)
EXPECTED = {
    "cifar_resnet20": ("cifar_resnet", 64, (3, 32, 32)),
    "cifar_resnet32": ("cifar_resnet", 64, (3, 32, 32)),
    "resnet18_cifar": ("timm", 128, (3, 32, 32)),
    "resnet50_128": ("timm", 128, (3, 224, 224)),
    "efficientnet_lite0": ("efficientnet_lite0", 128, (3, 224, 224)),
    "open_clip_vitb32": ("open_clip", 512, (3, 224, 224)),
    "cifar_resnet20_shared": ("cifar_resnet", 64, (3, 32, 32)),
}


def load(name: str, **paths: str) -> OmegaConf:
    """The model group as it sits in a composed config: ``cfg.model`` next to ``cfg.paths``."""
    return OmegaConf.create({"model": OmegaConf.load(MODEL_CONF / f"{name}.yaml"), "paths": paths})


def test_every_expected_config_exists() -> None:
    assert {p.stem for p in MODEL_CONF.glob("*.yaml")} >= set(EXPECTED)


@pytest.mark.parametrize(
    "name", ["cifar_resnet20", "cifar_resnet32", "resnet18_cifar", "resnet50_128", "efficientnet_lite0"]
)
def test_config_instantiates_and_embeds(name: str) -> None:
    backbone_name, embed_dim, input_size = EXPECTED[name]
    cfg = load(name)
    assert cfg.model.backbone.name == backbone_name
    model = instantiate(cfg.model)
    assert isinstance(model, EmbeddingModel)
    assert model.embed_dim == embed_dim and model.normalize
    assert model.preprocessing.input_size == input_size
    with torch.no_grad():
        e = model.eval().embed(torch.randn(2, *input_size))
    assert e.shape == (2, embed_dim)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))


def test_resnet18_cifar_feeds_native_32px() -> None:
    model = instantiate(load("resnet18_cifar").model)
    assert model.preprocessing.crop_pct == 1.0 and model.backbone.model_name == "resnet18"


def test_open_clip_config_requires_weights() -> None:
    cfg = load("open_clip_vitb32")
    assert OmegaConf.is_missing(cfg.model.backbone, "weights")
    with pytest.raises(MissingMandatoryValue):
        instantiate(cfg.model)


def test_open_clip_config_with_local_weights(tmp_path: Path) -> None:
    """Shrunk through overrides so it builds fast; the weights file is a local checkpoint."""
    import open_clip

    from .test_open_clip_tower import tiny

    clip = open_clip.create_model("ViT-B-32", pretrained=None, **tiny(embed_dim=16))
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    cfg = load("open_clip_vitb32")
    cfg.model.backbone = OmegaConf.merge(cfg.model.backbone, {"weights": str(path), **tiny(embed_dim=16)})
    model = instantiate(cfg.model)
    assert model.embed_dim == 16 and model.preprocessing.input_size == (3, 32, 32)


def test_shared_resnet20_config_loads_third_party_weights() -> None:
    root = shared_data_root()
    checkpoint = root / "cifar10-resnet" / "resnet20-12fca82f.th"
    if not checkpoint.is_file():
        pytest.skip(f"shared checkpoint not found under {root}")
    model = instantiate(load("cifar_resnet20_shared", data_root=str(root)).model)
    assert model.embed_dim == 64 and isinstance(model.projection, torch.nn.Identity)
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.backbone.linear.weight, raw["module.linear.weight"], rtol=0, atol=0)
