"""A manifest is data: loading a version builds only the project's own classes, after schema and checksum checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from compatembed.errors import ManifestError
from compatembed.models import EmbeddingModel, create_backbone, load_model_version, save_model_version
from compatembed.models.version import DEPLOYABLE, check_model_config, load_manifest

CONFIG = {
    "_target_": "compatembed.models.EmbeddingModel",
    "backbone": {"_target_": "compatembed.models.create_backbone", "name": "cifar_resnet", "depth": 20, "weights": None},
    "embed_dim": 16,
    "normalize": True,
}


@pytest.fixture
def version(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=20), embed_dim=16)
    return save_model_version(tmp_path / "v", version_id="v", model=model, model_config=CONFIG, embed_dim=16,
                              normalized=True, preprocessing=model.preprocessing.to_dict(), training={})


def _edit(version, change):
    path = version / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_naming_an_arbitrary_callable_is_refused_before_it_runs(version, tmp_path):
    target = tmp_path / "made_by_the_manifest"

    def plant(m):
        m["model"]["backbone"] = {"_target_": "os.makedirs", "name": str(target)}

    _edit(version, plant)
    with pytest.raises(ManifestError, match=r"model\.backbone\._target_='os\.makedirs' is not one of the project's"):
        load_model_version(version)
    assert not target.exists()
    with pytest.raises(ManifestError, match="os.makedirs"):
        load_manifest(version)  # the index-side reader refuses it too


@pytest.mark.parametrize("key", ["_partial_", "_args_", "_recursive_", "_convert_"])
def test_other_instantiation_keys_are_refused(key):
    with pytest.raises(ManifestError, match=key):
        check_model_config({**CONFIG, key: True})


def test_the_projects_own_deployed_modules_are_allowed():
    check_model_config(CONFIG)
    import compatembed.methods  # noqa: F401

    assert "compatembed.methods.bt2.BT2Embedder" in DEPLOYABLE  # a method's own deployed class registers itself


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["embedding"].update(dim=-3), "embedding.dim"),
        (lambda m: m["embedding"].update(normalized="yes"), "embedding.normalized"),
        (lambda m: m.update(version_id="../etc"), "version_id"),
        (lambda m: m["files"].update({"model.safetensors": "not-a-digest"}), "sha256"),
        (lambda m: m["files"].update({"../../outside.npz": "0" * 64}), "relative path"),
        (lambda m: m.update(compatibility=[{"kind": "prefix", "target": "old", "dim": 999}]), "dim must be in"),
        (lambda m: m.update(compatibility=[{"kind": "affine", "target": "old", "file": "transforms/x.npz"}]), "listed in files"),
        (lambda m: m.update(compatibility=[{"kind": "teleport", "target": "old"}]), "kind"),
        (lambda m: m.update(model=["not", "a", "mapping"]), "model must be"),
    ],
)
def test_malformed_manifests_are_refused_naming_the_field(version, change, message):
    _edit(version, change)
    with pytest.raises(ManifestError, match=message):
        load_model_version(version)


def test_a_checkpoint_that_would_run_code_is_not_unpickled(tmp_path):
    from compatembed.cli import compose_config
    from compatembed.errors import ConfigError
    from compatembed.training.run import train

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"method": Payload()}, run / "checkpoints" / "last.ckpt")
    cfg = compose_config("train", ["data=synthetic", "model=cifar_resnet20", "model.embed_dim=8", "trainer.epochs=1",
                                   "trainer.progress=false", f"output_dir={run}", "trainer.num_threads=1"])
    with pytest.raises(ConfigError, match="tensors and plain values"):
        train(cfg)
    assert not marker.exists()


def test_a_missing_referenced_version_fails_before_any_work(tmp_path):
    from compatembed.cli import compose_config
    from compatembed.errors import ConfigError
    from compatembed.training.run import train

    cfg = compose_config("train", ["data=synthetic", "model=cifar_resnet20", "trainer.progress=false",
                                   f"output_dir={tmp_path / 'run'}", f"method.old_version={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"method\.old_version=.*nowhere.*not found"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory, data or model
