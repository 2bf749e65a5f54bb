"""BCT: the frozen old classifier, its synthesised rows, the loss weights, export and a real-data run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.bct import BCT
from compatembed.models.version import load_manifest, load_model_version, module_sha256

D_OLD = 16


@pytest.fixture(scope="module")
def old_version(tmp_path_factory: pytest.TempPathFactory, train_version) -> Path:
    """An old version trained here (independent, synthetic classes 0-4, 16-d): no classifier stored."""
    return train_version(tmp_path_factory.mktemp("bct") / "old", ["data.classes=0-4", f"model.embed_dim={D_OLD}"])


@pytest.fixture(scope="module")
def imported_old(tmp_path_factory: pytest.TempPathFactory, train_version) -> Path:
    """An imported old model (0 epochs, no projection: its backbone's 64 -> 10 classifier reads the
    embedding) whose manifest says it saw classes 0-4 only."""
    return train_version(
        tmp_path_factory.mktemp("bct") / "imported", ["data.classes=0-4", "model.embed_dim=null", "trainer.epochs=0"]
    )


def class_means_by_hand(version_dir: Path, ctx: MethodContext) -> np.ndarray:
    """Oracle: embed with the freshly loaded old model, normalise and average per class in numpy."""
    loaded = load_model_version(version_dir)
    data = ctx.eval_view(loaded.model.preprocessing)
    items = [data[i] for i in range(len(data))]
    with torch.no_grad():
        feats = loaded.model(torch.stack([image for image, _ in items])).double().numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.array([label for _, label in items])
    return np.stack([feats[labels == c].mean(0) if (labels == c).any() else np.zeros(feats.shape[1]) for c in range(10)])


def test_old_classifier_gets_no_gradient_and_stays_unchanged(
    old_version: Path, new_model, synthetic_context, fixed_batch
) -> None:
    model = new_model(D_OLD)
    ctx = synthetic_context(model)
    method = BCT(model, 10, old_version=str(old_version))
    method.setup(ctx)
    head = method.old_classifier
    before = {k: v.clone() for k, v in head.state_dict().items()}
    old_hash = module_sha256(method.old_model)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert not any(id(p) in trainable for p in head.parameters())
    assert not any(id(p) in trainable for p in method.old_model.parameters())
    model_before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    method.train()
    for _ in range(3):
        terms, _ = method.training_forward(*fixed_batch(ctx))
        optimizer.zero_grad()
        torch.stack(list(terms.values())).sum().backward()
        assert all(p.grad is None and not p.requires_grad for p in head.parameters())
        optimizer.step()
    assert not head.training and not method.old_model.training
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key])
    assert module_sha256(method.old_model) == old_hash
    assert any(not torch.equal(a, b) for a, b in zip(model_before, model.parameters())), "the new model did not train"


def test_old_version_trained_here_uses_class_means_for_all_classes(old_version: Path, new_model, synthetic_context) -> None:
    model = new_model(D_OLD)
    ctx = synthetic_context(model)
    method = BCT(model, 10, old_version=str(old_version))
    method.setup(ctx)
    np.testing.assert_allclose(method.old_classifier.weight.numpy(), class_means_by_hand(old_version, ctx), atol=1e-5)
    assert method.old_classifier.bias is None
    facts = method.finalize(ctx)["bct"]
    assert facts["old_classifier"] == "prototypes" and "trained by this project" in facts["old_classifier_reason"]
    assert facts["synthesised_classes"] == list(range(10))
    with pytest.raises(ConfigError, match="no classifier"):
        BCT(new_model(D_OLD), 10, old_version=str(old_version), old_classifier="real").setup(ctx)


def test_real_rows_kept_and_unseen_classes_synthesised(imported_old: Path, new_model, synthetic_context) -> None:
    model = new_model(64)
    ctx = synthetic_context(model)
    method = BCT(model, 10, old_version=str(imported_old))
    method.setup(ctx)
    real = method.old_model.backbone.classifier
    weight, bias = method.old_classifier.weight.detach().numpy(), method.old_classifier.bias.detach().numpy()
    np.testing.assert_array_equal(weight[:5], real.weight.detach().numpy()[:5])
    np.testing.assert_array_equal(bias[:5], real.bias.detach().numpy()[:5])
    np.testing.assert_allclose(weight[5:], class_means_by_hand(imported_old, ctx)[5:], atol=1e-5)
    np.testing.assert_array_equal(bias[5:], 0.0)
    facts = method.finalize(ctx)["bct"]
    assert facts["old_classifier"] == "real"
    assert facts["real_classifier_classes"] == [0, 1, 2, 3, 4] and facts["synthesised_classes"] == [5, 6, 7, 8, 9]
    assert [e.kind for e in method.compatibility_edges()] == ["identity"]


def test_prototypes_variant_is_cosine_to_p_with_weight_10(
    imported_old: Path, new_model, synthetic_context, fixed_batch
) -> None:
    model = new_model(64)
    ctx = synthetic_context(model)
    method = BCT(model, 10, old_version=str(imported_old), variant="prototypes")
    method.setup(ctx)
    assert method.influence_weight == 10.0
    protos = class_means_by_hand(imported_old, ctx)
    np.testing.assert_allclose(method.old_classifier.weight.numpy(), protos, atol=1e-5)
    images, labels, idx = fixed_batch(ctx)
    with torch.no_grad():
        feats = model(images).double().numpy()
        terms, _ = method.training_forward(images, labels, idx)
    logits = feats / np.linalg.norm(feats, axis=1, keepdims=True) @ protos.T
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -10.0 * log_p[np.arange(len(labels)), labels.numpy()].mean()
    assert float(terms["influence"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "changed"),
    [
        ("ce_weight", 2.5, "ce"),
        ("influence_weight", 2.5, "influence"),
        ("label_smoothing", 0.3, "ce"),
        ("influence_scale", 4.0, "influence"),
    ],
)
def test_each_setting_changes_the_loss(
    imported_old: Path, key: str, value: float, changed: str,
    new_model, synthetic_context, fixed_batch, terms_without_and_with,
) -> None:
    variant = "prototypes" if key == "influence_scale" else "paper"
    ctx = synthetic_context(new_model(64))
    base, other = terms_without_and_with(
        lambda **kwargs: BCT(new_model(64), 10, old_version=str(imported_old), variant=variant, **kwargs),
        ctx, fixed_batch(ctx), {key: value},
    )
    assert other[changed] != pytest.approx(base[changed], rel=1e-4)
    if key.endswith("_weight"):  # the paper's weights are 1: the weighted term scales with the weight
        assert other[changed] == pytest.approx(base[changed] * value, rel=1e-5)
    assert abs(sum(other.values()) - sum(base.values())) > 1e-6  # the total the trainer minimises moves too


def test_config_errors(old_version: Path, new_model, synthetic_context) -> None:
    with pytest.raises(ConfigError, match="variant"):
        BCT(new_model(D_OLD), 10, old_version=str(old_version), variant="code")
    with pytest.raises(ConfigError, match="old_classifier"):
        BCT(new_model(D_OLD), 10, old_version=str(old_version), old_classifier="mean")
    with pytest.raises(ConfigError, match="compatible_dims"):
        BCT(new_model(D_OLD), 10, old_version=str(old_version), compatible_dims="suffix")
    with pytest.raises(ConfigError, match="variant=prototypes"):
        BCT(new_model(D_OLD), 10, old_version=str(old_version), variant="prototypes", old_classifier="real")
    with pytest.raises(ConfigError, match="old_version"):
        BCT(new_model(D_OLD), 10).setup(synthetic_context(new_model(D_OLD)))
    with pytest.raises(ConfigError, match=rf"model.embed_dim={D_OLD} or method.compatible_dims=prefix"):
        model = new_model(D_OLD + 8)
        BCT(model, 10, old_version=str(old_version)).setup(synthetic_context(model))
    with pytest.raises(ConfigError, match=rf"model.embed_dim={D_OLD}"):
        model = new_model(D_OLD - 8)
        BCT(model, 10, old_version=str(old_version), compatible_dims="prefix").setup(synthetic_context(model))


def test_train_export_and_eval_with_prefix(old_version: Path, tmp_path: Path, train_version, compose) -> None:
    """End to end: a 24-d new model whose first 16 dims face the old space; the old model is untouched."""
    from compatembed.eval.pair_report import evaluate

    out = train_version(
        tmp_path / "bct",
        ["method=bct", f"method.old_version={old_version}", "method.compatible_dims=prefix", f"model.embed_dim={D_OLD + 8}"],
    )
    manifest = load_manifest(out)
    assert manifest["embedding"]["dim"] == D_OLD + 8
    assert manifest["compatibility"] == [{"kind": "prefix", "target": "old", "dim": D_OLD}]
    assert manifest["parent"] == "old"
    assert manifest["training"]["bct"]["old_classifier"] == "prototypes"
    assert manifest["training"]["frozen_model_sha256"]["old_model"] == module_sha256(load_model_version(old_version).model)

    cfg = compose(
        "eval", ["data=synthetic", f"query={out}", f"gallery={old_version}", f"out={tmp_path / 'report'}", "progress=false"]
    )
    report = evaluate(cfg)
    cross = [p for p in report["pairs"] if (p["query"], p["gallery"]) == ("new", "old")][0]
    assert "prefix" in cross["route"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["query_version"] == "bct"


def test_short_real_run_lowers_each_loss_term(short_run_on_imported_resnet20, assert_losses_fall) -> None:
    """The third-party ResNet-20 as the old model (its REAL classifier), 160 CIFAR-10 images, 20 steps."""
    method, ctx, history = short_run_on_imported_resnet20(lambda model, old: BCT(model, 10, old_version=old), embed_dim=64)
    assert method.finalize(ctx)["bct"]["old_classifier"] == "real"
    assert_losses_fall(history, ("ce", "influence"))
