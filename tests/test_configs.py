"""Every config composes; every experiment names real classes; typos in keys fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, get_object, instantiate
from omegaconf import OmegaConf

from compatembed.methods import METHODS

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_names_real_targets(experiment, compose):
    cfg = compose("train", [f"experiment={experiment}"])
    OmegaConf.resolve(cfg)
    assert cfg.version_id == experiment or cfg.version_id.startswith(experiment.split("_")[0])
    method_cls = get_class(cfg.method._target_)
    assert method_cls.name in METHODS and METHODS[method_cls.name] is method_cls
    for node in (cfg.model, cfg.model.backbone, cfg.logger, cfg.trainer, cfg.optim.optimizer):
        assert callable(get_object(node._target_))
    trainer = instantiate(cfg.trainer)
    assert trainer.epochs >= 0
    if experiment.startswith("cifar10_") and not experiment.endswith("_old") and experiment != "cifar10_side_lite0":
        # (cifar10_side_lite0 is no new model: FCT's side-information model, imported as is)
        assert cfg.method.old_version is not None, "a CIFAR-10 new model must name its old version"


def test_the_internal_cifar10_new_models_train_alike(compose):
    """The methods table compares each method with the independent model: same data, backbone, optimiser and
    budget, so new/new and the step times compare like for like (the old model keeps its own optimiser)."""
    internal = [e for e in EXPERIMENTS if e.startswith("cifar10_") and not e.startswith("cifar10_external_")
                and not e.endswith("_old") and e != "cifar10_side_lite0"]
    assert "cifar10_independent_new" in internal and len(internal) >= 6
    reference = compose("train", ["experiment=cifar10_independent_new"])
    for experiment in internal:
        cfg = compose("train", [f"experiment={experiment}"])
        for node in ("optim", "trainer", "data"):
            assert cfg[node] == reference[node], f"{experiment}: {node} differs from cifar10_independent_new"
        assert cfg.model.backbone == reference.model.backbone, experiment
        assert cfg.method.old_version == reference.method.old_version, experiment


@pytest.mark.parametrize("group", ["data", "model", "method", "optim", "trainer", "logger"])
def test_every_group_option_composes(group, compose):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if option == "imagefolder":
            overrides += ["data.num_classes=10", "data.train.root=x", "data.test.root=y"]
        if option == "open_clip_vitb32":
            overrides += ["model.backbone.weights=x.pt"]
        cfg = compose("train", overrides)
        OmegaConf.resolve(cfg[group])


def test_a_misspelt_key_fails(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("train", ["trainer.epoch=3"])


@pytest.mark.parametrize("name", ["extract", "eval"])
def test_cli_configs_compose(name, compose):
    cfg = compose(name, ["query=x", "gallery=y"] if name == "eval" else ["version=x"])
    assert cfg.split == "test"


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_sweep_validates_on_a_held_out_split_and_names_real_keys(search, compose):
    # Every sweep's header gives the command that runs it; the experiment it names is the one composed here.
    command = re.search(r"compatembed-train -m experiment=(\S+)", (CONF / "hparams_search" / f"{search}.yaml").read_text())
    assert command, f"conf/hparams_search/{search}.yaml does not say how to run it (compatembed-train -m experiment=...)"
    experiment = command.group(1)
    assert experiment in EXPERIMENTS, experiment
    cfg = compose("train", [f"experiment={experiment}", f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.validation.enabled and cfg.data.validation.fraction > 0  # chosen on 'val', never on 'test'
    parser = OverridesParser.create()
    choices = 1
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key in cfg.method, key
        override = parser.parse_overrides([f"{key}={cfg.hydra.sweeper.params[key]}"])[0]  # as Hydra reads it
        choices *= len(list(override.sweep_iterator())) if override.is_sweep_override() else 1
        if (CONF / key).is_dir():  # a swept config group: every option composes and has the name tables show
            for option in override.sweep_iterator():
                assert compose("train", [f"experiment={experiment}", f"{key}={option}"])[key].name == option
        if key.endswith("orthogonal_map"):  # every swept parametrisation is one the layer accepts
            from compatembed.models.orthogonal import check_orthogonal_map

            for value in str(cfg.hydra.sweeper.params[key]).split(","):
                check_orthogonal_map(value.strip())
    assert choices > 1, "the sweep compares nothing"


def _keywords(cls: type) -> set[str]:
    """The keywords ``cls(...)`` takes: its own, and through ``**kwargs`` those of the base class it passes them to."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        names |= _keywords(cls.__mro__[1])
    return names


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_method_config_mirrors_the_constructor(name):
    """Every keyword the method class takes is in its YAML and every YAML key is a keyword: no option is unreachable."""
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    accepted = _keywords(get_class(node._target_)) - {"self", "model", "num_classes"}
    assert set(node) - {"_target_"} == accepted
