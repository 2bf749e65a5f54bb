"""Model version directories: round trip, checksums, architecture mismatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compatembed.errors import ManifestError
from compatembed.models import CompatibilityEdge, EmbeddingModel, create_backbone, load_model_version, save_model_version
from compatembed.models.version import load_manifest, module_sha256

CONFIG = {
    "_target_": "compatembed.models.EmbeddingModel",
    "backbone": {"_target_": "compatembed.models.create_backbone", "name": "cifar_resnet", "depth": 20, "weights": None},
    "embed_dim": 16,
    "normalize": True,
}


def _model(embed_dim: int = 16) -> EmbeddingModel:
    torch.manual_seed(0)
    return EmbeddingModel(create_backbone("cifar_resnet", depth=20), embed_dim=embed_dim)


def _save(tmp_path, model=None, edges=None, config=CONFIG):
    model = model or _model()
    return save_model_version(
        tmp_path / "v",
        version_id="v2",
        model=model,
        model_config=config,
        embed_dim=model.embed_dim,
        normalized=True,
        preprocessing=model.preprocessing.to_dict(),
        training={"classes": [0, 1]},
        parent="v1",
        edges=edges,
    )


def test_round_trip_gives_identical_embeddings(tmp_path):
    model = _model().eval()
    out = _save(tmp_path, model)
    loaded = load_model_version(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.embed(x), model.embed(x), atol=1e-6)
    assert module_sha256(loaded.model) == module_sha256(model)
    assert loaded.version_id == "v2" and loaded.embed_dim == 16 and loaded.manifest["parent"] == "v1"


def test_edges_are_written_as_verified_arrays(tmp_path):
    weight = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    edges = [
        CompatibilityEdge("prefix", "v1", dim=8),
        CompatibilityEdge("affine", "v0", arrays={"weight": weight, "bias": np.zeros(8, np.float32)}),
    ]
    loaded = load_model_version(_save(tmp_path, edges=edges))
    assert [e["kind"] for e in loaded.edges] == ["prefix", "affine"]
    assert loaded.edges[0] == {"kind": "prefix", "target": "v1", "dim": 8}
    np.testing.assert_array_equal(loaded.edge_arrays(loaded.edges[1])["weight"], weight)


def test_changed_weights_file_is_refused(tmp_path):
    out = _save(tmp_path)
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="does not match its manifest"):
        load_model_version(out)


def test_manifest_naming_another_architecture_is_refused(tmp_path):
    out = _save(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["embed_dim"] = 32
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="does not fit the manifest's architecture"):
        load_model_version(out)


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path / "empty")


def test_bad_version_id_and_edges(tmp_path):
    with pytest.raises(ManifestError, match="invalid version id"):
        save_model_version(tmp_path, version_id="a b", model=_model(), model_config=CONFIG, embed_dim=16,
                           normalized=True, preprocessing={}, training={})
    with pytest.raises(ManifestError, match="unknown compatibility edge kind"):
        CompatibilityEdge("magic", "v1")
    with pytest.raises(ManifestError, match="affine edge needs"):
        CompatibilityEdge("affine", "v1", arrays={"weight": np.eye(2)})
