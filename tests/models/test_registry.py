"""Backbone registry: lookup, duplicate and unknown names, wildcard listing, shared checkpoint helpers."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

import compatembed.models  # noqa: F401  (registers the built-in backbones)
from compatembed.errors import CheckpointError, ConfigError
from compatembed.models import create_backbone, list_backbones, register_backbone, registry

BUILT_IN = {
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "timm",
    "efficientnet_lite0",
    "open_clip",
}


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the registry, so test registrations vanish afterwards."""
    table = dict(registry._BACKBONES)
    monkeypatch.setattr(registry, "_BACKBONES", table)
    return table


def test_importing_models_registers_every_built_in() -> None:
    assert BUILT_IN <= set(list_backbones())


@pytest.mark.parametrize("pattern", ["*", "cifar_resnet*", "cifar_resnet?2", "*lite*", "nothing*"])
def test_list_backbones_filters_with_fnmatch(pattern: str) -> None:
    names = list_backbones(pattern)
    assert names == sorted(n for n in list_backbones() if fnmatch.fnmatchcase(n, pattern))
    assert names == sorted(names)


def test_list_backbones_cifar_family() -> None:
    assert list_backbones("cifar_resnet*") == sorted(
        ["cifar_resnet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110"]
    )
    assert list_backbones("nothing*") == []


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    assert all(name in message for name in BUILT_IN)
    assert "\n" not in message


def test_duplicate_name_raises(scratch_registry: dict) -> None:
    @register_backbone("dup_test")
    def first(weights: str | None = None) -> nn.Module:  # pragma: no cover - never built
        raise AssertionError

    with pytest.raises(ValueError, match="dup_test"):

        @register_backbone("dup_test")
        def second(weights: str | None = None) -> nn.Module:  # pragma: no cover - never built
            raise AssertionError

    assert scratch_registry["dup_test"] is first
    with pytest.raises(ValueError, match="cifar_resnet"):
        register_backbone("cifar_resnet")(first)


def test_registered_factory_is_built_with_kwargs(scratch_registry: dict, tiny_backbone: nn.Module) -> None:
    seen = {}

    @register_backbone("kw_test")
    def factory(width: int = 1, weights: str | None = None) -> nn.Module:
        seen.update(width=width, weights=weights)
        return tiny_backbone

    assert create_backbone("kw_test", width=7) is tiny_backbone
    assert seen == {"width": 7, "weights": None}
    assert "kw_test" in list_backbones("kw_*")


def test_bad_kwargs_are_a_config_error_naming_the_backbone() -> None:
    with pytest.raises(ConfigError, match="cifar_resnet20.*dept"):
        create_backbone("cifar_resnet20", dept=20)


def test_omegaconf_values_reach_factories_as_plain_containers(scratch_registry: dict, tiny_backbone: nn.Module) -> None:
    seen = {}

    @register_backbone("plain_test")
    def factory(sizes: list | None = None, cfg: dict | None = None, weights: str | None = None) -> nn.Module:
        seen.update(sizes=sizes, cfg=cfg)
        return tiny_backbone

    cfg = OmegaConf.create({"sizes": [3, 32, 32], "cfg": {"a": 1}})
    create_backbone("plain_test", sizes=cfg.sizes, cfg=cfg.cfg)
    assert type(seen["sizes"]) is list and seen["sizes"] == [3, 32, 32]
    assert type(seen["cfg"]) is dict and seen["cfg"] == {"a": 1}


def test_factory_breaking_the_contract_is_a_bug(scratch_registry: dict) -> None:
    register_backbone("broken_test")(lambda weights=None: nn.Linear(2, 2))
    with pytest.raises(TypeError, match="num_features"):
        create_backbone("broken_test")


# --- checkpoint helpers ---------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "safetensors"])
def test_read_state_dict_layouts(tmp_path: Path, layout: str) -> None:
    state = _state()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "bare":
        torch.save(state, path)
    elif layout in ("state_dict", "model"):
        torch.save({layout: state, "epoch": 3}, path)
    elif layout == "module_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 90.0}, path)
    else:
        save_file(state, str(path))
    loaded = registry.read_state_dict(path)
    assert sorted(loaded) == sorted(state)  # safetensors stores keys sorted
    for k in state:
        torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0)


def test_read_state_dict_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        registry.read_state_dict(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        registry.read_state_dict(garbage)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="list.pt"):
        registry.read_state_dict(notdict)


def test_load_state_dict_strict_explains_mismatch_on_one_line() -> None:
    module = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items() if "num_batches" not in k}
    registry.load_state_dict_strict(module, good, source="ok.pt", expected="seq")  # counters may be absent
    assert torch.all(module[0].weight == 0.5)

    bad = dict(good)
    bad["0.weight"] = torch.zeros(4, 2)
    bad["2.extra"] = torch.zeros(1)
    del bad["1.bias"]
    with pytest.raises(CheckpointError) as info:
        registry.load_state_dict_strict(module, bad, source="bad.pt", expected="seq")
    message = str(info.value)
    assert "\n" not in message
    for part in ("bad.pt", "seq", "1 missing: 1.bias", "1 unexpected: 2.extra", "0.weight file (4, 2) vs model (3, 2)"):
        assert part in message
    assert torch.all(module[0].weight == 0.5), "a refused checkpoint must not be half-loaded"
