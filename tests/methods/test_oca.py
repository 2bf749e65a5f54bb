"""OCA: orthogonality of Q, the loss against a numpy oracle, the expanded embedding and its prefix route."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compatembed.errors import ConfigError
from compatembed.methods.oca import OCA
from compatembed.models.orthogonal import ORTHOGONAL_MAPS
from compatembed.models.version import load_manifest, load_model_version, module_sha256

D_OLD, K = 16, 8


@pytest.fixture(scope="module")
def old_version(tmp_path_factory: pytest.TempPathFactory, train_version) -> Path:
    """An old version trained here: independent, synthetic classes 0-4, 16-d."""
    return train_version(tmp_path_factory.mktemp("oca") / "old", ["data.classes=0-4", f"model.embed_dim={D_OLD}"])


def frobenius_error(q: torch.Tensor) -> float:
    q64 = q.detach().double()
    return float(torch.linalg.norm(q64.T @ q64 - torch.eye(q64.shape[0], dtype=torch.float64)))


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_q_stays_orthogonal_through_optimiser_steps(
    old_version: Path, orthogonal_map: str, new_model, synthetic_context, fixed_batch
) -> None:
    model = new_model(D_OLD + K)
    ctx = synthetic_context(model, batch_size=64)
    method = OCA(model, 10, old_version=str(old_version), extra_dims=K, orthogonal_map=orthogonal_map)
    method.setup(ctx)
    q0, c0 = method.transform.weight.detach().clone(), method.transform.bias.detach().clone()
    assert q0.shape == (D_OLD + K, D_OLD + K) and frobenius_error(q0) < 1e-5
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.05)
    data = fixed_batch(ctx)
    for _ in range(4):
        terms, _ = method.training_forward(*data)
        optimizer.zero_grad()
        torch.stack(list(terms.values())).sum().backward()
        optimizer.step()
        assert frobenius_error(method.transform.weight) < 1e-5
    assert (method.transform.weight - q0).abs().max() > 1e-3, "Q did not move"
    assert not torch.equal(method.transform.bias, c0), "the bias c did not train"
    assert method.finalize(ctx)["oca"]["orthogonality_error"] < 1e-5


def test_loss_terms_match_a_numpy_oracle(old_version: Path, new_model, synthetic_context, fixed_batch) -> None:
    model = new_model(D_OLD + K)
    ctx = synthetic_context(model, batch_size=64)
    method = OCA(model, 10, old_version=str(old_version), extra_dims=K, influence_scale=3.0)
    method.setup(ctx)
    images, labels, idx = fixed_batch(ctx)
    with torch.no_grad():
        torch.nn.init.normal_(method.transform.bias)  # a non-zero c, so the oracle checks where it enters
        feats = model(images).double().numpy()
        terms, _ = method.training_forward(images, labels, idx)
    q = method.transform.weight.detach().double().numpy()
    c = method.transform.bias.detach().double().numpy()
    w = method.classifier.weight.detach().double().numpy()
    old = load_model_version(old_version).model
    old_view = ctx.eval_view(old.preprocessing)
    with torch.no_grad():
        old_feats = old(torch.stack([old_view[i][0] for i in range(len(old_view))])).double().numpy()
    old_feats /= np.linalg.norm(old_feats, axis=1, keepdims=True)
    targets = np.asarray(old_view.targets)
    protos = np.stack([old_feats[targets == k].mean(0) for k in range(10)])
    y = labels.numpy()

    def ce_ls(logits: np.ndarray, eps: float = 0.1) -> float:
        log_p = logits - logits.max(1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
        return float((-(1 - eps) * log_p[np.arange(len(y)), y] - eps * log_p.mean(1)).mean())

    h = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    g = h[:, :D_OLD] / np.linalg.norm(h[:, :D_OLD], axis=1, keepdims=True)
    pull = 1 - (protos[y] * g).sum(1) / np.linalg.norm(protos[y], axis=1)
    assert float(terms["ce"]) == pytest.approx(5 * ce_ls((h @ q.T + c) @ w.T), rel=1e-4)
    assert float(terms["influence"]) == pytest.approx(10 * ce_ls(3.0 * g @ protos.T), rel=1e-4)
    assert float(terms["pull"]) == pytest.approx(5 * pull.mean(), rel=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "changed"),
    [
        ("ce_weight", 2.0, "ce"),
        ("influence_weight", 3.0, "influence"),
        ("pull_weight", 4.0, "pull"),
        ("label_smoothing", 0.3, "ce"),
        ("influence_scale", 5.0, "influence"),
    ],
)
def test_each_setting_changes_the_loss(
    old_version: Path, key: str, value: float, changed: str,
    new_model, synthetic_context, fixed_batch, terms_without_and_with,
) -> None:
    ctx = synthetic_context(new_model(D_OLD + K), batch_size=64)
    base, other = terms_without_and_with(
        lambda **kwargs: OCA(new_model(D_OLD + K), 10, old_version=str(old_version), extra_dims=K, **kwargs),
        ctx, fixed_batch(ctx), {key: value},
    )
    assert other[changed] != pytest.approx(base[changed], rel=1e-4)
    assert abs(sum(other.values()) - sum(base.values())) > 1e-6  # the total the trainer minimises moves too
    defaults = {"ce_weight": 5.0, "influence_weight": 10.0, "pull_weight": 5.0}
    if key in defaults:
        assert other[changed] == pytest.approx(base[changed] * value / defaults[key], rel=1e-5)


def test_config_errors(old_version: Path, new_model, synthetic_context) -> None:
    with pytest.raises(ConfigError, match=rf"set model.embed_dim={D_OLD + 32}"):
        model = new_model(D_OLD + K)
        OCA(model, 10, old_version=str(old_version)).setup(synthetic_context(model, batch_size=64))
    with pytest.raises(ConfigError, match="orthogonal_map"):
        OCA(new_model(D_OLD + K), 10, old_version=str(old_version), extra_dims=K, orthogonal_map="qr")
    with pytest.raises(ConfigError, match="extra_dims"):
        OCA(new_model(D_OLD + K), 10, old_version=str(old_version), extra_dims=-1)
    with pytest.raises(ConfigError, match="old_version"):
        OCA(new_model(D_OLD + K), 10, extra_dims=K).setup(synthetic_context(new_model(D_OLD + K), batch_size=64))


def test_deployed_embedding_is_expanded_and_its_prefix_searches_the_old_gallery(
    old_version: Path, tmp_path: Path, train_version, compose
) -> None:
    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics
    from compatembed.eval.pair_report import evaluate
    from compatembed.eval.pairs import evaluate_pair

    out = train_version(
        tmp_path / "oca",
        ["method=oca", f"method.old_version={old_version}", f"method.extra_dims={K}", f"model.embed_dim={D_OLD + K}"],
    )
    manifest = load_manifest(out)
    assert manifest["embedding"] == {"dim": D_OLD + K, "normalized": True, "dtype": "float32"}
    assert [(e["kind"], e["target"], e["dim"]) for e in manifest["compatibility"]] == [("prefix", "old", D_OLD)]
    assert manifest["training"]["oca"]["orthogonality_error"] < 1e-5
    assert manifest["training"]["frozen_model_sha256"]["old_model"] == module_sha256(load_model_version(old_version).model)
    assert not any(k.startswith(("transform", "classifier")) for k in load_model_version(out).model.state_dict())

    data_cfg = compose("train", ["data=synthetic"]).data
    new = load_or_extract(out, data_cfg, "test", device="cpu", progress=False)
    old = load_or_extract(old_version, data_cfg, "test", device="cpu", progress=False)
    assert new.embeddings.shape[1] == D_OLD + K
    by_hand = new.embeddings[:, :D_OLD] / np.linalg.norm(new.embeddings[:, :D_OLD], axis=1, keepdims=True)
    routed = evaluate_pair(new, old, leave_one_out=True)
    expected = retrieval_metrics(
        by_hand, new.labels, old.embeddings, old.labels, query_ids=new.ids, gallery_ids=old.ids, leave_one_out=True, topk=(1, 5)
    )
    assert "prefix" in routed["route"]
    for metric, value in expected.items():
        assert routed[metric] == pytest.approx(value, abs=1e-9), metric

    cfg = compose(
        "eval", ["data=synthetic", f"query={out}", f"gallery={old_version}", f"out={tmp_path / 'report'}", "progress=false"]
    )
    report = evaluate(cfg)
    cross = [p for p in report["pairs"] if (p["query"], p["gallery"]) == ("new", "old")][0]
    assert "prefix" in cross["route"] and cross["top1"] == pytest.approx(expected["top1"])


def test_short_real_run_lowers_each_loss_term(short_run_on_imported_resnet20, assert_losses_fall) -> None:
    """The third-party ResNet-20 as the old model (64-d), a 64 + 16-d new model, 160 CIFAR-10 images, 20 steps."""
    _, _, history = short_run_on_imported_resnet20(
        lambda model, old: OCA(model, 10, old_version=old, extra_dims=16), embed_dim=64 + 16
    )
    assert_losses_fall(history, ("ce", "influence", "pull"))
