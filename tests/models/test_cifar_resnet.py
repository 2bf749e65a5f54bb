"""CIFAR ResNet (He et al. 2016): architecture, option-A shortcut, third-party checkpoints, real accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compatembed.errors import CheckpointError, ConfigError
from compatembed.models import CifarResNet, create_backbone, load_cifar_resnet_checkpoint
from compatembed.models.cifar_resnet import CIFAR_RESNET_DEPTHS, BasicBlock, OptionAShortcut


def expected_parameter_count(depth: int, num_classes: int = 10) -> int:
    """Count by hand: 3x3 convs without bias, BN (weight + bias), option-A shortcuts add nothing."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += 9 * in_planes * planes + 2 * planes  # conv1 + bn1
            total += 9 * planes * planes + 2 * planes  # conv2 + bn2
            in_planes = planes
    return total + 64 * num_classes + num_classes  # linear


@pytest.mark.parametrize("depth", CIFAR_RESNET_DEPTHS)
def test_parameter_count_matches_hand_count(depth: int) -> None:
    model = CifarResNet(depth)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(depth)


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_parameter_count_matches_paper(depth: int, millions: float) -> None:
    """He et al. 2016, Table 6: 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters."""
    count = sum(p.numel() for p in CifarResNet(depth).parameters())
    assert round(count / 1e6, 2 if depth < 100 else 1) == millions


@pytest.mark.parametrize("depth", [20, 32])
def test_output_shapes_and_logits(depth: int) -> None:
    torch.manual_seed(0)
    model = create_backbone("cifar_resnet", depth=depth).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        feats = model(x)
        logits = model.forward_logits(x)
    assert feats.shape == (5, 64) and model.num_features == 64
    assert logits.shape == (5, 10)
    torch.testing.assert_close(logits, feats @ model.linear.weight.T + model.linear.bias)
    assert (feats >= 0).all(), "the pooled feature follows a ReLU"
    assert model.preprocessing.input_size == (3, 32, 32)
    assert model.preprocessing.mean == (0.485, 0.456, 0.406)
    assert model.preprocessing.std == (0.229, 0.224, 0.225)


def test_stage_resolutions_and_pooling() -> None:
    """Stages run at 32, 16 and 8 px with 16/32/64 channels; the feature is the spatial mean."""
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(x)))
        shapes = []
        for stage in (model.layer1, model.layer2, model.layer3):
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
        assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
        torch.testing.assert_close(model(x), h.mean(dim=(2, 3)))


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 32, 32)
    out = OptionAShortcut(pad=8)(x)
    assert out.shape == (2, 32, 16, 16)
    expected = np.zeros((2, 32, 16, 16), dtype=np.float32)
    expected[:, 8:24] = x.numpy()[:, :, ::2, ::2]
    np.testing.assert_array_equal(out.numpy(), expected)


def test_downsampling_block_uses_parameter_free_shortcut() -> None:
    block = BasicBlock(32, 64, stride=2)
    assert isinstance(block.shortcut, OptionAShortcut) and block.shortcut.pad == 16
    assert not list(block.shortcut.parameters())
    assert block(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    assert isinstance(BasicBlock(16, 16).shortcut, torch.nn.Identity)


def test_classifier_is_the_linear_layer_and_stored_once() -> None:
    model = CifarResNet(20)
    assert model.classifier is model.linear
    keys = list(model.state_dict())
    assert "linear.weight" in keys and not any(k.startswith("classifier") for k in keys)


@pytest.mark.parametrize("depth", [0, 21, 2])
def test_invalid_depth_is_config_error(depth: int) -> None:
    with pytest.raises(ConfigError, match="6n"):
        CifarResNet(depth)


def test_aliases_fix_the_depth() -> None:
    assert create_backbone("cifar_resnet32").depth == 32
    assert create_backbone("cifar_resnet20", num_classes=5).linear.out_features == 5
    with pytest.raises(ConfigError):
        create_backbone("cifar_resnet20", depth=32)


# --- third-party checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "fixture"), [(20, "resnet20_checkpoint"), (32, "resnet32_checkpoint")])
def test_third_party_checkpoints_load_unchanged(depth: int, fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = create_backbone("cifar_resnet", depth=depth, weights=str(path))
    state = model.state_dict()
    loaded = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert {f"module.{k}" for k in loaded} == set(raw)
    for k, v in loaded.items():
        torch.testing.assert_close(v, raw[f"module.{k}"], rtol=0, atol=0)


def test_bare_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = CifarResNet(20)
    path = tmp_path / "bare.pt"
    torch.save(src.state_dict(), path)
    dst = load_cifar_resnet_checkpoint(CifarResNet(20), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_resnet32_weights_into_depth20_is_a_useful_error(resnet32_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        create_backbone("cifar_resnet", depth=20, weights=str(resnet32_checkpoint))
    message = str(info.value)
    assert "\n" not in message
    assert resnet32_checkpoint.name in message
    assert "depth 20" in message and "looks like depth 32" in message
    assert "unexpected: layer1.3." in message


def test_wrong_class_count_names_the_shape(resnet20_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"linear\.weight file \(10, 64\) vs model \(5, 64\)"):
        create_backbone("cifar_resnet20", num_classes=5, weights=str(resnet20_checkpoint))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.th"):
        create_backbone("cifar_resnet20", weights=str(tmp_path / "absent.th"))


def _top1(checkpoint: Path, test_tar: Path, *, every: int) -> tuple[float, int]:
    """Top-1 of the shared ResNet-20 on every ``every``-th test image (the split is sorted by class)."""
    from compatembed.data import ImageFolderTar, build_transform

    model = create_backbone("cifar_resnet20", weights=str(checkpoint)).eval()
    dataset = ImageFolderTar(test_tar, transform=build_transform(model.preprocessing, train=False))
    assert len(dataset) == 10_000 and dataset.classes[0] == "airplane" and dataset.classes[9] == "truck"
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), every))
    loader = torch.utils.data.DataLoader(subset, batch_size=250, num_workers=0)
    correct = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model.forward_logits(images).argmax(1) == labels).sum())
    return correct / len(subset), len(subset)


def test_shared_resnet20_accuracy_on_a_tenth_of_cifar10_test(resnet20_checkpoint: Path, cifar_test_tar: Path) -> None:
    """Fast version: 1,000 images (100 per class); 81% expected, 75% is five standard errors below."""
    start = time.perf_counter()
    accuracy, n = _top1(resnet20_checkpoint, cifar_test_tar, every=10)
    elapsed = time.perf_counter() - start
    print(f"shared ResNet-20 top-1 on {n} CIFAR-10 JPEG test images: {accuracy:.4f} ({elapsed:.1f} s)")
    assert n == 1000
    assert accuracy >= 0.75


@pytest.mark.slow
def test_shared_resnet20_accuracy_on_cifar10_test(resnet20_checkpoint: Path, cifar_test_tar: Path) -> None:
    """The deployed old model really is a CIFAR-10 classifier: >= 78% top-1 on the full JPEG test split.

    Slow: 75-140 s on two shared CPU cores (0.41 TFLOP of inference plus 10,000 JPEG decodes).
    """
    start = time.perf_counter()
    accuracy, n = _top1(resnet20_checkpoint, cifar_test_tar, every=1)
    elapsed = time.perf_counter() - start
    print(f"shared ResNet-20 top-1 on {n} CIFAR-10 JPEG test images: {accuracy:.4f} ({elapsed:.1f} s)")
    assert n == 10_000
    assert accuracy >= 0.78
