"""open_clip image towers: tiny configs, local weights only, never the network."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch

from compatembed.errors import CheckpointError, ConfigError
from compatembed.models import create_backbone
from compatembed.models.open_clip_tower import OpenClipImageTower


def tiny(embed_dim: int = 32, width: int = 64) -> dict[str, Any]:
    """A ViT small enough to build in milliseconds (overrides ViT-B-32's config)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any socket connection or open_clip download."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)


def test_tiny_config_builds_offline(no_network: None) -> None:
    torch.manual_seed(0)
    tower = create_backbone("open_clip", model_name="ViT-B-32", **tiny(embed_dim=24))
    assert isinstance(tower, OpenClipImageTower)
    assert tower.num_features == 24
    with torch.no_grad():
        assert tower.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    pre = tower.preprocessing
    assert pre.input_size == (3, 32, 32)
    assert pre.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert pre.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert pre.interpolation == "bicubic" and pre.crop_pct == 1.0
    assert all(k.startswith("visual.") for k in tower.state_dict()), "only the image tower is kept"


def test_local_weights_round_trip(tmp_path: Path, no_network: None) -> None:
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **tiny()).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": clip.state_dict(), "epoch": 1}, path)
    torch.manual_seed(1)
    tower = create_backbone("open_clip", model_name="ViT-B-32", weights=str(path), **tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), clip.encode_image(x))


def test_weights_of_another_config_are_refused(tmp_path: Path, no_network: None) -> None:
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **tiny(width=96))
    path = tmp_path / "wide.pt"
    torch.save(clip.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("open_clip", model_name="ViT-B-32", weights=str(path), **tiny(width=64))
    assert "wide.pt" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("weights", ["openai", "laion2b_s34b_b79k", "missing.pt"])
def test_tags_and_missing_files_never_download(weights: str, no_network: None) -> None:
    with pytest.raises(CheckpointError, match="local checkpoint file"):
        create_backbone("open_clip", model_name="ViT-B-32", weights=weights, **tiny())


@pytest.mark.parametrize(
    ("model_name", "kwargs"),
    [
        ("ViT-Nope-1", {}),
        ("hf-hub:timm/ViT-B-32", {}),
        ("ViT-B-32", {"pretrained": "openai"}),
        ("ViT-B-32", {"cache_dir": "/tmp"}),
        ("ViT-B-32", {"no_such_arg": 1}),
    ],
)
def test_bad_names_and_arguments_are_config_errors(model_name: str, kwargs: dict, no_network: None) -> None:
    with pytest.raises(ConfigError):
        create_backbone("open_clip", model_name=model_name, **{**tiny(), **kwargs})
